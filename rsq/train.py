"""Training an RS-Net: every step runs the same images at every resolution, then MRED.

The whole flow, top to bottom: set-up (distributed, device, run folder), data, model (convert,
optionally quantize, optionally start from a checkpoint), optimizer, then epochs of
``train_one_epoch`` + ``evaluate``, with atomic checkpoints that a killed run resumes from.

Distributed runs (``torchrun --nproc_per_node N -m rsq.cli train ...``) use DDP: every rank
takes its slice of the same global batch, only rank 0 writes files, and an error on any rank
is raised on every rank (``agree``), so no rank is left waiting in a collective.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import (FORMAT, VERSION, atomic_save, build_model, checkpoint_config, load_checkpoint,
                         quant_config, remove_stale_temporaries)
from .config import TrainConfig, save_config
from .convert import mode_state, using_mode
from .data import build_data
from .data.multires import resize_batch
from .distributed import (Dist, agree, all_finite, setup_distributed, shutdown_distributed, sync_buffers,
                          wants_cuda, world_from_env)
from .distill import EnsembleWeights, mred_loss
from .errors import RsqError, choices_error
from .evaluate import autocast_for, bits_label, evaluate, format_table, result_rows
from .models import create_model
from .results import write_json_atomic, write_metrics_csv

RUN_FILES = ("checkpoint.pt", "results.json", "config.toml", "metrics.csv")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
LOG_EVERY_S = 60.0  # progress line interval when stderr is not a terminal (logs, nohup)

# ----------------------------------------------------------------------------- set-up
def check_before_start(config: TrainConfig, info: Dist) -> None:
    """Checks every rank makes before a process group exists; they read, never write."""
    if config.device not in DEVICE_CHOICES:
        raise choices_error("device", config.device, DEVICE_CHOICES)
    # A recipe can hold what the CLI's parsers refuse: an infinite lr, a seed torch cannot take.
    for name in ("lr", "weight_decay", "warmup_epochs", "momentum", "label_smoothing"):
        if not math.isfinite(getattr(config, name)):
            raise RsqError(f"{name} must be a finite number, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**63:
        raise RsqError(f"seed must be in 0 .. 2**63-1, got {config.seed}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RsqError("--device cuda was asked for but no CUDA device is available")
    if wants_cuda(config.device) and info.local_rank >= torch.cuda.device_count():
        raise RsqError(f"LOCAL_RANK {info.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                       f"start at most that many processes per node")
    if config.data == "imagefolder" and not config.data_dir:
        raise RsqError("--data imagefolder needs --data-dir ROOT (with ROOT/train/CLASS and ROOT/val/CLASS)")
    if config.batch_size % info.world_size:
        raise RsqError(f"--batch-size {config.batch_size} is the global batch; it must be divisible by the "
                       f"{info.world_size} processes")


def seed_everything(seed: int) -> None:
    # The same seed on every rank: each rank builds the same model, so quantizer steps set from
    # the first batch (averaged over ranks) match what one process would compute. The data
    # stream has its own generators, seeded per (seed, epoch, step).
    random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an existing run unless --resume or --overwrite says so; writes nothing."""
    if resume and overwrite:
        raise RsqError("--resume continues a run and --overwrite replaces it; pass one of them")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise RsqError(f"--resume {out}: no checkpoint.pt there to resume from")
        return
    if out.exists() and not out.is_dir():
        raise RsqError(f"output path {out} exists and is not a folder")
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if holds_run and not overwrite:
        raise RsqError(f"output folder {out} already holds a run; pass --resume {out} to continue it "
                       f"or --overwrite to replace it")
    existing = out
    while not existing.exists():  # the folder is made later: its nearest existing parent must take it
        existing = existing.parent
    if not existing.is_dir():
        raise RsqError(f"cannot create output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RsqError(f"cannot write to {existing} (for output folder {out})")


def start_run_dir(out: Path, overwrite: bool, config: TrainConfig) -> None:
    """Rank 0, once everything else is built: make the folder (or reuse it on --resume), write config.toml.

    --overwrite removes the old run's files only now, so a run that fails while setting up
    (bad data, bad --init) leaves the old run as it was. Other files in the folder are kept.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        remove_stale_temporaries(out)  # left by a run killed while writing a checkpoint
        save_config(config, out / "config.toml")
    except OSError as exc:
        raise RsqError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


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
        net = self.model if self.compiled is None else self.compiled
        for r in self.resolutions:
            xr = resize_batch(x, r)
            if self.channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            with using_mode(self.model, r):
                logits.append(net(xr))
        return logits


# ----------------------------------------------------------------------------- model
def load_source(flag: str, path: str, config: TrainConfig, num_classes: int, in_chans: int) -> dict:
    """--init and --teacher: a full-precision RS-Net checkpoint for this run's resolutions and data."""
    try:
        ckpt = load_checkpoint(path)
    except RsqError as exc:
        raise RsqError(f"{flag}: {exc}") from None
    source = checkpoint_config(ckpt)
    if flag == "--init" and source.model != config.model:
        raise RsqError(f"--init {path} is a {source.model} checkpoint; this run trains {config.model}")
    if source.quantized:
        raise RsqError(f"{flag} {path} is a {bits_label(source.weight_bits, source.act_bits)} checkpoint; {flag} "
                       f"takes a full-precision one" + (" (continue a quantized run with --resume)"
                                                       if flag == "--init" else ""))
    missing = [r for r in config.resolutions if r not in ckpt["resolutions"]]
    if missing:
        raise RsqError(f"{flag} {path} was trained for resolutions {ckpt['resolutions']}, not {missing}")
    if (ckpt["num_classes"], ckpt["in_chans"]) != (num_classes, in_chans):
        raise RsqError(f"{flag} {path} has {ckpt['num_classes']} classes / {ckpt['in_chans']} channels; "
                       f"the data has {num_classes} / {in_chans}")
    return ckpt


def apply_init(model: nn.Module, init: dict, path: str) -> None:
    """Copy the shared weights and the BN sets of this run's resolutions from --init."""
    wanted = model.state_dict()
    state = {k: v for k, v in build_model(init).state_dict().items() if k in wanted}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise RsqError(f"--init {path} does not fit this model: {str(exc).strip().splitlines()[-1][:200]}") from None


@torch.no_grad()
def initialize_quantizers(model: nn.Module, sample: torch.Tensor, resolutions: list[int]) -> None:
    """Let every quantizer set its steps from the first batch, now, as one training forward would.

    Done before DDP wraps the model and before torch.compile traces it, so the data-dependent
    initialisation (a Python branch and an all-reduce of the steps across ranks) stays out of
    both. BN runs in training mode (the activations quantizers see are batch-normalised), but its
    running statistics are put back afterwards: this forward is not a training step.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [copy.deepcopy(bn.state_dict()) for bn in bns]
    was_training = model.training
    model.train()
    for r in resolutions:
        with using_mode(model, r):
            model(resize_batch(sample, r))
    for bn, state in zip(bns, saved):
        bn.load_state_dict(state)
    model.train(was_training)


def build_training_model(config: TrainConfig, num_classes: int, in_chans: int, sample: torch.Tensor,
                         device: torch.device, init: Optional[dict] = None) -> nn.Module:
    model = create_model(config.model, num_classes, in_chans, resolutions=config.resolutions)
    if init is not None:
        apply_init(model, init, config.init)
    model.to(device)
    if config.quantized:
        from .quantize import quantize_

        quantize_(model, quant_config(config))
        model.to(device)
        initialize_quantizers(model, sample.to(device), config.resolutions)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_teacher(ckpt: dict, device: torch.device) -> nn.Module:
    teacher = build_model(ckpt).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_resume(out: Path, config: TrainConfig) -> dict:
    resumed = load_checkpoint(out / "checkpoint.pt")
    if resumed.get("complete"):
        raise RsqError(f"run {out} already finished ({config.epochs} epochs); nothing to resume")
    missing = [key for key in ("ensemble", "optimizer", "epoch", "step", "history", "rng") if key not in resumed]
    if missing:
        raise RsqError(f"{out / 'checkpoint.pt'} cannot be resumed: it lacks {', '.join(missing)}")
    return resumed


# ----------------------------------------------------------------------------- loop
class Divergence(RsqError):
    """A non-finite loss (or weights): the run stops and the last good checkpoint stays."""


@dataclass
class EpochState:
    """What a checkpoint taken mid-epoch needs to finish the epoch exactly as if never stopped."""
    totals: torch.Tensor   # summed [loss, ce, ens, kd] of the steps done so far
    counted: int           # steps summed in ``totals``


def train_one_epoch(epoch, start_step, state: EpochState, runner, ensemble, teacher, optimizer, data, config,
                    info: Dist, device, total_steps, warmup_steps, save_checkpoint) -> dict:
    """One pass over the training data; ``save_checkpoint(epoch, next_step, state)`` every N steps."""
    runner.train()
    steps = len(data)
    show_bar = info.main and sys.stderr.isatty()
    last_log = time.perf_counter()
    with tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_bar,
              mininterval=2.0, leave=False, file=sys.stderr) as bar:
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
            # The mean over ranks: what one process would log, and a NaN on any rank stops all of
            # them at the same step. Checking it costs one device sync per step.
            stats = torch.stack([parts.total.detach(), parts.ce, parts.ens, parts.kd]).float()
            if info.world_size > 1:
                dist.all_reduce(stats)
                stats /= info.world_size
            if not torch.isfinite(stats[0]):
                raise Divergence(f"loss became {stats[0].item()} at epoch {epoch + 1}, step {step + 1} "
                                 f"(global step {global_step + 1}, lr {lr:.4g})")
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            if info.world_size > 1 and ensemble.alpha.grad is not None:
                # alpha lives outside the DDP module, so its gradient is averaged here.
                dist.all_reduce(ensemble.alpha.grad)
                ensemble.alpha.grad /= info.world_size
            optimizer.step()
            state.totals += stats
            state.counted += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{stats[0].item():.3f}", lr=f"{lr:.4f}")
            if info.main and not show_bar and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                print(f"epoch {epoch + 1}/{config.epochs} step {step + 1}/{steps}: loss {stats[0].item():.4f}, "
                      f"lr {lr:.4g}", flush=True)
            if config.checkpoint_every and (global_step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(epoch, step + 1, state)
    means = (state.totals / max(1, state.counted)).tolist()
    return dict(zip(("loss", "loss_ce", "loss_ens", "loss_kd"), means))


# ----------------------------------------------------------------------------- the run
def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    info = world_from_env()
    check_before_start(config, info)
    device = setup_distributed(info, config.device)
    try:
        results = _train(config, resume, overwrite, info, device)
    except RsqError as exc:
        # An agreed error: every rank is here, no collective is pending, so leave cleanly.
        if getattr(exc, "all_ranks", False):
            shutdown_distributed(info)
        raise
    shutdown_distributed(info)
    return results


def _train(config: TrainConfig, resume: bool, overwrite: bool, info: Dist, device: torch.device) -> dict:
    out = Path(config.out)
    seed_everything(config.seed)
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a handful of fixed shapes: one per resolution

    # Set-up in two agreed stages. The first reads files and data and runs no collective, so a
    # rank that fails there cannot leave another inside an all-reduce; the second builds the
    # model, whose quantizer initialisation all-reduces across ranks.
    def read_inputs():
        if info.main:
            check_run_dir(out, resume, overwrite)
        resumed = load_resume(out, config) if resume else None
        data = build_data(config, info.rank, info.world_size, device)
        init = load_source("--init", config.init, config, data.num_classes, data.in_chans) if config.init else None
        teacher = load_source("--teacher", config.teacher, config, data.num_classes, data.in_chans) \
            if config.teacher else None
        return resumed, data, init, teacher

    resumed, data, init, teacher_ckpt = agree(info, read_inputs)

    def build_models():
        sample, _ = next(iter(data.train.batches(0)))
        model = build_training_model(config, data.num_classes, data.in_chans, sample, device, init)
        return model, build_teacher(teacher_ckpt, device) if teacher_ckpt is not None else None

    model, teacher = agree(info, build_models)
    ensemble = EnsembleWeights(len(config.resolutions)).to(device)
    runner = AllResolutions(model, config.resolutions, config.channels_last)
    if config.compile:
        import torch._dynamo as dynamo

        # One static graph per resolution; the default limit of 8 silently falls back to eager.
        dynamo.config.cache_size_limit = max(64, 4 * len(config.resolutions))
        runner.compiled = torch.compile(model, dynamic=False)
    optimizer = torch.optim.SGD(param_groups([model, ensemble], config.weight_decay), lr=config.lr,
                                momentum=config.momentum)

    steps = len(data.train)
    total_steps = steps * config.epochs
    warmup_steps = int(config.warmup_epochs * steps)
    in_chans, num_classes = data.in_chans, data.num_classes
    start_epoch, start_step, history, trained_time = 0, 0, [], 0.0
    state = EpochState(torch.zeros(4, device=device), 0)
    last_good = None  # (epoch, step) of the checkpoint on disk that this run wrote or resumed from
    if resumed is not None:
        def restore():
            try:
                model.load_state_dict(resumed["model"])
                ensemble.load_state_dict(resumed["ensemble"])
                optimizer.load_state_dict(resumed["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise RsqError(f"{out / 'checkpoint.pt'} does not fit its own config: "
                               f"{str(exc).strip().splitlines()[-1][:200]}") from None
        agree(info, restore)
        start_epoch, start_step = resumed["epoch"], resumed["step"]
        history, trained_time = resumed["history"], resumed.get("train_time_s", 0.0)
        partial = resumed.get("partial_epoch")
        if start_step and partial:
            state = EpochState(partial["totals"].to(device), partial["counted"])
        last_good = (start_epoch, start_step)
        # Nothing in a step draws from these today (data has its own seeded generators); restore
        # them anyway so anything that does (dropout, a random augmentation) continues exactly.
        rng = resumed["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if rng.get("python") is not None:
            random.setstate(rng["python"])
    if info.world_size > 1:
        # Buffers (BN statistics) follow rank 0 at every forward; torch 2.14 renamed the flag.
        sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers"
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None, **{sync_flag: True})
    agree(info, lambda: info.main and start_run_dir(out, overwrite, config))

    def last_good_text() -> str:
        if last_good is None:
            return "no checkpoint had been written yet"
        epoch, step = last_good
        where = f"epoch {epoch + 1}, step {step}" if step else f"end of epoch {epoch}"
        return f"{out / 'checkpoint.pt'} ({where}) is the last good checkpoint"

    epoch_began = time.perf_counter()

    def save_checkpoint(epoch: int, step: int, partial: Optional[EpochState] = None, complete: bool = False) -> None:
        """Rank 0 writes, after every rank agreed the weights are finite: no checkpoint holds NaNs."""
        nonlocal last_good
        if not all_finite(model, info):
            where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
            raise Divergence(f"weights or BN statistics became non-finite by {where}")
        elapsed = trained_time + (time.perf_counter() - epoch_began if step else 0.0)

        def write():
            if not info.main:
                return
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                   "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            atomic_save({
                "format": FORMAT, "version": VERSION, "config": config.to_dict(),
                "num_classes": num_classes, "in_chans": in_chans, "resolutions": list(config.resolutions),
                "calibrated": {}, "model": model.state_dict(), "ensemble": ensemble.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
                "partial_epoch": {"totals": partial.totals.cpu(), "counted": partial.counted} if partial else None,
                "rng": rng, "train_time_s": elapsed, "complete": complete, "world_size": info.world_size,
            }, out / "checkpoint.pt")

        agree(info, write)
        last_good = (epoch, step)

    metrics = None
    for epoch in range(start_epoch, config.epochs):
        epoch_began = time.perf_counter()
        try:
            losses = train_one_epoch(epoch, start_step, state, runner, ensemble, teacher, optimizer, data.train,
                                     config, info, device, total_steps, warmup_steps, save_checkpoint)
        except Divergence as exc:
            error = Divergence(f"{exc}; stopping, {last_good_text()} (try a lower --lr)")
            error.all_ranks = True  # every rank saw the same all-reduced loss / weights
            raise error from None
        epoch_time = time.perf_counter() - epoch_began
        trained_time += epoch_time
        images = (steps - start_step) * config.batch_size
        start_step, state = 0, EpochState(torch.zeros(4, device=device), 0)
        sync_buffers(model, info)
        metrics = evaluate(model, data.test, config.resolutions, ensemble.weights().detach(), device, config.amp,
                           config.channels_last)
        row = {"epoch": epoch + 1, **{k: round(v, 5) for k, v in losses.items()},
               "lr": lr_at((epoch + 1) * steps - 1, total_steps, warmup_steps, config.lr),
               "images_per_s": round(images / max(1e-9, epoch_time), 1)}
        row.update({f"top1_{r}": round(m["top1"], 3) for r, m in metrics["per_resolution"].items()})
        row["top1_ensemble"] = round(metrics["ensemble"]["top1"], 3)
        history.append(row)
        if info.main:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses['loss']:.4f}, top-1 "
                  + " / ".join(f"{r}: {m['top1']:.2f}" for r, m in metrics["per_resolution"].items())
                  + f", ensemble {metrics['ensemble']['top1']:.2f}", flush=True)
        agree(info, lambda: info.main and _write_file(write_metrics_csv, history, out / "metrics.csv"))
        save_checkpoint(epoch + 1, 0, complete=epoch + 1 == config.epochs)

    results = build_results(config, model, metrics, ensemble, in_chans, num_classes, out.name, trained_time)
    agree(info, lambda: info.main and _write_file(write_json_atomic, results, out / "results.json"))
    if info.main:
        print(format_table(results["rows"], results["ensemble"]))
    return results


def _write_file(write: Callable, obj, path: Path) -> bool:
    try:
        write(obj, path)
    except OSError as exc:
        raise RsqError(f"cannot write {path}: {exc.strerror or exc}") from None
    return True


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
