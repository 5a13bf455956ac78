"""Shared fixtures and helpers: tiny phantom data sets, a small trained run that finds the atrium
(built once per session), and a way to run a script's `main` in this process as a user runs
it from the shell (exit status, stdout, stderr), without a new interpreter."""
from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic  # noqa: E402
import train  # noqa: E402
from utils import run_cli  # noqa: E402

SHAPES = ((32, 64, 64), (32, 48, 64))  # two in-plane sizes in one data set
# One epoch of one step per stage at the narrowest width: for tests of the command line, where
# the weights do not matter.
TINY_TRAIN = ["--max_epochs", "1", "--locator_max_epochs", "1", "--samples_per_epoch", "3",
              "--locator_samples_per_epoch", "5", "--base_channels", "2", "--padding", "8", "8", "8",
              "--device", "cpu", "--batch_size", "3"]
# Long enough for a model that finds the atrium of held-out tiny phantoms (about 15 s).
TRAINED = ["--base_channels", "4", "--padding", "8", "8", "8", "--locator_max_epochs", "20", "--max_epochs", "10",
           "--samples_per_epoch", "12", "--locator_samples_per_epoch", "12", "--locator_learning_rate", "1e-3",
           "--learning_rate", "1e-3", "--device", "cpu"]


@dataclass
class Run:
    """What a user sees of a script run: its exit status and its output."""
    returncode: int
    stdout: str
    stderr: str


def run_main(main, *args) -> Run:
    """A script's `main(argv)` in this process, behind the same one-line error handling as from
    the shell (`utils.run_cli`)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_cli(lambda: main([str(a) for a in args]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Run(code, out.getvalue(), err.getvalue())


def run_script(script: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    """A script in a new interpreter, for what only a process shows (entry point, signals)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(run, *fragments):
    """A user error: non-zero exit, one `error:` line on stderr naming the fragments, no traceback."""
    assert run.returncode != 0, run.stdout + run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


def assert_nnunet_folds(folds, ids):
    """nnU-Net's format and rules: a list of {"train": [...], "val": [...]} of sorted case ids."""
    assert isinstance(folds, list) and all(set(f) == {"train", "val"} for f in folds)
    for f in folds:
        assert f["train"] == sorted(f["train"]) and f["val"] == sorted(f["val"])
        assert not set(f["train"]) & set(f["val"]) and sorted(f["train"] + f["val"]) == sorted(ids)
    assert sorted(c for f in folds for c in f["val"]) == sorted(ids)  # each case validated exactly once


def train_ok(*args) -> Run:
    run = run_main(train.main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(autouse=True)
def restore_torch_state():
    """train.py's --deterministic switches a process-wide torch setting: put it back."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Four labelled phantoms of two in-plane sizes, with rotated directions and non-zero origins."""
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantom_dataset(root, num_cases=4, shapes=SHAPES, seed=3)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Both stages trained on eight other phantoms (seed 7) until they find the atrium of the
    held-out `tiny_data` (test_inference.py checks that they do)."""
    data = tmp_path_factory.mktemp("train_phantoms")
    synthetic.write_phantom_dataset(data, num_cases=8, shapes=SHAPES, seed=7)
    run = tmp_path_factory.mktemp("trained_run")
    train_ok("--data_dir", data, "--output_dir", run, *TRAINED)
    return run
