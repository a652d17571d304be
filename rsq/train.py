"""Training an RS-Net: every step runs the same images at every resolution, then MRED.

The whole flow is ``_train``, top to bottom: read the inputs, build the models, make the
``TrainJob`` (everything a step needs), restore a stopped run, then epochs of
``train_one_epoch`` (a loop over ``train_step``) + ``evaluate``, each ended by a checkpoint.

Distributed runs (``torchrun --nproc_per_node N -m rsq.cli train ...``) use DDP: every rank
takes its slice of the same global batch, only rank 0 writes files, and an error on any rank
is raised on every rank (``with agreed(info)``), so no rank is left waiting in a collective.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import FORMAT, VERSION, atomic_save
from .config import TrainConfig
from .convert import using_mode
from .cpu_info import has_amx_bf16
from .data import build_data
from .data.multires import resize_batch
from .distill import BitWidthEnsembles, EnsembleWeights, joint_loss, mred_loss
from .distributed import Dist, agreed, all_finite, setup_distributed, shutdown_distributed, sync_buffers, \
    world_from_env
from .errors import RsqError
from .evaluate import (autocast_for, bits_label, config_quant, evaluate_modes, format_table, grid_rows,
                       grid_summary)
from .mode_threads import ModeThreads, quantizers_ready
from .nn import fused_bn
from .quantize import full_precision_layers
from .results import write_json_atomic, write_metrics_csv
from .train_setup import (build_teacher, build_training_model, check_before_start, check_run_dir,
                          initialize_quantizers, load_resume, load_source, param_groups, seed_everything,
                          start_run_dir)

__all__ = ["AllResolutions", "TrainJob", "initialize_quantizers", "param_groups", "train", "train_one_epoch",
           "train_step"]

# Printed on CPUs with AMX when a full-precision run is in fp32: the speed-up is the step's, measured
# round-robin (tools/results/bench_step_speed_bf16_xeon.md); the README's "bf16 on the CPU" gives its
# accuracy. Quantized steps gained less (0.79x their fp32 time there), and their bf16 accuracy is unmeasured.
AMX_HINT = ("hint: this CPU has AMX bf16 units; --amp bf16 runs the training step about 1.5x faster, "
            "in bf16 arithmetic (README: bf16 on the CPU)")


def suggests_bf16(config: TrainConfig) -> bool:
    """Whether a CPU run prints AMX_HINT: fp32, full precision, on a CPU with AMX."""
    return config.amp != "bf16" and not config.quantized and has_amx_bf16()


LOG_EVERY_S = 60.0  # progress line interval when stderr is not a terminal (logs, nohup)


class Divergence(RsqError):
    """A non-finite loss (or weights): the run stops and the last good checkpoint stays."""


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero; a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class AllResolutions(nn.Module):
    """One forward = the same batch at every resolution (and every bit width of a joint model),
    each mode with its own BN set.

    Wrapping the per-mode passes in a single forward lets DDP see one forward and one backward
    per step; the downsampling runs on the batch's device, once per resolution. The logits come
    back per bit width (widest first), each bit width's in resolution order.
    """

    def __init__(self, model: nn.Module, resolutions: list[int], channels_last: bool = False,
                 bit_widths: Optional[list[int]] = None):
        super().__init__()
        self.model, self.resolutions, self.channels_last = model, resolutions, channels_last
        self.bit_widths = list(bit_widths or [None])
        self.compiled = None

    def compile_per_resolution(self) -> "AllResolutions":
        """torch.compile the model with one static graph per resolution (no dynamic shapes)."""
        import torch._dynamo as dynamo

        # The default cache of 8 graphs would silently fall back to eager past 8 resolutions.
        dynamo.config.cache_size_limit = max(64, 4 * len(self.resolutions))
        self.compiled = torch.compile(self.model, dynamic=False)
        return self

    def inputs(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        inputs = {}
        for r in self.resolutions:
            xr = resize_batch(x, r)
            inputs[r] = xr.contiguous(memory_format=torch.channels_last) if self.channels_last else xr
        return inputs

    def modes(self) -> list[tuple[int, Optional[int]]]:
        """(resolution, bits) of every mode, in the order of forward's logits."""
        return [(r, bits) for bits in self.bit_widths for r in self.resolutions]

    def mode_costs(self) -> list[float]:
        return [float(r * r) for r, _ in self.modes()]

    def forward(self, x: torch.Tensor, threads: Optional[ModeThreads] = None) -> list[torch.Tensor]:
        """Logits of every mode; with ``threads``, the modes run side by side (see rsq/mode_threads.py)."""
        net = self.model if self.compiled is None else self.compiled
        inputs, modes = self.inputs(x), self.modes()
        # Autocast is per thread: the mode threads enter the caller's CPU autocast (rsq train --amp bf16).
        # Only entered, never switched off: on the calling thread a disabled autocast would end the caller's.
        caller_autocast = threads is not None and torch.is_autocast_enabled("cpu")
        autocast_dtype = torch.get_autocast_dtype("cpu")

        def run_mode(i: int) -> torch.Tensor:
            r, bits = modes[i]
            autocast = (torch.autocast("cpu", dtype=autocast_dtype) if caller_autocast
                        else contextlib.nullcontext())
            with autocast, using_mode(self.model, r, bits):
                return net(inputs[r])

        if threads is not None:
            return threads.forward(run_mode, self.mode_costs())
        return [run_mode(i) for i in range(len(modes))]

    def by_bits(self, logits: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
        """forward's flat list as {bits: [logits per resolution]} (joint models)."""
        n = len(self.resolutions)
        return {bits: logits[i * n:(i + 1) * n] for i, bits in enumerate(self.bit_widths)}


@dataclass
class TrainJob:
    """Everything one training step needs; ``runner`` is the (possibly DDP-wrapped) AllResolutions."""

    config: TrainConfig
    model: nn.Module
    runner: nn.Module
    ensemble: EnsembleWeights
    optimizer: torch.optim.Optimizer
    teacher: Optional[nn.Module] = None
    info: Dist = field(default_factory=Dist)
    device: torch.device = torch.device("cpu")
    mode_threads: Optional[ModeThreads] = None

    @contextmanager
    def main_thread_for_steps(self) -> Iterator[None]:
        """The training steps' scope: with modes side by side, the main thread on one intra-op thread.

        Between and around the modes the main thread only prepares the batch, sums the loss and
        steps the optimizer: small elementwise work. On two threads, OpenMP's second one spins on
        for a while after each of those parallel regions, on a core the mode threads need; one main
        thread made a loop of batch preparation + step about 4% faster (tools/results/probe_step_loop.md).
        Evaluation, outside this scope, keeps every thread. A teacher's forward runs on the main
        thread, so with a teacher the main thread keeps its threads.
        """
        if self.mode_threads is None or self.teacher is not None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def threads_for_step(self) -> Optional[ModeThreads]:
        """The thread pool when this step can run its modes side by side (quantizers initialised)."""
        return self.mode_threads if self.mode_threads is not None and quantizers_ready(self.model) else None

    @property
    def all_modes(self) -> AllResolutions:
        """The AllResolutions module, also when DDP wraps it."""
        return getattr(self.runner, "module", self.runner)

    @classmethod
    def create(cls, config: TrainConfig, model: nn.Module, teacher: Optional[nn.Module] = None,
               info: Dist = Dist(), device: torch.device = torch.device("cpu")) -> "TrainJob":
        """The ensemble weights, the runner (compiled if asked) and SGD over the model and alpha."""
        n = len(config.resolutions)
        ensemble = (BitWidthEnsembles(n, config.bit_widths) if config.joint else EnsembleWeights(n)).to(device)
        runner = AllResolutions(model, config.resolutions, config.channels_last, config.bit_widths)
        if config.compile:
            runner.compile_per_resolution()
        n_modes = len(runner.modes())
        # head_grad mean: the classifier, shared and followed by no BN, moves as one model's would.
        head_lr_scale = 1.0 / n_modes if config.head_grad == "mean" else 1.0
        # conv_decay sum: the convolutions take n modes' gradients, so n times the decay keeps the balance
        # of a single model between the two (behind a BN it sets their norm, and so their effective step).
        # Float weights only: a quantized weight's scale is not free, its quantizer's grid depends on it.
        # conv_decay_factor scales that shared decay; a single mode shares nothing and keeps one model's.
        float_weights = config.weight_bits >= 32 and not config.joint
        conv_decay_scale = (n_modes * config.conv_decay_factor if config.conv_decay == "sum" and float_weights
                            and n_modes > 1 else 1.0)
        # norm_lr_factor: each private BN takes one mode's gradient while the convolutions it follows
        # move with n modes'. Measured with float weights only (tools/results/bench_rsnet_4ep_amd.md),
        # so, like conv_decay, quantized and joint models keep one model's rate.
        norm_lr_scale = config.norm_lr_factor if float_weights and n_modes > 1 else 1.0
        optimizer = torch.optim.SGD(param_groups([model, ensemble], config.weight_decay, head_lr_scale,
                                                 conv_decay_scale, norm_lr_scale), lr=config.lr,
                                    momentum=config.momentum)
        # Side-by-side modes need one process on the CPU in eager mode (fp32, or bf16 autocast entered in each
        # mode thread), 2+ threads to share, and forwards that only read shared state (LQ-Nets refits its
        # shared levels in every forward).
        # Compiled modes side by side ran slower than either alone in a one-off probe (0.83x of a plain
        # loop against 0.78x compiled and 0.80x eager side by side): Dynamo guards on the calling thread's
        # torch thread count, so each thread compiles its own graphs, and its settings are per thread;
        # compiled inside the pool threads with per-thread settings it was no faster than eager side by
        # side (0.776x against 0.777x, tools/results/probe_step_variants.md) after a 124 s first step.
        threads = None
        fused_bn.set_enabled(config.fused_bn)
        lqnet = config.quantized and config.quantizer == "lqnet"
        if (config.mode_threads and device.type == "cpu" and info.world_size == 1 and not config.compile
                and not lqnet and torch.get_num_threads() >= 2 and n_modes > 1):
            threads = ModeThreads()
        return cls(config, model, runner, ensemble, optimizer, teacher, info, device, threads)

    def describe_cpu_step(self) -> str:
        """How the training step runs on the CPU, printed when a run starts, so a slower path is never silent."""
        config, n = self.config, len(self.config.resolutions)
        if self.mode_threads is not None:
            parts = [f"{n} modes side by side on {self.mode_threads.threads} threads"]
        else:
            parts = [f"{n} mode{'s' * (n > 1)} in turn on {torch.get_num_threads()} thread(s)"]
        parts.append("channels_last" if config.channels_last else "NCHW")
        if config.compile:
            parts.append("torch.compile (plain BatchNorm and ReLU in the graph)")
        elif config.amp == "bf16":
            parts.append("bf16 autocast")
        else:
            one_thread = self.mode_threads is not None or torch.get_num_threads() == 1
            parts.append(fused_bn.describe(self.model, one_thread, config.channels_last))
        return ", ".join(parts)

    def wrap_ddp(self) -> None:
        """Under torchrun: DDP around the runner; BN statistics follow rank 0 at every forward."""
        if self.info.world_size == 1:
            return
        # torch 2.14 renamed the flag.
        sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers"
        self.runner = nn.parallel.DistributedDataParallel(
            self.runner, device_ids=[self.device.index] if self.device.type == "cuda" else None, **{sync_flag: True})


def distill_weight_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The MRED weight at ``step``: a linear ramp over the first ``distill_ramp`` of the steps, then
    ``distill_weight``. Early on the ensemble is made of untrained students, so its teaching is noise."""
    ramp_steps = config.distill_ramp * total_steps
    if ramp_steps <= 0 or step >= ramp_steps:
        return config.distill_weight
    return config.distill_weight * step / ramp_steps


def train_step(job: TrainJob, x: torch.Tensor, y: torch.Tensor, lr: float, kd_weight: float = 1.0) -> torch.Tensor:
    """One optimizer step on one batch at every resolution; returns [loss, ce, ens, kd] (mean over ranks).

    A non-finite loss raises Divergence before the weights are touched.
    """
    config, info = job.config, job.info
    for group in job.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    threads = job.threads_for_step()
    with autocast_for(job.device, config.amp):
        logits = job.runner(x, threads) if threads is not None else job.runner(x)
        teacher_logits = None
        if job.teacher is not None:
            with torch.no_grad():
                teacher_logits = []
                for r in config.resolutions:
                    with using_mode(job.teacher, r):
                        teacher_logits.append(job.teacher(resize_batch(x, r)))
    if config.joint:
        parts = joint_loss(job.all_modes.by_bits(logits), y, job.ensemble, config.distill, config.label_smoothing,
                           teacher_logits, config.bit_distill, kd_weight, config.distill_temperature)
    else:
        parts = mred_loss(logits, y, job.ensemble, config.distill, config.label_smoothing, teacher_logits, kd_weight,
                          config.distill_temperature)
    # The mean over ranks: what one process would log, and a NaN on any rank stops all of them
    # at the same step. Checking it costs one device sync per step.
    stats = torch.stack([parts.total.detach(), parts.ce, parts.ens, parts.kd]).float()
    if info.world_size > 1:
        dist.all_reduce(stats)
        stats /= info.world_size
    if not torch.isfinite(stats[0]):
        raise Divergence(f"loss became {stats[0].item()}")
    job.optimizer.zero_grad(set_to_none=True)
    if threads is not None:
        threads.backward(parts.total, logits, job.all_modes.mode_costs(),
                         [p for p in job.model.parameters() if p.requires_grad], list(job.ensemble.parameters()))
    else:
        parts.total.backward()
    if info.world_size > 1:
        # alpha lives outside the DDP module, so its gradient is averaged here.
        for alpha in job.ensemble.parameters():
            if alpha.grad is not None:
                dist.all_reduce(alpha.grad)
                alpha.grad /= info.world_size
    job.optimizer.step()
    return stats


@dataclass
class Progress:
    """Where a run stands: the next (epoch, step), the finished epochs' rows, the open epoch's sums.

    ``totals``/``counted`` are what a mid-epoch checkpoint needs to finish the epoch exactly as
    if it had never stopped.
    """

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    totals: Optional[torch.Tensor] = None  # summed [loss, ce, ens, kd] of the epoch's steps so far
    counted: int = 0

    def start_epoch(self, device: torch.device) -> None:
        """Fresh sums for a new epoch; a run resumed mid-epoch keeps the sums it saved."""
        if self.step == 0 or self.totals is None:
            self.totals, self.counted = torch.zeros(4, device=device), 0

    def add(self, stats: torch.Tensor) -> None:
        self.totals += stats
        self.counted += 1
        self.step += 1

    def epoch_means(self) -> dict:
        means = (self.totals / max(1, self.counted)).tolist()
        return dict(zip(("loss", "loss_ce", "loss_ens", "loss_kd"), means))


class Checkpointer:
    """Owns the run's checkpoint: writing it (rank 0, atomically), the last good one, the training time."""

    def __init__(self, job: TrainJob, out: Path, num_classes: int, in_chans: int, trained_time: float = 0.0,
                 last_good: Optional[tuple[int, int]] = None):
        self.job, self.out, self.num_classes, self.in_chans = job, out, num_classes, in_chans
        self.trained_time, self.last_good = trained_time, last_good
        self.epoch_began = time.perf_counter()

    def begin_epoch(self) -> None:
        self.epoch_began = time.perf_counter()

    def end_epoch(self) -> float:
        """Seconds the epoch took; added to the run's training time."""
        elapsed = time.perf_counter() - self.epoch_began
        self.trained_time += elapsed
        return elapsed

    def save(self, progress: Progress, complete: bool = False) -> None:
        """Write the checkpoint at ``progress``, after every rank agreed the weights are finite."""
        job, epoch, step = self.job, progress.epoch, progress.step
        if not all_finite(job.model, job.info):
            where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
            raise Divergence(f"weights or BN statistics became non-finite by {where}")
        elapsed = self.trained_time + (time.perf_counter() - self.epoch_began if step else 0.0)
        with agreed(job.info):
            if job.info.main:
                atomic_save(self._contents(progress, elapsed, complete), self.out / "checkpoint.pt")
        self.last_good = (epoch, step)

    def _contents(self, progress: Progress, elapsed: float, complete: bool) -> dict:
        job, device = self.job, self.job.device
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        partial = {"totals": progress.totals.cpu(), "counted": progress.counted} if progress.step else None
        return {
            "format": FORMAT, "version": VERSION, "config": job.config.to_dict(),
            "num_classes": self.num_classes, "in_chans": self.in_chans, "resolutions": list(job.config.resolutions),
            "calibrated": {}, "model": job.model.state_dict(), "ensemble": job.ensemble.state_dict(),
            "optimizer": job.optimizer.state_dict(), "epoch": progress.epoch, "step": progress.step,
            "history": progress.history, "partial_epoch": partial, "rng": rng, "train_time_s": elapsed,
            "complete": complete, "world_size": job.info.world_size,
        }

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint had been written yet"
        epoch, step = self.last_good
        where = f"epoch {epoch + 1}, step {step}" if step else f"end of epoch {epoch}"
        return f"{self.out / 'checkpoint.pt'} ({where}) is the last good checkpoint"


def train_one_epoch(job: TrainJob, train_data, progress: Progress, checkpointer: Checkpointer) -> dict:
    """One pass over the training data from ``progress.step``; the epoch's mean losses."""
    config, info = job.config, job.info
    steps, epoch = len(train_data), progress.epoch
    total_steps, warmup_steps = steps * config.epochs, int(config.warmup_epochs * steps)
    job.runner.train()
    show_bar = info.main and sys.stderr.isatty()
    last_log = time.perf_counter()
    with tqdm(total=steps, initial=progress.step, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_bar,
              mininterval=2.0, leave=False, file=sys.stderr) as bar, job.main_thread_for_steps():
        for x, y in train_data.batches(epoch, progress.step):
            global_step = epoch * steps + progress.step
            lr = lr_at(global_step, total_steps, warmup_steps, config.lr)
            try:
                stats = train_step(job, x, y, lr, distill_weight_at(global_step, total_steps, config))
            except Divergence as exc:
                raise Divergence(f"{exc} at epoch {epoch + 1}, step {progress.step + 1} "
                                 f"(global step {global_step + 1}, lr {lr:.4g})") from None
            progress.add(stats)
            bar.update(1)
            if progress.step % 20 == 1:
                bar.set_postfix(loss=f"{stats[0].item():.3f}", lr=f"{lr:.4f}")
            if info.main and not show_bar and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                print(f"epoch {epoch + 1}/{config.epochs} step {progress.step}/{steps}: "
                      f"loss {stats[0].item():.4f}, lr {lr:.4g}", flush=True)
            if config.checkpoint_every and (global_step + 1) % config.checkpoint_every == 0 and progress.step < steps:
                checkpointer.save(progress)
    return progress.epoch_means()


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
    with agreed(info):
        if info.main:
            check_run_dir(out, resume, overwrite)
        resumed = load_resume(out, config) if resume else None
        data = build_data(config, info.rank, info.world_size, device)
        init = load_source("--init", config.init, config, data.num_classes, data.in_chans) if config.init else None
        teacher_ckpt = (load_source("--teacher", config.teacher, config, data.num_classes, data.in_chans)
                        if config.teacher else None)
    with agreed(info):
        sample, _ = next(iter(data.train.batches(0)))
        model = build_training_model(config, data.num_classes, data.in_chans, sample, device, init)
        teacher = build_teacher(teacher_ckpt, device) if teacher_ckpt is not None else None

    job = TrainJob.create(config, model, teacher, info, device)
    if info.main and device.type == "cpu":
        print(f"step: {job.describe_cpu_step()}", flush=True)
        if suggests_bf16(config):
            print(AMX_HINT, flush=True)
    progress, checkpointer = Progress(), Checkpointer(job, out, data.num_classes, data.in_chans)
    if resumed is not None:
        with agreed(info):
            progress = restore(job, resumed, checkpointer)
    job.wrap_ddp()
    with agreed(info):
        if info.main:
            start_run_dir(out, overwrite, config)

    grid = None
    while progress.epoch < config.epochs:
        epoch, first_step = progress.epoch, progress.step
        progress.start_epoch(device)
        checkpointer.begin_epoch()
        try:
            losses = train_one_epoch(job, data.train, progress, checkpointer)
        except Divergence as exc:
            error = Divergence(f"{exc}; stopping, {checkpointer.last_good_text()} (try a lower --lr)")
            error.all_ranks = True  # every rank saw the same all-reduced loss / weights
            raise error from None
        epoch_time = checkpointer.end_epoch()
        sync_buffers(model, info)
        grid = evaluate_modes(model, data.test, config.resolutions, job.ensemble, device, config.amp,
                              config.channels_last)
        images = (progress.step - first_step) * config.batch_size
        progress.history.append(epoch_row(config, epoch, losses, grid, images / max(1e-9, epoch_time),
                                          len(data.train)))
        if info.main:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses['loss']:.4f}, top-1 {grid_summary(grid)}",
                  flush=True)
        write_run_file(write_metrics_csv, progress.history, out / "metrics.csv", info)
        progress.epoch, progress.step = epoch + 1, 0
        checkpointer.save(progress, complete=epoch + 1 == config.epochs)

    results = build_results(config, model, grid, job.ensemble, data.in_chans, data.num_classes, out.name,
                            checkpointer.trained_time, config.resolutions)
    write_run_file(write_json_atomic, results, out / "results.json", info)
    if info.main:
        print(format_table(results["rows"], results["ensemble"], results.get("ensembles")))
    return results


