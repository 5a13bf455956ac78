"""Write a synthetic data set with no download: LGE-MRI left-atrium phantoms in the LASC layout
(`<case>/lgemri.nrrd` and `laendo.nrrd`; `--kind la`, the embedded default that tests and the
demo use, generator `synthetic.py`), four-channel brain-tumour phantoms in the MSD Task01 or
nnU-Net v2 layout (`imagesTr/`, `labelsTr/`, `dataset.json`; `--kind brain_tumour`, generator
`synthetic_tumour.py`), or short-axis cardiac cine subjects in the ACDC layout
(`patientXXX/patientXXX_4d.nii.gz`, the ED and ES `_frameYY` images with `_gt` labels, `Info.cfg`,
and `subjects.csv` with their analytic volumes; `--kind cine`, generator `synthetic_cine.py`) from
one of two scanners (`--domain a`, 1.5 T-like, or `b`, 7 T-like) for transfer learning, or CT-like
spine scans in the MSD layout (`imagesTr/`, `labelsTr/` with one instance per vertebra, `dataset.json`
and `instances.csv` flagging the vertebrae the field of view cuts off; `--kind spine`, generator
`synthetic_spine.py`).

    python phantoms.py --out_dir data/phantoms --num_cases 10 --shape 48 128 128 --seed 0
    python phantoms.py --kind brain_tumour --out_dir data/brain_tumour --num_cases 10 --shape 64 96 96 \\
        --layout msd --labels msd --seed 0
    python phantoms.py --kind cine --out_dir data/cine --num_cases 40 --domain a --seed 0
    python phantoms.py --kind cine --out_dir data/cine_b --num_cases 10 --domain b --first_id 41 --seed 0
    python phantoms.py --kind spine --out_dir data/spine --num_cases 20 --spacing 2.5 0.7 0.7 --shape 40 112 112
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import synthetic
import synthetic_cine
import synthetic_spine
import synthetic_tumour
from utils import ArgParser, UserError, run_cli

# Per kind: the generator's smallest side, default shape, spacing (mm, array order) and folder.
# cine draws each subject's stack itself: no shape or spacing.
KINDS = {"la": (synthetic.MIN_SIDE, [48, 128, 128], [0.625, 0.625, 0.625], "data/phantoms"),
         "brain_tumour": (synthetic_tumour.MIN_SIDE, [64, 96, 96], [1.0, 1.0, 1.0], "data/brain_tumour"),
         "cine": (None, None, None, "data/cine"),
         "spine": (synthetic_spine.MIN_SIDE, [96, 80, 80], [1.0, 1.0, 1.0], "data/spine")}
CINE_FRAMES = 12  # --num_frames' default


def _folder_cases(out_dir: Path) -> set[str]:
    """Case folders of `out_dir`: LASC `<case>/lgemri.nrrd` and ACDC `<patient>/Info.cfg`."""
    return {p.parent.name for pattern in ("*/lgemri.nrrd", "*/Info.cfg") for p in out_dir.glob(pattern)}


def _existing_cases(out_dir: Path) -> list[str]:
    """Ids of the cases already in `out_dir`, of any kind: LASC and ACDC folders and MSD/nnU-Net
    images (`imagesTr/<case>.nii.gz` or `<case>_0000.nii.gz`, ...), since a reader of the folder
    would mix or hide them."""
    if not out_dir.is_dir():
        return []
    ids = _folder_cases(out_dir)
    ids |= {re.sub(r"_\d{4}$", "", p.name[: -len(".nii.gz")]) for p in out_dir.glob("imagesTr/*.nii.gz")}
    return sorted(ids)


def main(argv=None) -> None:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=list(KINDS), default="la",
                        help="left-atrium LGE-MRI phantoms (LASC layout), brain-tumour phantoms "
                             "(MSD Task01-style, 4 channels), short-axis cardiac cine subjects (ACDC layout) "
                             "or CT-like spine scans with vertebra instances (MSD layout) "
                             "(default: %(default)s)")
    parser.add_argument("--out_dir", default=None,
                        help="folder to write the cases into (default: data/phantoms for la, "
                             "data/brain_tumour for brain_tumour, data/cine for cine, data/spine for spine)")
    parser.add_argument("--num_cases", type=int, default=10,
                        help="number of cases (cine: of subjects) (default: %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                        help="volume shape; repeat the flag to cycle over several shapes "
                             "(default: 48 128 128 for la, 64 96 96 for brain_tumour, 96 80 80 for spine (D along "
                             "the spine); not for cine, which draws "
                             "each subject's stack: up to 12 slices, 112-176 pixels a side)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"),
                        help="voxel spacing in mm, array order (default: 0.625 0.625 0.625 for la, "
                             "1 1 1 for brain_tumour and spine; not for cine, which draws 6-10 mm slices of "
                             "1.2-1.9 mm pixels)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; case i depends only on (seed, i), cine subject n on (seed, n, "
                             "--domain) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace cases already in --out_dir")
    tumour = parser.add_argument_group("brain_tumour only")
    # None marks "not given", so that passing them with another kind can be refused.
    tumour.add_argument("--layout", choices=["msd", "nnunet"], default=None,
                        help="msd: imagesTr/<case>.nii.gz, one 4D image; nnunet: imagesTr/<case>_000C.nii.gz, "
                             "one 3D file per channel (default: msd)")
    tumour.add_argument("--labels", choices=["msd", "brats2021"], default=None,
                        help="msd: 1 edema, 2 non-enhancing, 3 enhancing; brats2021: 1 necrotic core, "
                             "2 edema, 4 enhancing (default: msd)")
    cine = parser.add_argument_group("cine only")
    cine.add_argument("--domain", choices=list(synthetic_cine.DOMAINS), default=None,
                      help="the scanner: a, 1.5 T-like (bSSFP contrast, low noise, mild bias); b, 7 T-like "
                           "(lower blood-myocardium contrast, more noise, strong inhomogeneity with dark bands) "
                           "(default: a)")
    cine.add_argument("--num_frames", type=int, default=None,
                      help=f"frames per cardiac cycle, {synthetic_cine.MIN_FRAMES} to {synthetic_cine.MAX_FRAMES} "
                           f"(default: {CINE_FRAMES})")
    cine.add_argument("--first_id", type=int, default=None,
                      help="number of the first subject, patientXXX; give another range for a disjoint "
                           "test set (default: 1)")
    args = parser.parse_args(argv)
    min_side, default_shape, default_spacing, default_dir = KINDS[args.kind]
    # None marks "not given" for the flags of one kind, so that passing them with another is refused.
    for flag, value, kind in (("--layout", args.layout, "brain_tumour"), ("--labels", args.labels, "brain_tumour"),
                              ("--domain", args.domain, "cine"), ("--num_frames", args.num_frames, "cine"),
                              ("--first_id", args.first_id, "cine")):
        if value is not None and args.kind != kind:
            raise UserError(f"{flag} {value}: applies to --kind {kind} only; drop it or pass --kind {kind}")
    if args.num_cases < 1:
        raise UserError(f"--num_cases {args.num_cases}: must be at least 1")
    if args.kind == "cine":
        for flag, value in (("--shape", args.shape and args.shape[0]), ("--spacing", args.spacing)):
            if value:
                raise UserError(f"{flag} {' '.join(map(str, value))}: --kind cine draws each subject's stack "
                                "(up to 12 slices of 6-10 mm, 1.2-1.9 mm pixels); drop it")
        num_frames = CINE_FRAMES if args.num_frames is None else args.num_frames
        if not synthetic_cine.MIN_FRAMES <= num_frames <= synthetic_cine.MAX_FRAMES:
            raise UserError(f"--num_frames {num_frames}: expected {synthetic_cine.MIN_FRAMES} to "
                            f"{synthetic_cine.MAX_FRAMES}")
        first_id = 1 if args.first_id is None else args.first_id
        if first_id < 1:
            raise UserError(f"--first_id {first_id}: must be at least 1 (patient001)")
        if first_id + args.num_cases - 1 > 999:
            raise UserError(f"--first_id {first_id}: {args.num_cases} subjects would run past patient999; "
                            "choose a smaller --first_id or --num_cases")
    else:
        shapes = [tuple(s) for s in args.shape or [default_shape]]
        spacing = tuple(args.spacing or default_spacing)
        for s in shapes:
            if min(s) < min_side:
                raise UserError(f"--shape {' '.join(map(str, s))}: every axis needs at least {min_side} voxels"
                                + ("" if args.kind == "la" else f" for --kind {args.kind}"))
        if min(spacing) <= 0:
            raise UserError(f"--spacing {' '.join(map(str, spacing))}: must be positive")
    out_dir = Path(args.out_dir or default_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir}: is a file; pass a folder")
    existing = _existing_cases(out_dir)
    if existing and not args.overwrite:
        raise UserError(f"--out_dir {out_dir}: already holds {len(existing)} cases; "
                        "pass --overwrite to replace them or choose another folder")
    if args.kind == "cine":
        ids = synthetic_cine.write_cine_dataset(out_dir, args.num_cases, args.seed, args.domain or "a", num_frames,
                                                first_id)
        written = set(ids)
    elif args.kind == "la":
        ids = synthetic.write_phantom_dataset(out_dir, args.num_cases, shapes, spacing, args.seed)
        written = set(ids)
    elif args.kind == "spine":
        ids = synthetic_spine.write_spine_dataset(out_dir, args.num_cases, shapes, spacing, args.seed)
        written = {f"imagesTr/{c}.nii.gz" for c in ids}
    else:
        layout = args.layout or "msd"
        ids = synthetic_tumour.write_tumour_dataset(out_dir, args.num_cases, shapes, spacing, args.seed,
                                                    layout=layout, labels=args.labels or "msd")
        # Files, not ids: after a switch of --layout, BRATS_000.nii.gz beside BRATS_000_0000.nii.gz
        # is a stale case although its id was written.
        written = {f"imagesTr/{c}.nii.gz" for c in ids} if layout == "msd" else \
            {f"imagesTr/{c}_{k:04d}.nii.gz" for c in ids for k in range(len(synthetic_tumour.CHANNELS))}
    # Cases of another kind are stale too: a reader takes imagesTr/ and ignores case folders.
    on_disk = _folder_cases(out_dir) | {f"imagesTr/{p.name}" for p in out_dir.glob("imagesTr/*.nii.gz")}
    stale = sorted(on_disk - written)
    if stale:
        print(f"warning: {out_dir} still holds {len(stale)} older cases ({stale[0]}, ...) "
              "that this run did not write", file=sys.stderr)
    print(f"wrote {len(ids)} case(s) to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
