"""Tests of labels.py on hand-made arrays of a few voxels: class values <-> indices (MSD Task01's
1, 2, 3 and BraTS 2021's 1, 2, 4), the network's targets (softmax one-hot, sigmoid regions),
label maps back from probabilities (argmax to the declared values; regions painted in order),
regions and their derived painting order, `parse_regions`, the JSON record, and the binary
atrium (0/1 or 0/255)."""
import json

import numpy as np
import pytest

import labels as lbl
from labels import Labels

MSD = Labels((1, 2, 3), ("edema", "non-enhancing tumour", "enhancing tumour"))
BRATS = Labels((1, 2, 4), ("necrotic core", "edema", "enhancing tumour"))
MSD_REGIONS = [("whole", (1, 2, 3)), ("core", (2, 3)), ("enhancing", (3,))]
BRATS_REGIONS = [("whole", (1, 2, 4)), ("core", (1, 4)), ("enhancing", (4,))]


# ----------------------------------------------------------------------------- values and indices

def test_to_indices_and_back_msd_values():
    label = np.array([[0, 1], [2, 3]], np.uint8)
    indices = MSD.to_indices(label)
    assert indices.dtype == np.uint8 and indices.tolist() == [[0, 1], [2, 3]]
    assert MSD.to_values(indices).tolist() == label.tolist()


def test_to_indices_and_back_brats2021_values():
    label = np.array([[[0, 4], [2, 1]], [[4, 4], [0, 2]]], np.uint8)
    indices = BRATS.to_indices(label)
    # 1 -> 1, 2 -> 2, 4 -> 3 (the classes in ascending order), background 0.
    assert indices.tolist() == [[[0, 3], [2, 1]], [[3, 3], [0, 2]]]
    values = BRATS.to_values(indices)
    assert values.dtype == np.uint8 and np.array_equal(values, label)


def test_to_indices_reads_an_undeclared_value_as_background():
    # dataset.class_indices refuses undeclared values first; the table itself maps them to 0.
    assert BRATS.to_indices(np.array([3, 5, 255], np.uint8)).tolist() == [0, 0, 0]


def test_kinds_of_output_and_channel_counts():
    assert (MSD.activation, MSD.out_channels, MSD.outputs, MSD.binary) == ("softmax", 4, (), False)
    regions = MSD.with_regions(MSD_REGIONS)
    assert (regions.activation, regions.out_channels, regions.binary) == ("sigmoid", 3, False)
    assert regions.outputs == tuple(MSD_REGIONS)
    atrium = lbl.binary()
    assert (atrium.activation, atrium.out_channels, atrium.binary) == ("sigmoid", 1, True)
    assert atrium.outputs == (("foreground", (1,)),)
    # Scored: each class alone, then each region.
    assert regions.structures == [("edema", (1,)), ("non-enhancing tumour", (2,)), ("enhancing tumour", (3,)),
                                  *MSD_REGIONS]


# ----------------------------------------------------------------------------- targets

def test_softmax_target_is_one_hot_with_background_first():
    indices = np.array([[0, 1, 2], [3, 3, 0]], np.uint8)
    target = BRATS.target(indices)
    assert target.dtype == np.float32 and target.shape == (4, 2, 3)
    expected = np.zeros((4, 2, 3), np.float32)
    for (y, x), k in np.ndenumerate(indices):
        expected[k, y, x] = 1
    assert np.array_equal(target, expected)
    assert np.array_equal(target.sum(axis=0), np.ones((2, 3)))  # one class per voxel
    assert np.array_equal(np.argmax(target, axis=0), indices)


def test_sigmoid_target_holds_one_mask_per_region():
    regions = MSD.with_regions(MSD_REGIONS)
    indices = np.array([0, 1, 2, 3], np.uint8)  # MSD: index = value
    target = regions.target(indices)
    assert target.dtype == np.float32 and target.shape == (3, 4)
    assert target.tolist() == [[0, 1, 1, 1],   # whole {1, 2, 3}
                               [0, 0, 1, 1],   # core {2, 3}
                               [0, 0, 0, 1]]   # enhancing {3}


