"""Small shared helpers with no deep-learning dependency: the user-error type and the one-line
error exit of every script, argparse with one-line errors and real booleans, and atomic writes
of files, JSON and CSV tables."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A mistake of the user's (bad path, flag or file). Shown as one line, no traceback."""


def run_cli(main) -> None:
    """Run a script's `main()`, turning a UserError into `error: ...` and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgParser(argparse.ArgumentParser):
    """argparse with its errors as one `error: ...` line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_bool(text: str) -> bool:
    """argparse type for a boolean flag that may also be spelled with a value, as the
    reference's `--attention_module False` / `--attention_module True` (a bare string
    "False" would be truthy)."""
    value = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path`.

    A crash mid-write leaves `path` as it was (absent, or the previous version). The
    temporary name keeps the file's extensions because SimpleITK picks its format from them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def write_csv(path: str | Path, rows: list[dict], columns=None) -> bool:
    """Write rows of dicts (the header: `columns`, else the first row's keys) as CSV, atomically,
    unless the file already holds exactly these bytes: a rerun that changes nothing then leaves
    it untouched, mtime included. True if written."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns or rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode()
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return True
