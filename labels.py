"""The classes of a data set and what a network learns of them (numpy only).

A data set's label maps hold its own values (the left atrium 1, or 255 as LASC stores it; MSD
Task01 1 edema / 2 non-enhancing / 3 enhancing tumour; BraTS 2021 1 / 2 / 4): `Labels` maps them
to class indices 0..K for training, builds the network's targets, and turns its outputs back into
a label map of the same values. A network has one of two kinds of output:

- softmax over K + 1 channels (background first), when there are several classes and no regions;
- one sigmoid channel per region (`--regions whole_tumour=1,2,3 tumour_core=2,3 enhancing=3`,
  or a dataset.json's nnU-Net regions), overlapping sets of classes painted back into one label
  map in `region_order`; one class alone is the one region holding it (the atrium).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_VALUE = 255  # label maps are read as uint8: values 0..255


@dataclass(frozen=True)
class Labels:
    """Foreground classes (`values` as stored in the files, ascending, with their `names`) and
    optional `regions` ((name, values) pairs) trained as sigmoid outputs, painted into a label
    map in order, region i writing `region_order[i]`."""
    values: tuple[int, ...]
    names: tuple[str, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    region_order: tuple[int, ...] = ()

    def __post_init__(self):
        assert len(self.values) == len(self.names) >= 1, f"values {self.values} vs names {self.names}"
        assert list(self.values) == sorted(set(self.values)) and 0 < self.values[0] and self.values[-1] <= MAX_VALUE, \
            f"class values {self.values}: expected ascending, distinct, in 1..{MAX_VALUE}"
        assert len(self.region_order) == len(self.regions), f"{self.region_order} vs {self.regions}"

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def binary(self) -> bool:
        """One class and no regions: a mask, scored and written as the atrium always was."""
        return self.num_classes == 1 and not self.regions

    @property
    def activation(self) -> str:
        """"softmax" over K + 1 channels, or "sigmoid" per region (one class: its own region)."""
        return "softmax" if self.num_classes > 1 and not self.regions else "sigmoid"

    @property
    def outputs(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """What each sigmoid channel holds ((name, values) per channel); empty for softmax."""
        if self.regions:
            return self.regions
        return () if self.num_classes > 1 else ((self.names[0], self.values),)

    @property
    def out_channels(self) -> int:
        return self.num_classes + 1 if self.activation == "softmax" else len(self.outputs)

    @property
    def structures(self) -> list[tuple[str, tuple[int, ...]]]:
        """What is scored: every class alone, then every region (metrics per structure)."""
        return [(n, (v,)) for n, v in zip(self.names, self.values)] + list(self.regions)

    def lookup(self) -> np.ndarray:
        """uint8 table value -> class index (0 for the background and undeclared values)."""
        table = np.zeros(MAX_VALUE + 1, np.uint8)
        table[list(self.values)] = np.arange(1, self.num_classes + 1)
        return table

    def to_indices(self, label: np.ndarray) -> np.ndarray:
        """Class indices 0..K (uint8) of a label map holding the declared values."""
        return self.lookup()[label]

    def to_values(self, indices: np.ndarray) -> np.ndarray:
        """The label map (uint8, the declared values) of class indices 0..K."""
        return np.array((0, *self.values), np.uint8)[indices]

    def target(self, indices: np.ndarray) -> np.ndarray:
        """The network's target of class indices (*spatial) uint8: float32 (out_channels,
        *spatial), one-hot over 0..K for softmax, one mask per region for sigmoid."""
        if self.activation == "softmax":
            return (indices[None] == np.arange(self.num_classes + 1, dtype=np.uint8).reshape(-1, *[1] * indices.ndim)
                    ).astype(np.float32)
        index_of = {v: i + 1 for i, v in enumerate(self.values)}
        out = np.empty((len(self.outputs), *indices.shape), np.float32)
        for k, (_, values) in enumerate(self.outputs):
            out[k] = np.isin(indices, [index_of[v] for v in values])
        return out

    def label_map(self, probs: np.ndarray) -> np.ndarray:
        """The label map (uint8, declared values) of the network's probabilities
        (out_channels, *spatial): the most probable class for softmax; for sigmoid, each
        region above 0.5 painted in turn with its `region_order` value (later regions over
        earlier ones; one class: its mask)."""
        if self.activation == "softmax":
            return self.to_values(np.argmax(probs, axis=0).astype(np.uint8))
        order = self.region_order or (self.values[0],)
        out = np.zeros(probs.shape[1:], np.uint8)
        for p, value in zip(probs, order):
            out[p >= 0.5] = value
        return out

    def record(self) -> dict:
        """JSON form, for config.json and checkpoints (`Labels.from_record` reads it back)."""
        return {"values": list(self.values), "names": list(self.names),
                "regions": [[n, list(v)] for n, v in self.regions], "region_order": list(self.region_order)}

    @classmethod
    def from_record(cls, record: dict) -> Labels:
        return cls(tuple(record["values"]), tuple(record["names"]),
                   tuple((n, tuple(v)) for n, v in record.get("regions", [])), tuple(record.get("region_order", [])))

    def with_regions(self, regions, region_order=None) -> Labels:
        """These classes with `regions` ((name, values) pairs); `region_order` is derived when
        not given: region i paints the one class it holds that no later region holds (whole
        tumour {1,2,3}, core {2,3}, enhancing {3} -> 1, 2, 3). Raises ValueError naming a region
        whose value is not a class, or when the order cannot be derived."""
        regions = tuple((str(n), tuple(sorted(int(v) for v in vs))) for n, vs in regions)
        for name, vs in regions:
            unknown = [v for v in vs if v not in self.values]
            if not vs or unknown:
                raise ValueError(f"region {name} names label value(s) {unknown or 'none'} that are not classes "
                                 f"({', '.join(map(str, self.values))})")
        if region_order is None:
            region_order = []
            for i, (name, vs) in enumerate(regions):
                own = set(vs).difference(*(set(later) for _, later in regions[i + 1:]))
                if len(own) != 1:
                    raise ValueError(f"region {name}: cannot tell which class it paints (it holds {sorted(own) or 'no'}"
                                     " class(es) that no later region holds); give the regions from the largest to "
                                     "the smallest, or regions_class_order in dataset.json")
                region_order.append(own.pop())
        region_order = tuple(int(v) for v in region_order)
        if len(region_order) != len(regions) or any(v not in self.values for v in region_order):
            raise ValueError(f"regions_class_order {list(region_order)}: expected one class value per region "
                             f"({len(regions)}) among {', '.join(map(str, self.values))}")
        return Labels(self.values, self.names, regions, region_order)


def binary() -> Labels:
    """One foreground class of value 1 (0/255 label files are read as 0/1: the atrium)."""
    return Labels((1,), ("foreground",))


def from_values(values) -> Labels:
    """The classes found in a data set's labels when nothing declares them: "label 1", ...; a
    single value (1 or 255) is the one binary class."""
    values = sorted(int(v) for v in values if v != 0)
    if len(values) <= 1 or values == [1, 255]:
        return binary()
    return Labels(tuple(values), tuple(f"label {v}" for v in values))


REGION_PATTERN = re.compile(r"^([A-Za-z_][\w-]*)=(\d+(?:,\d+)*)$")


def parse_regions(texts, flag: str = "--regions") -> list[tuple[str, tuple[int, ...]]]:
    """`["whole_tumour=1,2,3", "enhancing=3"]` -> [("whole_tumour", (1, 2, 3)), ("enhancing", (3,))].
    Raises ValueError naming `flag` and the malformed entry."""
    out = []
    for text in texts:
        m = REGION_PATTERN.match(text)
        if not m:
            raise ValueError(f"{flag} {text}: expected NAME=V1,V2,... (e.g. whole_tumour=1,2,3)")
        out.append((m.group(1), tuple(int(v) for v in m.group(2).split(","))))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{flag}: region names must differ, got {' '.join(names)}")
    return out


def scored_structures(labels: Labels, regions=()) -> list[tuple[str, tuple[int, ...]]]:
    """What an evaluation scores: `labels.structures` and the extra `regions` ((name, values)
    pairs, e.g. from --regions) not among them. Raises ValueError naming a region with a value
    that is not a class, or a name already taken."""
    out = list(labels.structures)
    for name, values in regions:
        unknown = [v for v in values if v not in labels.values]
        if unknown:
            raise ValueError(f"region {name} names label value(s) {unknown} that are not classes "
                             f"({', '.join(map(str, labels.values))})")
        if (name, tuple(sorted(values))) in out:
            continue
        if name in (n for n, _ in out):
            raise ValueError(f"region {name}: the name of a class or region already scored; choose another")
        out.append((name, tuple(sorted(values))))
    return out