def test_sigmoid_target_of_brats2021_regions_maps_values_through_indices():
    regions = BRATS.with_regions(BRATS_REGIONS)
    indices = BRATS.to_indices(np.array([0, 1, 2, 4], np.uint8))  # [0, 1, 2, 3]
    assert regions.target(indices).tolist() == [[0, 1, 1, 1],   # whole {1, 2, 4}
                                                [0, 1, 0, 1],   # core {1, 4}: necrosis and enhancing
                                                [0, 0, 0, 1]]   # enhancing {4}


def test_binary_target_is_the_mask():
    assert lbl.binary().target(np.array([0, 1, 1, 0], np.uint8)).tolist() == [[0, 1, 1, 0]]


# ----------------------------------------------------------------------------- label maps

def test_softmax_label_map_is_argmax_as_declared_values():
    probs = np.array([[0.7, 0.1, 0.2, 0.1],    # background
                      [0.1, 0.6, 0.2, 0.1],    # class 1
                      [0.1, 0.2, 0.5, 0.1],    # class 2
                      [0.1, 0.1, 0.1, 0.7]],   # class 4 (index 3)
                     np.float32)
    out = BRATS.label_map(probs)
    assert out.dtype == np.uint8 and out.tolist() == [0, 1, 2, 4]  # 4 comes out as 4, not 3
    assert MSD.label_map(probs).tolist() == [0, 1, 2, 3]


def test_region_label_map_paints_regions_in_order():
    regions = MSD.with_regions(MSD_REGIONS)
    assert regions.region_order == (1, 2, 3)
    #                  voxel:  0    1    2    3    4    5
    probs = np.array([[0.2, 0.9, 0.9, 0.9, 0.2, 0.5],    # whole
                      [0.1, 0.3, 0.8, 0.8, 0.9, 0.1],    # core
                      [0.0, 0.1, 0.2, 0.6, 0.1, 0.4]],   # enhancing
                     np.float32)
    # 0: nothing; 1: whole only -> 1; 2: whole + core -> 2; 3: all -> 3; 4: core without whole -> 2
    # (a later region paints over whatever lies below); 5: exactly 0.5 counts as inside -> 1.
    assert regions.label_map(probs).tolist() == [0, 1, 2, 3, 2, 1]


def test_brats2021_region_label_map_paints_declared_values():
    regions = BRATS.with_regions(BRATS_REGIONS)
    assert regions.region_order == (2, 1, 4)  # whole paints edema, core necrosis, enhancing 4
    probs = np.array([[0.9, 0.9, 0.9, 0.1],
                      [0.1, 0.9, 0.9, 0.1],
                      [0.1, 0.1, 0.9, 0.1]], np.float32)
    out = regions.label_map(probs)
    assert out.tolist() == [2, 1, 4, 0]
    # Painting and targets agree: the label map's own targets are the thresholded probabilities.
    assert np.array_equal(regions.target(BRATS.to_indices(out)), (probs >= 0.5).astype(np.float32))


def test_binary_label_map_thresholds_at_one_half():
    probs = np.array([[0.1, 0.49, 0.5, 0.9]], np.float32)
    assert lbl.binary().label_map(probs).tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- regions

def test_with_regions_derives_the_painting_order():
    regions = MSD.with_regions([("whole", [3, 2, 1]), ("core", [2, 3]), ("enhancing", [3])])
    assert regions.regions == tuple(MSD_REGIONS)  # values sorted
    assert regions.region_order == (1, 2, 3)
    assert (regions.values, regions.names) == (MSD.values, MSD.names)  # the classes are kept


def test_with_regions_takes_a_given_order():
    regions = MSD.with_regions(MSD_REGIONS, region_order=[1, 2, 3])
    assert regions.region_order == (1, 2, 3)


