"""Write a synthetic LGE-MRI phantom data set in the LASC layout (`<case>/lgemri.nrrd` and
`laendo.nrrd`): the embedded default that tests and the demo use, so the whole pipeline runs
with no download. The generator is `synthetic.py`.

    python phantoms.py --out_dir data/phantoms --num_cases 10 --shape 48 128 128 --seed 0
"""
from __future__ import annotations

import sys
from pathlib import Path

from synthetic import MIN_SIDE, write_phantom_dataset
from utils import ArgParser, UserError, run_cli


def main(argv=None) -> None:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="data/phantoms",
                        help="folder to write the cases into (default: %(default)s)")
    parser.add_argument("--num_cases", type=int, default=10, help="number of cases (default: %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                        help="volume shape; repeat the flag to cycle over several shapes "
                             "(default: 48 128 128)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.625, 0.625, 0.625],
                        metavar=("SZ", "SY", "SX"),
                        help="voxel spacing in mm, array order (default: 0.625 0.625 0.625)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; case i depends only on (seed, i) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace cases already in --out_dir")
    args = parser.parse_args(argv)
    shapes = args.shape or [[48, 128, 128]]
    if args.num_cases < 1:
        raise UserError(f"--num_cases {args.num_cases}: must be at least 1")
    for s in shapes:
        if min(s) < MIN_SIDE:
            raise UserError(f"--shape {' '.join(map(str, s))}: every axis needs at least {MIN_SIDE} voxels")
    if min(args.spacing) <= 0:
        raise UserError(f"--spacing {' '.join(map(str, args.spacing))}: must be positive")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir}: is a file; pass a folder")
    existing = sorted(p.name for p in out_dir.glob("*/lgemri.nrrd")) if out_dir.is_dir() else []
    if existing and not args.overwrite:
        raise UserError(f"--out_dir {out_dir}: already holds {len(existing)} cases; "
                        "pass --overwrite to replace them or choose another folder")
    ids = write_phantom_dataset(out_dir, args.num_cases, [tuple(s) for s in shapes], tuple(args.spacing), args.seed)
    stale = sorted(set(p.parent.name for p in out_dir.glob("*/lgemri.nrrd")) - set(ids))
    if stale:
        print(f"warning: {out_dir} still holds {len(stale)} older cases ({stale[0]}, ...) "
              "that this run did not write", file=sys.stderr)
    print(f"wrote {len(ids)} case(s) to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