def restore(job: TrainJob, resumed: dict, checkpointer: Checkpointer) -> Progress:
    """Load a stopped run's weights, optimizer, random state and progress into ``job``."""
    try:
        job.model.load_state_dict(resumed["model"])
        job.ensemble.load_state_dict(resumed["ensemble"])
        job.optimizer.load_state_dict(resumed["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RsqError(f"{checkpointer.out / 'checkpoint.pt'} does not fit its own config: "
                       f"{str(exc).strip().splitlines()[-1][:200]}") from None
    progress = Progress(resumed["epoch"], resumed["step"], resumed["history"])
    partial = resumed.get("partial_epoch")
    if progress.step and partial:
        progress.totals, progress.counted = partial["totals"].to(job.device), partial["counted"]
    checkpointer.trained_time = resumed.get("train_time_s", 0.0)
    checkpointer.last_good = (progress.epoch, progress.step)
    # Nothing in a step draws from these today (data has its own seeded generators); restore
    # them anyway so anything that does (dropout, a random augmentation) continues exactly.
    rng = resumed["rng"]
    torch.set_rng_state(rng["torch"])
    if job.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], job.device)
    if rng.get("python") is not None:
        random.setstate(rng["python"])
    return progress


def epoch_row(config: TrainConfig, epoch: int, losses: dict, grid: dict, images_per_s: float,
              steps: int) -> dict:
    """One line of metrics.csv (a joint model's accuracy columns carry the bit width: top1_28_W4A4)."""
    total_steps, warmup_steps = steps * config.epochs, int(config.warmup_epochs * steps)
    row = {"epoch": epoch + 1, **{k: round(v, 5) for k, v in losses.items()},
           "lr": lr_at((epoch + 1) * steps - 1, total_steps, warmup_steps, config.lr),
           "images_per_s": round(images_per_s, 1)}
    for bits, metrics in grid.items():
        tag = "" if bits is None else f"_{bits_label(bits, bits)}"
        row.update({f"top1_{r}{tag}": round(m["top1"], 3) for r, m in metrics["per_resolution"].items()})
        row[f"top1_ensemble{tag}"] = round(metrics["ensemble"]["top1"], 3)
    return row


