"""Shared fixtures: a tiny phantom dataset and a tiny trained run, built once per session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import phantoms  # noqa: E402

TINY_TRAIN = ["--max_epochs", "1", "--locator_max_epochs", "1", "--samples_per_epoch", "3",
              "--locator_samples_per_epoch", "5", "--base_channels", "2", "--padding", "8", "8", "8",
              "--device", "cpu", "--batch_size", "3"]


def run_script(script: str, *args, cwd=ROOT):
    """Run one of the repository's scripts; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc, *fragments):
    """A user error: non-zero exit, one `error:` line on stderr naming the fragments, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Four labelled phantoms of two in-plane sizes, with rotated directions and non-zero origins."""
    root = tmp_path_factory.mktemp("phantoms")
    phantoms.write_phantom_dataset(root, num_cases=4, shapes=((32, 64, 64), (32, 48, 64)), seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """Both stages trained for one epoch on `tiny_data` (weights are not meant to be good)."""
    run = tmp_path_factory.mktemp("run")
    proc = run_script("train.py", "--data_dir", tiny_data, "--output_dir", run, *TINY_TRAIN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run
