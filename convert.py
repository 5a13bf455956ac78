"""Convert clinical files into the pipeline's images (rules in conversion.py): a folder of cine
DICOM (one short-axis stack) into a 4D image (T, D, H, W), a 3D one with a single phase; and
Sunnybrook-style contour files into masks on their DICOM slice.

    python convert.py cine --input DICOM_DIR --output cine.nii.gz
    python convert.py contours --dicom_dir DICOM_DIR --contour_dir CONTOUR_DIR --output_dir masks

A bad input is one `error:` line and nothing is written; with several contour files a bad one is
reported, the others are still converted, and the exit status is 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import conversion
from utils import ArgParser, UserError, run_cli


def parse_args(argv=None):
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    cine = commands.add_parser("cine", help="a folder of cine DICOM to a 4D image (T, D, H, W)")
    cine.add_argument("--input", required=True, help="folder of the DICOM files of one cine stack (any suffix)")
    cine.add_argument("--output", required=True,
                      help=f"image to write, ending in {', '.join(conversion.CINE_SUFFIXES)}")
    cine.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    contours = commands.add_parser("contours", help="Sunnybrook contour files to masks on their DICOM slices")
    contours.add_argument("--dicom_dir", required=True,
                          help="folder searched (with subfolders) for IM-0001-NNNN.dcm, the contours' slices")
    contours.add_argument("--contour_dir", required=True,
                          help="folder searched (with subfolders) for IM-0001-NNNN-<kind>contour-manual.txt")
    contours.add_argument("--output_dir", required=True, help="folder to write IM-0001-NNNN-<kind>contour masks into")
    contours.add_argument("--output_format", choices=conversion.MASK_FORMATS, default="nii.gz",
                          help="mask file format (default: %(default)s)")
    contours.add_argument("--overwrite", action="store_true", help="replace masks already in --output_dir")
    return parser.parse_args(argv)


def convert_cine(args) -> None:
    if not Path(args.input).is_dir():
        raise UserError(f"--input {args.input}: no such folder; give the folder of the cine DICOM files")
    output = Path(args.output)
    if not output.name.endswith(conversion.CINE_SUFFIXES):
        raise UserError(f"--output {output}: give a name ending in {', '.join(conversion.CINE_SUFFIXES)}")
    if output.is_dir():
        raise UserError(f"--output {output}: is a folder; give a file name")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output}: exists; pass --overwrite to replace it or choose another name")
    cine = conversion.cine_volume(args.input)
    conversion.write_cine(cine, output)
    for line in cine.report:
        print(line)
    print(f"wrote {output}: {tuple(cine.array.shape)} {'(T, D, H, W)' if cine.array.ndim == 4 else '(D, H, W)'}")


def convert_contours(args) -> None:
    for flag in ("--dicom_dir", "--contour_dir"):
        folder = Path(getattr(args, flag[2:]))
        if not folder.is_dir():
            raise UserError(f"{flag} {folder}: no such folder")
    if Path(args.output_dir).is_file():
        raise UserError(f"--output_dir {args.output_dir}: is a file; give a folder for the masks")
    written, errors = conversion.sunnybrook_masks(args.dicom_dir, args.contour_dir, args.output_dir,
                                                  output_format=args.output_format, overwrite=args.overwrite)
    print(f"wrote {len(written)} mask(s) to {args.output_dir}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "cine":
        convert_cine(args)
    else:
        convert_contours(args)


if __name__ == "__main__":
    run_cli(main)
