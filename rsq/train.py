"""Training an RS-Net: every step runs the same images at every resolution, then MRED.

The whole flow, top to bottom: set-up (distributed, device, run folder), data, model (convert,
optionally quantize, optionally start from a checkpoint), optimizer, then epochs of
``train_one_epoch`` + ``evaluate``, with atomic checkpoints that a killed run resumes from.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import FORMAT, VERSION, atomic_save, build_model, load_checkpoint, quant_config
from .config import TrainConfig, save_config
from .convert import mode_state, using_mode
from .data import build_data
from .data.multires import resize_batch
from .distill import EnsembleWeights, mred_loss
from .errors import RsqError
from .evaluate import autocast_for, bits_label, evaluate, format_table, result_rows
from .models import create_model
from .results import write_json_atomic, write_metrics_csv

RUN_FILES = ("checkpoint.pt", "results.json", "config.toml", "metrics.csv")


# ----------------------------------------------------------------------------- set-up
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on the CPU, NCCL on CUDA."""
    cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise RsqError("--device cuda was asked for but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an existing run unless --resume or --overwrite says so."""
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise RsqError(f"--resume {out}: no checkpoint.pt there to resume from")
        return
    if out.exists() and not out.is_dir():
        raise RsqError(f"output path {out} exists and is not a folder")
    if holds_run and not overwrite:
        raise RsqError(f"output folder {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero; a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Parameters marked ``_rsq_no_weight_decay`` (alpha, quantizer steps) get none."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if getattr(p, "_rsq_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AllResolutions(nn.Module):
    """One forward = the same batch at every resolution, each with its own BN set.

    Wrapping the per-resolution passes in a single forward lets DDP see one forward and one
    backward per step; the downsampling runs on the batch's device.
    """

    def __init__(self, model: nn.Module, resolutions: list[int], channels_last: bool = False):
        super().__init__()
        self.model, self.resolutions, self.channels_last = model, resolutions, channels_last
        self.compiled = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        net = self.compiled or self.model
        for r in self.resolutions:
            xr = resize_batch(x, r)
            if self.channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            with using_mode(self.model, r):
                logits.append(net(xr))
        return logits


# ----------------------------------------------------------------------------- model
def build_training_model(config: TrainConfig, num_classes: int, in_chans: int, sample: torch.Tensor,
                         device: torch.device) -> nn.Module:
    model = create_model(config.model, num_classes, in_chans, resolutions=config.resolutions)
    if config.init:
        init = load_checkpoint(config.init)
        missing = set(config.resolutions) - set(init["resolutions"])
        if missing:
            raise RsqError(f"--init {config.init} was trained for resolutions {init['resolutions']}, "
                           f"not {sorted(missing, reverse=True)}")
        source = build_model(init)
        if (init["num_classes"], init["in_chans"]) != (num_classes, in_chans):
            raise RsqError(f"--init {config.init} has {init['num_classes']} classes / {init['in_chans']} channels; "
                           f"the data has {num_classes} / {in_chans}")
        state = {k: v for k, v in source.state_dict().items() if k in model.state_dict()}
        model.load_state_dict(state, strict=False)
    model.to(device)
    if config.quantized:
        from .quantize import quantize_

        quantize_(model, quant_config(config))
        model.to(device)
        # Data-dependent quantizer initialisation happens on the first forward; do it here,
        # before DDP broadcasts rank 0's state, so every rank starts from the same steps.
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for r in config.resolutions:
                with using_mode(model, r):
                    model(resize_batch(sample.to(device), r))
        model.train(was_training)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def load_teacher(path: str, config: TrainConfig, device: torch.device) -> nn.Module:
    ckpt = load_checkpoint(path)
    missing = set(config.resolutions) - set(ckpt["resolutions"])
    if missing:
        raise RsqError(f"--teacher {path} was trained for resolutions {ckpt['resolutions']}, not {sorted(missing)}")
    teacher = build_model(ckpt).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------- loop
def train_one_epoch(epoch, start_step, runner, ensemble, teacher, optimizer, data, config, dist_info, device,
                    total_steps, warmup_steps, save_checkpoint) -> dict:
    """One pass over the training data; ``save_checkpoint(epoch, next_step)`` every N steps."""
    runner.train()
    steps = len(data)
    totals = torch.zeros(4, device=device)
    counted = 0
    bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not dist_info.main, mininterval=2.0, leave=False, file=sys.stderr)
    for step, (x, y) in enumerate(data.batches(epoch, start_step), start=start_step):
        global_step = epoch * steps + step
        lr = lr_at(global_step, total_steps, warmup_steps, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(device, config.amp):
            logits = runner(x)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = []
                    for r in config.resolutions:
                        with using_mode(teacher, r):
                            teacher_logits.append(teacher(resize_batch(x, r)))
        parts = mred_loss(logits, y, ensemble, config.distill, config.label_smoothing, teacher_logits)
        loss_value = parts.total.detach()
        if not torch.isfinite(loss_value):
            raise Divergence(epoch, step, global_step, loss_value.item())
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if dist_info.world_size > 1 and ensemble.alpha.grad is not None:
            dist.all_reduce(ensemble.alpha.grad)
            ensemble.alpha.grad /= dist_info.world_size
        optimizer.step()
        totals += torch.stack([loss_value, parts.ce, parts.ens, parts.kd])
        counted += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value.item():.3f}", lr=f"{lr:.4f}")
        if config.checkpoint_every and (global_step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(epoch, step + 1)
    bar.close()
    means = (totals / max(1, counted)).tolist()
    return dict(zip(("loss", "loss_ce", "loss_ens", "loss_kd"), means))


class Divergence(RsqError):
    def __init__(self, epoch, step, global_step, value):
        super().__init__(f"loss became {value} at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}); "
                         f"stopping, the last good checkpoint is kept")


# ----------------------------------------------------------------------------- the run
def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    dist_info, device = setup_distributed(config.device)
    out = Path(config.out)
    resumed = None
    if dist_info.main:
        prepare_run_dir(out, resume, overwrite)
    if resume:
        resumed = load_checkpoint(out / "checkpoint.pt")
        if resumed.get("complete"):
            raise RsqError(f"run {out} already finished all {config.epochs} epochs; nothing to resume")
    seed_everything(config.seed, dist_info.rank)
    torch.set_float32_matmul_precision("high")

    data = build_data(config, dist_info.rank, dist_info.world_size, device)
    sample, _ = next(iter(data.train.batches(0)))
    model = build_training_model(config, data.num_classes, data.in_chans, sample, device)
    ensemble = EnsembleWeights(len(config.resolutions)).to(device)
    teacher = load_teacher(config.teacher, config, device) if config.teacher else None
    runner = AllResolutions(model, config.resolutions, config.channels_last)
    if config.compile:
        import torch._dynamo as dynamo

        # One static graph per resolution; the default limit of 8 silently falls back to eager.
        dynamo.config.cache_size_limit = max(64, 4 * len(config.resolutions))
        runner.compiled = torch.compile(model, dynamic=False)
    optimizer = torch.optim.SGD(param_groups([model, ensemble], config.weight_decay), lr=config.lr,
                                momentum=config.momentum)

    start_epoch, start_step, history = 0, 0, []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ensemble.load_state_dict(resumed["ensemble"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_epoch, start_step, history = resumed["epoch"], resumed["step"], resumed["history"]
        torch.set_rng_state(resumed["rng"]["torch"])
    if dist_info.world_size > 1:
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True)
    if dist_info.main:
        save_config(config, out / "config.toml")

    steps = len(data.train)
    total_steps = steps * config.epochs
    warmup_steps = int(config.warmup_epochs * steps)
    in_chans, num_classes = data.in_chans, data.num_classes
    trained_time = resumed["train_time_s"] if resumed else 0.0

    def checkpoint(epoch: int, step: int, complete: bool = False) -> None:
        if not dist_info.main:
            return
        atomic_save({
            "format": FORMAT, "version": VERSION, "config": config.to_dict(),
            "num_classes": num_classes, "in_chans": in_chans, "resolutions": list(config.resolutions),
            "calibrated": {}, "model": model.state_dict(), "ensemble": ensemble.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
            "rng": {"torch": torch.get_rng_state()}, "train_time_s": trained_time, "complete": complete,
        }, out / "checkpoint.pt")

    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        losses = train_one_epoch(epoch, start_step, runner, ensemble, teacher, optimizer, data.train, config,
                                 dist_info, device, total_steps, warmup_steps, checkpoint)
        epoch_time = time.perf_counter() - began
        trained_time += epoch_time
        images = (steps - start_step) * config.batch_size
        start_step = 0
        metrics = evaluate(model, data.test, config.resolutions, ensemble.weights().detach(), device, config.amp,
                           config.channels_last)
        row = {"epoch": epoch + 1, **{k: round(v, 5) for k, v in losses.items()},
               "lr": lr_at((epoch + 1) * steps - 1, total_steps, warmup_steps, config.lr),
               "images_per_s": round(images / max(1e-9, epoch_time), 1)}
        row.update({f"top1_{r}": round(m["top1"], 3) for r, m in metrics["per_resolution"].items()})
        row["top1_ensemble"] = round(metrics["ensemble"]["top1"], 3)
        history.append(row)
        if dist_info.main:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses['loss']:.4f}, top-1 "
                  + " / ".join(f"{r}: {m['top1']:.2f}" for r, m in metrics["per_resolution"].items())
                  + f", ensemble {metrics['ensemble']['top1']:.2f}", flush=True)
            write_metrics_csv(history, out / "metrics.csv")
        checkpoint(epoch + 1, 0, complete=epoch + 1 == config.epochs)

    if resumed is not None and start_epoch >= config.epochs:
        metrics = evaluate(model, data.test, config.resolutions, ensemble.weights().detach(), device, config.amp)
    results = build_results(config, model, metrics, ensemble, in_chans, num_classes, out.name, trained_time)
    if dist_info.main:
        write_json_atomic(results, out / "results.json")
        print(format_table(results["rows"], results["ensemble"]))
    if dist_info.world_size > 1:
        dist.barrier()
    return results


def build_results(config, model, metrics, ensemble: Optional[EnsembleWeights], in_chans, num_classes, run_name,
                  train_time_s, calibrated=frozenset()) -> dict:
    raw_model = model.module if hasattr(model, "module") else model
    weights = ensemble.weights().tolist() if ensemble is not None else None
    return {
        "kind": "rsq-results", "format_version": 1, "run": run_name,
        "model": config.model, "data": config.data, "num_classes": num_classes, "in_chans": in_chans,
        "epochs": config.epochs, "distill": config.distill, "seed": config.seed,
        "quant": {"label": bits_label(config.weight_bits, config.act_bits), "weight_bits": config.weight_bits,
                  "act_bits": config.act_bits, "quantizer": config.quantizer if config.quantized else None,
                  "first_last": config.first_last if config.quantized else None},
        "rows": result_rows(raw_model, metrics, in_chans, config.weight_bits, config.act_bits, set(calibrated)),
        "ensemble": metrics["ensemble"],
        "alpha_weights": ({str(r): round(w, 4) for r, w in zip(mode_state(raw_model).resolutions, weights)}
                          if weights else None),
        "train_time_s": round(train_time_s, 1),
    }
