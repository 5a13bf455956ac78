"""Instance label maps for the iterative strategy: the numbering 1..N and one piece per instance."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import dataset as ds
from utils import UserError


def spine(n: int = 4) -> np.ndarray:
    """n boxes one above the other along D, numbered 1..n from the top."""
    label = np.zeros((8 * n + 4, 12, 12), np.uint8)
    for k in range(n):
        label[2 + 8 * k:8 + 8 * k, 3:9, 3:9] = k + 1
    return label


def test_instances_numbered_one_to_n_in_one_piece_each_are_counted():
    assert ds.check_instances(spine(4), "x.nii.gz") == 4
    assert ds.check_instances(np.zeros((4, 4, 4), np.uint8), "x.nii.gz") == 0
    touching = spine(3)
    touching[8:10, 3:9, 3:9] = 1  # instance 1 reaches instance 2: touching instances are fine
    assert ds.check_instances(touching, "x.nii.gz") == 3
    diagonal = np.zeros((3, 3, 3), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 1  # corners meet: one piece under 26-connectivity
    assert ds.check_instances(diagonal, "x.nii.gz") == 1


def test_a_gap_in_the_numbering_is_refused_naming_the_file():
    label = spine(4)
    label[label == 3] = 0
    with pytest.raises(UserError, match=r"x.nii.gz: instance values 1, 2, 4 .* \(missing 3\)"):
        ds.check_instances(label, "x.nii.gz")


def test_a_binary_mask_of_several_structures_is_refused():
    label = (spine(4) > 0).astype(np.uint8)
    assert ndimage.label(label)[1] == 4
    with pytest.raises(UserError, match="x.nii.gz: instance 1 is 4 separate pieces"):
        ds.check_instances(label, "x.nii.gz")
