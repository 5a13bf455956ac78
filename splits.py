"""Which cases train and which validate: one seeded split, or k folds for cross-validation.

A k-fold split is written and read in nnU-Net v2's own `splits_final.json` format, a JSON list
with one `{"train": [...], "val": [...]}` per fold, so that the folds of a run here and of an
nnU-Net run can be exchanged both ways. Without patient groups the folds are made as nnU-Net
makes them (scikit-learn's shuffled KFold over the sorted case ids): with the same case ids and
`seed=12345`, nnU-Net's default, the folds are nnU-Net's. A single split is the older
`{"train": [...], "val": [...]}` object. Numpy only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from utils import UserError


def make_split(case_ids: list[str], val_fraction: float, seed: int,
               groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Seeded train/validation split; at least one validation case when there are two or more,
    unless `val_fraction` is 0 (every case trains). With `groups` (case id -> patient),
    `val_fraction` of the patients validate, each with all of its cases; one case per patient
    gives the split of no groups."""
    ids = sorted(case_ids)
    groups = groups or {c: c for c in ids}
    patients = sorted(set(groups[c] for c in ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n = len(patients)
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    held = {patients[i] for i in order[:n_val]}
    val = sorted(c for c in ids if groups[c] in held)
    return {"train": [i for i in ids if i not in val], "val": val}


def patient_groups(case_ids: list[str], pattern: str | None, flag: str = "--group_by") -> dict[str, str]:
    """The patient of each case: the first group of `pattern` searched in its id (each case is
    its own patient without a pattern). A pattern that fails to match a case is an error, since a
    case left ungrouped could share a patient with a case in another fold."""
    if pattern is None:
        return {c: c for c in case_ids}
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {pattern!r}: not a regular expression ({e}); e.g. '^(.+)_(ED|ES)$'") from None
    if regex.groups < 1:
        raise UserError(f"{flag} {pattern!r}: has no group; put the patient's part of the case id in "
                        "parentheses, e.g. '^(patient\\d+)_'")
    found = {c: regex.search(c) for c in case_ids}
    unmatched = sorted(c for c, m in found.items() if m is None or m.group(1) is None)
    if unmatched:
        what = "matches no case id" if len(unmatched) == len(case_ids) else "does not match case id(s)"
        raise UserError(f"{flag} {pattern!r}: {what} {', '.join(unmatched[:5])}"
                        f"{' ...' if len(unmatched) > 5 else ''}; its first group must name the patient of every case")
    return {c: m.group(1) for c, m in found.items()}


def kfold_splits(case_ids: list[str], num_folds: int, seed: int, groups: dict[str, str] | None = None,
                 flag: str = "--num_folds") -> list[dict[str, list[str]]]:
    """`num_folds` folds in nnU-Net's format: every case validated in exactly one fold, the
    cases of one patient (`groups`: case id -> patient) always in the same fold.

    The patients, in sorted order, are shuffled by `numpy.random.RandomState(seed)` and cut into
    consecutive runs whose case counts follow KFold's fold sizes (the first `n % k` folds one
    case larger); with one case per patient this is exactly scikit-learn's `KFold(shuffle=True,
    random_state=seed)` over the sorted ids, which nnU-Net uses.
    """
    ids = sorted(case_ids)
    groups = groups or {c: c for c in ids}
    patients = sorted(set(groups.values()))
    if num_folds < 2:
        raise UserError(f"{flag} {num_folds}: cross-validation needs 2 folds or more")
    if num_folds > len(patients):
        what = f"{len(patients)} patients (--group_by)" if len(patients) < len(ids) else f"{len(ids)} cases"
        raise UserError(f"{flag} {num_folds}: more folds than the {what}; use at most {len(patients)}")
    members = {p: [c for c in ids if groups[c] == p] for p in patients}
    order = np.arange(len(patients))
    np.random.RandomState(seed).shuffle(order)
    # Fold k ends after KFold's first k + 1 fold sizes, counted in cases: a patient goes to the
    # next fold when more than half of its cases would lie past that end.
    ends = np.cumsum([len(ids) // num_folds + (k < len(ids) % num_folds) for k in range(num_folds)])
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    k, placed = 0, 0
    for i, p in enumerate(patients[j] for j in order):
        left = len(patients) - i  # patients still to place, this one included
        if folds[k] and k < num_folds - 1 and (placed + len(members[p]) / 2 >= ends[k] or left <= num_folds - 1 - k):
            k += 1  # this fold is full, or each later fold still needs a patient
        folds[k] += members[p]
        placed += len(members[p])
    return [{"train": [c for c in ids if c not in held], "val": sorted(held)} for held in map(set, folds)]


def check_folds(folds: list, case_ids: list[str], where: str) -> list[dict[str, list[str]]]:
    """The folds of a split file, checked against the data: each fold a {"train", "val"} pair of
    lists of known case ids, disjoint, together every case; every case validated exactly once."""
    ids = set(case_ids)
    out = []
    for k, fold in enumerate(folds):
        if not (isinstance(fold, dict) and isinstance(fold.get("train"), list) and isinstance(fold.get("val"), list)
                and all(isinstance(c, str) for c in fold["train"] + fold["val"])):
            raise UserError(f"{where}: fold {k} is not {{\"train\": [...], \"val\": [...]}} of case ids")
        train, val = fold["train"], fold["val"]
        unknown = sorted(set(train + val) - ids)
        if unknown:
            raise UserError(f"{where}: fold {k} names case ids not in the data folder: {', '.join(unknown[:5])}; "
                            "use the split of this data or remove those ids")
        both = sorted(set(train) & set(val))
        if both:
            raise UserError(f"{where}: fold {k} both trains and validates on {', '.join(both[:5])}; "
                            "a case belongs to one side")
        left_out = sorted(ids - set(train) - set(val))
        if left_out:
            raise UserError(f"{where}: fold {k} leaves out {', '.join(left_out[:5])}"
                            f"{' ...' if len(left_out) > 5 else ''}; add them to the split or remove them "
                            "from the data folder")
        if not train:
            raise UserError(f"{where}: fold {k} has no training cases")
        out.append({"train": list(train), "val": list(val)})
    if len(out) > 1:
        seen: dict[str, int] = {}
        for k, fold in enumerate(out):
            for c in fold["val"]:
                if c in seen:
                    raise UserError(f"{where}: case {c} is validated in folds {seen[c]} and {k}; "
                                    "each case belongs to one validation fold")
                seen[c] = k
        never = sorted(ids - set(seen))
        if never:
            raise UserError(f"{where}: case(s) {', '.join(never[:5])} are validated in no fold; "
                            "each case belongs to one validation fold")
    return out


def read_splits(path, case_ids: list[str], flag: str = "--split") -> tuple[list[dict[str, list[str]]], bool]:
    """`(folds, is_kfold)` of a split file: nnU-Net's list of folds (True), or a single
    {"train", "val"} split (False, returned as one fold)."""
    where = f"{flag} {path}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{where}: not a readable JSON split file; expected nnU-Net's splits_final.json "
                        "(a list of {\"train\": [...], \"val\": [...]}) or one such object") from None
    folds = data if isinstance(data, list) else [data]
    if not folds:
        raise UserError(f"{where}: an empty list of folds")
    return check_folds(folds, case_ids, where), isinstance(data, list)


def check_groups(folds: list[dict], groups: dict[str, str], where: str) -> None:
    """Every patient's cases on one side of every fold."""
    for k, fold in enumerate(folds):
        val = set(fold["val"])
        side = {}
        for c in fold["train"] + fold["val"]:
            p, here = groups[c], c in val
            if side.setdefault(p, (here, c))[0] != here:
                raise UserError(f"{where}: fold {k} splits patient {p} ({side[p][1]} and {c}) between training "
                                "and validation; keep a patient's cases together")
