"""Long runs: a run that is stopped and resumed ends where an uninterrupted run ends, bit for
bit; a bad --resume is refused; a checkpoint survives a killed writer; Ctrl-C names the resume
command; two processes under torchrun train in step. The slow ones are marked `slow`."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, assert_one_line_error, run_main, train_ok

FLAGS = ["--locator_max_epochs", "1", "--samples_per_epoch", "6", "--locator_samples_per_epoch", "5",
         "--base_channels", "2", "--padding", "8", "8", "8", "--device", "cpu", "--deterministic", "--num_workers", "2"]


def log_rows(run, stage):
    with open(run / stage / "log.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def weights(run, stage):
    return torch.load(run / stage / "latest.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train_ok("--data_dir", tiny_data, "--output_dir", whole, "--max_epochs", "2", *FLAGS)
    train_ok("--data_dir", tiny_data, "--output_dir", halves, "--max_epochs", "1", *FLAGS)
    proc = train_ok("--resume", halves, "--max_epochs", "2")
    assert json.loads((halves / "config.json").read_text())["segmenter"]["max_epochs"] == 2  # the flags it ran with
    assert "segmenter: resuming after epoch 1 of 2" in proc.stdout
    for stage in ("locator", "segmenter"):
        assert log_rows(whole, stage) == log_rows(halves, stage)
        a, b = weights(whole, stage), weights(halves, stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert len(log_rows(halves, "segmenter")) == 2 and (halves / "segmenter" / "curves.png").stat().st_size > 0


def test_resume_refuses_a_finished_or_foreign_folder(trained_run, tmp_path):
    assert_one_line_error(run_main(train.main, "--resume", trained_run, "--max_epochs", "10"), "--resume",
                          "--max_epochs")
    assert_one_line_error(run_main(train.main, "--resume", tmp_path), "--resume", "config.json")


@pytest.mark.slow
def test_killed_checkpoint_writer_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing a large checkpoint: the file on disk is still the old one."""
    path = tmp_path / "latest.pt"
    code = f"""
import sys, torch, time
sys.path.insert(0, {str(ROOT)!r})
from training import save_checkpoint
model = torch.nn.Linear(1, 1)
save_checkpoint({str(path)!r}, model, {{"role": "segmenter", "arch": {{}}}}, epoch=1)
print("saved", flush=True)
big = torch.nn.Linear(4096, 4096 * 8)  # ~0.5 GB to write: long enough to be killed midway
save_checkpoint({str(path)!r}, big, {{"role": "segmenter", "arch": {{}}}}, epoch=2)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    while not list(tmp_path.glob("*.tmp*")) and proc.poll() is None:
        pass  # wait until the second write has started
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1


@pytest.mark.slow
def test_torchrun_two_processes_train_in_step_and_write_one_set_of_files(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--data_dir", str(tiny_data), "--output_dir", str(run), "--max_epochs", "1",
           *FLAGS[:-3], "--num_workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("locator", "segmenter"):
        assert f"{stage}: all 2 processes hold identical weights" in proc.stdout
        assert proc.stdout.count(f"{stage} epoch   1:") == 1  # one process reports and writes
        assert len(log_rows(run, stage)) == 1
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert files == ["config.json", "locator/best.pt", "locator/centres.json", "locator/curves.png",
                     "locator/latest.pt", "locator/log.csv", "segmenter/best.pt", "segmenter/curves.png",
                     "segmenter/latest.pt", "segmenter/log.csv", "split.json"]


@pytest.mark.slow
def test_ctrl_c_stops_with_the_resume_command_and_a_loadable_latest(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(tiny_data), "--output_dir", str(run),
           "--max_epochs", "100000", *FLAGS[:-3]]  # far more than can finish before the signal lands
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("segmenter epoch   2:"):
            break
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "interrupted" in err and f"--resume {run}" in err
    assert torch.load(run / "segmenter" / "latest.pt", weights_only=True)["epoch"] >= 2
