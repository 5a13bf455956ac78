"""The epoch loop both stages of train.py share: optimiser, plateau scheduler, warm-up, mixed
precision, validation, CSV log and curves, checkpoints, exact resume, and the few lines that
make it run under `torchrun` (DistributedDataParallel: every process trains on its share of
each epoch's samples and validation cases, gradients and scores are averaged across them, and
only rank 0 writes files)."""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from losses import BoundarySchedule, SegmentationLoss
from models import count_parameters, describe
from utils import UserError, atomic_write, autocast_dtype, memory_format, rng_state, save_checkpoint, set_rng_state

LOG_COLUMNS = ["epoch", "train_loss", "val_dice", "learning_rate", "boundary_weight", "seconds"]


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def init_distributed(device_name: str) -> None:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE and LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")


def sum_across(*values: float) -> list[float]:
    """Element-wise sums of `values` over all processes (the values themselves alone)."""
    if rank_and_size()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class RankShare(torch.utils.data.Dataset):
    """Samples rank, rank + size, ... of `dataset`, wrapped round so that every process gets
    the same number of them (DDP needs equal step counts)."""

    def __init__(self, dataset, rank: int, size: int):
        self.dataset, self.rank, self.size = dataset, rank, size
        self.count = -(-len(dataset) // size)

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        return self.dataset[(self.rank + k * self.size) % len(self.dataset)]


def read_log(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def write_log(path: Path, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([LOG_COLUMNS, *rows])
    atomic_write(path, write)


def plot_curves(rows, path: Path) -> None:
    """curves.png: training loss and validation Dice per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r[0]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [float(r[1]) for r in rows], label="training loss")
    if any(r[2] for r in rows):
        ax.plot([e for e, r in zip(epochs, rows) if r[2]], [float(r[2]) for r in rows if r[2]], label="validation Dice")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def fit(name, model, train_set, validate, settings, args, run_dir: Path, config: dict, device,
        resume: dict | None = None) -> Path:
    """Train `model` for the stage `name`; returns the path of its best checkpoint.

    train_set: items (image, label[, distance_map]), each (1, D, H, W), with an EpochSampler at
        `train_set.sampler`. validate(model, share) -> list of per-case validation Dice over
        this process's share of the validation cases (`share(ids)` picks it).
    resume: the stage's latest.pt; training goes on from the epoch after it.
    """
    rank, size = rank_and_size()
    criterion = SegmentationLoss(config["loss"], args.focal_alpha, args.focal_gamma, args.squared_dice)
    schedule = BoundarySchedule(args.boundary_schedule, args.boundary_step, args.boundary_floor, args.boundary_start_dice)
    fmt = memory_format(device)
    model.to(device, memory_format=fmt)
    if resume is None:  # every process draws the same batch, so all start from the same weights
        train_set.sampler.set_epoch(1)
        batch = torch.stack([train_set[j][0] for j in range(min(settings.batch_size, len(train_set)))])
        model.unit_variance_init(batch.to(device, memory_format=fmt))
    net = model
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    loader = torch.utils.data.DataLoader(RankShare(train_set, rank, size), batch_size=settings.batch_size,
                                         shuffle=False, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=settings.patience, factor=settings.reduce)
    amp, amp_dtype = device.type == "cuda", autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    # Adam's first steps are nearly sign updates; in a V-Net without normalisation they move
    # every 5x5x5 filter coherently and can blow the logits up into an all-background output.
    # A short linear warm-up avoids that (seen at --base_channels 8, lr 3e-4 on the phantoms).
    warmup_steps = round(args.warmup_epochs * len(loader))
    stage_dir = run_dir / name
    log_path = stage_dir / "log.csv"
    first, best, rows = 1, -math.inf, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        schedule.load_state_dict(resume["boundary_schedule"])
        scaler.load_state_dict(resume.get("scaler", {}))
        set_rng_state(resume["rng"])
        first, best = resume["epoch"] + 1, resume["best_dice"]
        rows = [r for r in read_log(log_path) if int(r[0]) < first] if log_path.exists() else []
        print(f"{name}: resuming after epoch {resume['epoch']} of {settings.max_epochs}")
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_log(log_path, rows)
        print(f"{name} {describe(config['arch'])}: parameters: {count_parameters(model):,}; {config['loss']} loss, "
              f"{settings.max_epochs} epochs of {settings.samples} samples" + (f" over {size} processes" if size > 1 else ""))
    step = (first - 1) * len(loader)
    epoch = first
    try:
        for epoch in range(first, settings.max_epochs + 1):
            t0 = time.time()
            train_set.sampler.set_epoch(epoch)
            net.train()
            losses = []
            weight = schedule.weight
            try:
                for image, label, *distance in tqdm(loader, desc=f"{name} {epoch}/{settings.max_epochs}", leave=False,
                                                    disable=rank != 0 or not sys.stderr.isatty()):
                    image = image.to(device, non_blocking=True, memory_format=fmt)
                    label = label.to(device, non_blocking=True)
                    distance = distance[0].to(device, non_blocking=True) if distance else None
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                        logits = net(image)
                    loss = criterion(logits.float(), label, distance, weight)
                    if not torch.isfinite(loss):
                        raise UserError(f"{name} epoch {epoch}: the loss became {loss.item()}; training stopped, the last "
                                        f"good checkpoint is {stage_dir / 'latest.pt'}; lower --learning_rate and retrain")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    step += 1
                    if step <= warmup_steps:
                        for group in opt.param_groups:
                            group["lr"] = settings.lr * step / warmup_steps
                    scaler.step(opt)
                    scaler.update()
                    losses.append(loss.item())
            except torch.OutOfMemoryError:
                flag = "--locator_batch_size" if name == "locator" else "--batch_size (or --patch_size)"
                raise UserError(f"{name}: out of {device.type} memory with batches of {settings.batch_size}; "
                                f"lower {flag}") from None
            loss_sum, loss_count = sum_across(float(np.sum(losses)), len(losses))
            train_loss = loss_sum / loss_count
            model.eval()
            scores = validate(model, lambda ids: ids[rank::size])
            score_sum, score_count = sum_across(float(np.sum(scores)), len(scores))
            val_dice = score_sum / score_count if score_count else None
            score = val_dice if val_dice is not None else 1 - train_loss
            sched.step(score)
            schedule.step(score)
            best_before, best = best, max(best, score)
            rows.append([epoch, f"{train_loss:.5f}", "" if val_dice is None else f"{val_dice:.5f}",
                         f"{opt.param_groups[0]['lr']:.3g}", f"{weight:.4g}", f"{time.time() - t0:.1f}"])
            if rank == 0:
                state = {"epoch": epoch, "best_dice": best, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "boundary_schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}
                write_log(log_path, rows)
                if score > best_before:
                    save_checkpoint(stage_dir / "best.pt", model, config, **state)
                if epoch % args.save_after_epochs == 0:
                    save_checkpoint(stage_dir / f"epoch_{epoch:04d}.pt", model, config, **state)
                save_checkpoint(stage_dir / "latest.pt", model, config, **state)  # last: it marks the epoch as done
                plot_curves(rows, stage_dir / "curves.png")
                print(f"{name} epoch {epoch:>3}: loss {train_loss:.4f}  val dice {rows[-1][2] or '-'}  ({rows[-1][-1]} s)",
                      flush=True)
    except KeyboardInterrupt:  # latest.pt is the last finished epoch, from which --resume is exact
        done = f"{stage_dir / 'latest.pt'} holds epoch {epoch - 1}" if epoch > first or first > 1 else "no epoch finished"
        raise UserError(f"{name} interrupted in epoch {epoch}: {done}; continue with "
                        f"python train.py --resume {run_dir}") from None
    if size > 1:
        check_in_sync(model, name)
        dist.barrier()  # the best checkpoint exists for every process once rank 0 has written it
    return stage_dir / "best.pt"


def check_in_sync(model, name: str) -> None:
    """After DDP training every process must hold the very same weights; compare them."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(rank_and_size()[1])]
    dist.all_gather(gathered, flat.to(next(model.parameters()).device))
    if not all(torch.equal(g.cpu(), flat) for g in gathered):
        raise RuntimeError(f"{name}: the processes' weights differ after training")
    if is_main():
        print(f"{name}: all {len(gathered)} processes hold identical weights")
