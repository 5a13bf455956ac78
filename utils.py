"""Small shared helpers: the user-error type and the one-line error exit, atomic file
writes, checkpoint save/load with validation, seeding and device choice."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "la-seg-v1"


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


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, **extra) -> None:
    """Save `{"format", "model": state_dict, "config": config, **extra}` atomically.

    `config` holds everything that rebuilds the model and its pre-processing, so a
    checkpoint alone is enough for `predict.py`.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "model": state, "config": config, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, role: str | None = None, flag: str = "checkpoint") -> dict:
    """Load and validate one of our checkpoints (weights only: no pickled code runs).

    `role` ("locator" or "segmenter") is checked against the checkpoint's own record, so a
    segmenter passed as the locator is caught before it produces nonsense.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; pass the best.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {path}: not a readable checkpoint of this repository ({reason[:120]}); "
                        "pass a best.pt or latest.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT \
            or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{flag} {path}: not a checkpoint written by this repository's train.py "
                        "(no model/config record); pass a best.pt or latest.pt from a run folder")
    if role is not None and ckpt["config"].get("role") != role:
        raise UserError(f"{flag} {path}: holds a {ckpt['config'].get('role')} model, expected the "
                        f"{role}; pass <run>/{role}/best.pt")
    return ckpt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random state a training run draws from (Python, NumPy, torch CPU and CUDA), in
    types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"python": [version, list(internal), py_gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
             pos, has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def set_cpu_threads() -> None:
    """Give torch all cores when no other process competes (data loading is in-process)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


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


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision on a GPU: bf16 where it has it (float32's range, no loss scaling), else
    fp16. CPUs run float32 (autocast off); the value is then unused."""
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last 3D on CPU, contiguous elsewhere. On 2 CPU cores (torch 2.13) a training
    step was 1.6x faster channels-last at 3x1x48x64x64 on an idle machine, 1.05x and 1.23x at
    1x1x32x64x64 on a loaded one, but 1.13x slower at 1x1x32x64x64 on an idle one
    (benchmarks/bench_train.py): a gain at train.py's batch of 3, not at every size."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