def write_run_file(write, obj, path: Path, info: Dist) -> None:
    """Rank 0 writes a run file atomically; every rank calls this, so a failure is agreed by all."""
    with agreed(info):
        if info.main:
            try:
                write(obj, path)
            except OSError as exc:
                raise RsqError(f"cannot write {path}: {exc.strerror or exc}") from None


def build_results(config, model, grid, ensemble: Optional[nn.Module], in_chans, num_classes, run_name,
                  train_time_s, trained_resolutions, calibrated=frozenset()) -> dict:
    """results.json from ``evaluate_modes``'s grid. ``trained_resolutions`` pair with the ensemble's
    alpha (calibrated ones have none). A joint model's ensembles and alphas are keyed by bit width."""
    raw_model = model.module if hasattr(model, "module") else model

    def alpha(weights: Optional[EnsembleWeights]):
        if weights is None:
            return None
        return {str(r): round(w, 4) for r, w in zip(trained_resolutions, weights.weights().tolist())}

    joint = None not in grid
    widest = max(grid) if joint else None
    main_ensemble = ensemble[widest] if joint and ensemble is not None else ensemble
    return {
        "kind": "rsq-results", "format_version": 1, "run": run_name,
        "model": config.model, "data": config.data, "num_classes": num_classes, "in_chans": in_chans,
        "epochs": config.epochs, "distill": config.distill, "seed": config.seed,
        "quant": {**config_quant(config),
                  "left_full_precision": full_precision_layers(raw_model) if config.quantized else []},
        "rows": grid_rows(raw_model, grid, in_chans, config.weight_bits, config.act_bits, set(calibrated)),
        "ensemble": grid[widest]["ensemble"],
        "alpha_weights": alpha(main_ensemble),
        **({"ensembles": {bits_label(b, b): m["ensemble"] for b, m in grid.items() if m["ensemble"] is not None},
            "alpha_weights_by_bits": ({bits_label(b, b): alpha(ensemble[b]) for b in grid} if ensemble is not None
                                      else None)} if joint else {}),
        "train_time_s": round(train_time_s, 1),
    }
