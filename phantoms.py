"""Write a synthetic data set with no download: LGE-MRI left-atrium phantoms in the LASC layout
(`<case>/lgemri.nrrd` and `laendo.nrrd`; `--kind la`, the embedded default that tests and the
demo use, generator `synthetic.py`), or four-channel brain-tumour phantoms in the MSD Task01 or
nnU-Net v2 layout (`imagesTr/`, `labelsTr/`, `dataset.json`; `--kind brain_tumour`, generator
`synthetic_tumour.py`).

    python phantoms.py --out_dir data/phantoms --num_cases 10 --shape 48 128 128 --seed 0
    python phantoms.py --kind brain_tumour --out_dir data/brain_tumour --num_cases 10 --shape 64 96 96 \\
        --layout msd --labels msd --seed 0
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import synthetic
import synthetic_tumour
from utils import ArgParser, UserError, run_cli

# Per kind: the generator's smallest side, default shape, spacing (mm, array order) and folder.
KINDS = {"la": (synthetic.MIN_SIDE, [48, 128, 128], [0.625, 0.625, 0.625], "data/phantoms"),
         "brain_tumour": (synthetic_tumour.MIN_SIDE, [64, 96, 96], [1.0, 1.0, 1.0], "data/brain_tumour")}


def _existing_cases(out_dir: Path) -> list[str]:
    """Ids of the cases already in `out_dir`, of either kind: LASC folders and MSD/nnU-Net images
    (`imagesTr/<case>.nii.gz` or `<case>_0000.nii.gz`, ...), since a reader of the folder would
    mix or hide them."""
    if not out_dir.is_dir():
        return []
    ids = {p.parent.name for p in out_dir.glob("*/lgemri.nrrd")}
    ids |= {re.sub(r"_\d{4}$", "", p.name[: -len(".nii.gz")]) for p in out_dir.glob("imagesTr/*.nii.gz")}
    return sorted(ids)


def main(argv=None) -> None:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=list(KINDS), default="la",
                        help="left-atrium LGE-MRI phantoms (LASC layout) or brain-tumour phantoms "
                             "(MSD Task01-style, 4 channels) (default: %(default)s)")
    parser.add_argument("--out_dir", default=None,
                        help="folder to write the cases into (default: data/phantoms for la, "
                             "data/brain_tumour for brain_tumour)")
    parser.add_argument("--num_cases", type=int, default=10, help="number of cases (default: %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                        help="volume shape; repeat the flag to cycle over several shapes "
                             "(default: 48 128 128 for la, 64 96 96 for brain_tumour)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"),
                        help="voxel spacing in mm, array order (default: 0.625 0.625 0.625 for la, "
                             "1 1 1 for brain_tumour)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; case i depends only on (seed, i) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace cases already in --out_dir")
    tumour = parser.add_argument_group("brain_tumour only")
    # None marks "not given", so that passing them with --kind la can be refused.
    tumour.add_argument("--layout", choices=["msd", "nnunet"], default=None,
                        help="msd: imagesTr/<case>.nii.gz, one 4D image; nnunet: imagesTr/<case>_000C.nii.gz, "
                             "one 3D file per channel (default: msd)")
    tumour.add_argument("--labels", choices=["msd", "brats2021"], default=None,
                        help="msd: 1 edema, 2 non-enhancing, 3 enhancing; brats2021: 1 necrotic core, "
                             "2 edema, 4 enhancing (default: msd)")
    args = parser.parse_args(argv)
    min_side, default_shape, default_spacing, default_dir = KINDS[args.kind]
    if args.kind == "la":
        for flag, value in (("--layout", args.layout), ("--labels", args.labels)):
            if value is not None:
                raise UserError(f"{flag} {value}: applies to --kind brain_tumour only; drop it or pass "
                                "--kind brain_tumour")
    shapes = args.shape or [default_shape]
    spacing = args.spacing or default_spacing
    if args.num_cases < 1:
        raise UserError(f"--num_cases {args.num_cases}: must be at least 1")
    for s in shapes:
        if min(s) < min_side:
            raise UserError(f"--shape {' '.join(map(str, s))}: every axis needs at least {min_side} voxels"
                            + (" for --kind brain_tumour" if args.kind == "brain_tumour" else ""))
    if min(spacing) <= 0:
        raise UserError(f"--spacing {' '.join(map(str, spacing))}: must be positive")
    out_dir = Path(args.out_dir or default_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir}: is a file; pass a folder")
    existing = _existing_cases(out_dir)
    if existing and not args.overwrite:
        raise UserError(f"--out_dir {out_dir}: already holds {len(existing)} cases; "
                        "pass --overwrite to replace them or choose another folder")
    shapes = [tuple(s) for s in shapes]
    if args.kind == "la":
        ids = synthetic.write_phantom_dataset(out_dir, args.num_cases, shapes, tuple(spacing), args.seed)
        written = set(ids)
    else:
        layout = args.layout or "msd"
        ids = synthetic_tumour.write_tumour_dataset(out_dir, args.num_cases, shapes, tuple(spacing), args.seed,
                                                    layout=layout, labels=args.labels or "msd")
        # Files, not ids: after a switch of --layout, BRATS_000.nii.gz beside BRATS_000_0000.nii.gz
        # is a stale case although its id was written.
        written = {f"imagesTr/{c}.nii.gz" for c in ids} if layout == "msd" else \
            {f"imagesTr/{c}_{k:04d}.nii.gz" for c in ids for k in range(len(synthetic_tumour.CHANNELS))}
    # Cases of the other kind are stale too: a reader takes imagesTr/ and ignores LASC folders.
    on_disk = {p.parent.name for p in out_dir.glob("*/lgemri.nrrd")} \
        | {f"imagesTr/{p.name}" for p in out_dir.glob("imagesTr/*.nii.gz")}
    stale = sorted(on_disk - written)
    if stale:
        print(f"warning: {out_dir} still holds {len(stale)} older cases ({stale[0]}, ...) "
              "that this run did not write", file=sys.stderr)
    print(f"wrote {len(ids)} case(s) to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
