"""What the benchmarks share: the machine's name for the record, a GPU-aware clock barrier,
and the rewrite of one script's own section of BENCHMARKS.md (other sections stay as they are)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def replace_section(path: Path, section: str, heading: str) -> None:
    """Write `section` (whose first line is `heading`, a `## ` line) where the old section
    with that heading was, or append it; everything else in the file stays. Atomic."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(lines: list[str], heading: str, output: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless told not to, put it into `output`."""
    section = "\n".join(lines)
    print("\n" + section)
    if write:
        replace_section(Path(output), section, heading)
        print(f"section written to {output}")