def test_with_regions_refuses_a_value_that_is_not_a_class():
    with pytest.raises(ValueError, match=r"region foo names label value\(s\) \[9\] that are not classes \(1, 2, 3\)"):
        MSD.with_regions([("foo", (1, 9))])
    with pytest.raises(ValueError, match=r"region empty names label value\(s\) none"):
        MSD.with_regions([("empty", ())])


def test_with_regions_refuses_an_order_it_cannot_derive():
    # Smallest first: the enhancing region holds no class that a later region does not.
    with pytest.raises(ValueError, match=r"region enhancing: cannot tell which class it paints \(it holds no class"):
        MSD.with_regions(list(reversed(MSD_REGIONS)))
    # A region with two classes of its own: which of them would it paint?
    with pytest.raises(ValueError, match=r"region a: cannot tell which class it paints \(it holds \[1, 2\]"):
        MSD.with_regions([("a", (1, 2)), ("b", (3,))])


def test_with_regions_refuses_a_bad_given_order():
    with pytest.raises(ValueError, match=r"regions_class_order \[1, 2\]: expected one class value per region \(3\)"):
        MSD.with_regions(MSD_REGIONS, region_order=[1, 2])
    with pytest.raises(ValueError, match=r"regions_class_order \[1, 2, 7\]"):
        MSD.with_regions(MSD_REGIONS, region_order=[1, 2, 7])


def test_parse_regions():
    assert lbl.parse_regions(["whole_tumour=1,2,3", "enhancing=3", "tumour-core=2,3"]) == \
        [("whole_tumour", (1, 2, 3)), ("enhancing", (3,)), ("tumour-core", (2, 3))]
    assert lbl.parse_regions([]) == []


@pytest.mark.parametrize("text", ["foo", "foo=", "=1,2", "foo=1,,2", "foo=1,", "foo=-1", "foo=a", "1foo=1",
                                  "foo = 1", "foo=1;2"])
def test_parse_regions_refuses_a_malformed_entry(text):
    with pytest.raises(ValueError) as e:
        lbl.parse_regions(["whole=1,2,3", text])
    assert str(e.value) == f"--regions {text}: expected NAME=V1,V2,... (e.g. whole_tumour=1,2,3)"


def test_parse_regions_names_the_flag_and_refuses_repeated_names():
    with pytest.raises(ValueError, match=r"^--score foo: expected NAME="):
        lbl.parse_regions(["foo"], flag="--score")
    with pytest.raises(ValueError, match=r"^--regions: region names must differ, got a b a$"):
        lbl.parse_regions(["a=1", "b=2", "a=3"])


# ----------------------------------------------------------------------------- record, binary

@pytest.mark.parametrize("labels", [MSD, BRATS, MSD.with_regions(MSD_REGIONS), BRATS.with_regions(BRATS_REGIONS),
                                    lbl.binary()])
def test_record_round_trip_through_json(labels):
    record = json.loads(json.dumps(labels.record()))
    assert Labels.from_record(record) == labels


def test_from_record_of_a_record_without_regions():
    assert Labels.from_record({"values": [1, 2, 4], "names": ["a", "b", "c"]}) == Labels((1, 2, 4), ("a", "b", "c"))


@pytest.mark.parametrize("values", [[0, 1], [1], [0, 255], [255], [0, 1, 255], [], [0]])
def test_from_values_of_a_mask_is_the_binary_class(values):
    # 0/255 stays binary (LASC's atrium), read as 0/1.
    assert lbl.from_values(values) == lbl.binary() == Labels((1,), ("foreground",))


def test_from_values_of_several_classes():
    labels = lbl.from_values(np.array([4, 0, 2, 1]))
    assert labels == Labels((1, 2, 4), ("label 1", "label 2", "label 4"))
    assert labels.activation == "softmax" and labels.out_channels == 4
