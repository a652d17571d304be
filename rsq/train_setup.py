"""Setting up a training run: checks before anything is written, the run folder, the models.

Everything here reads; only ``start_run_dir`` writes, and only once every input has loaded, so
a refused or failing run leaves the folder as it was.
"""
from __future__ import annotations

import copy
import os
import re
import random
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import build_model, checkpoint_config, load_checkpoint, quant_config
from .atomic import remove_stale_temporaries
from .config import TrainConfig, save_config
from .convert import mode_state, using_mode
from .data.multires import resize_batch
from .distributed import Dist, resolve_device, wants_cuda
from .errors import RsqError
from .evaluate import config_bits_label
from .models import create_model

# The files a run owns: --overwrite replaces these (and only these); their temporaries are cleaned.
RUN_FILES = ("checkpoint.pt", "results.json", "config.toml", "metrics.csv")


def check_before_start(config: TrainConfig, info: Dist) -> None:
    """Checks every rank makes before a process group exists; they read, never write.

    The config validated its own values; these depend on the machine and the process layout.
    """
    resolve_device(config.device)
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
        remove_stale_temporaries(out, RUN_FILES)  # left by a run killed while writing
        save_config(config, out / "config.toml")
    except OSError as exc:
        raise RsqError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def param_groups(modules: list[nn.Module], weight_decay: float, head_lr_scale: float = 1.0,
                 conv_decay_scale: float = 1.0, norm_lr_scale: float = 1.0) -> list[dict]:
    """Parameters marked ``_rsq_no_weight_decay`` (alpha, quantizer steps) get none.

    With ``head_lr_scale`` != 1 the weights and biases of the Linear layers (the classifier) form a
    group whose ``lr_scale`` the training step multiplies its learning rate by; with
    ``norm_lr_scale`` != 1 so do the BatchNorms' weights and biases; with ``conv_decay_scale`` != 1
    the convolution weights form one whose weight decay is that many times ``weight_decay``.
    """
    def ids(kind, names):
        return {id(p) for module in modules for m in module.modules() if isinstance(m, kind)
                for p in (getattr(m, name) for name in names) if p is not None}

    head_ids = ids(nn.Linear, ("weight", "bias")) if head_lr_scale != 1.0 else set()
    norm_ids = ids(nn.modules.batchnorm._BatchNorm, ("weight", "bias")) if norm_lr_scale != 1.0 else set()
    conv_ids = ids(nn.Conv2d, ("weight",)) if conv_decay_scale != 1.0 else set()
    decay, no_decay, head, norm, conv, seen = [], [], [], [], [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if getattr(p, "_rsq_no_weight_decay", False):
                no_decay.append(p)
            elif id(p) in head_ids:
                head.append(p)
            elif id(p) in norm_ids:
                norm.append(p)
            else:
                (conv if id(p) in conv_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head:
        groups.append({"params": head, "weight_decay": weight_decay, "lr_scale": head_lr_scale})
    if norm:
        groups.append({"params": norm, "weight_decay": weight_decay, "lr_scale": norm_lr_scale})
    if conv:
        groups.append({"params": conv, "weight_decay": weight_decay * conv_decay_scale})
    return groups


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
        raise RsqError(f"{flag} {path} is a {config_bits_label(source)} checkpoint; {flag} "
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
    """Copy the shared weights and the BN sets of this run's resolutions from --init.

    In a model that switches bit widths, every bit width's BN of a resolution starts from the
    --init model's BN of that resolution (``bns.r28_b4`` from ``bns.r28``).
    """
    source = build_model(init).state_dict()
    state = {}
    for key in model.state_dict():
        origin = re.sub(r"\.bns\.r(\d+)_b\d+\.", r".bns.r\1.", key)
        if origin in source:
            state[key] = source[origin]
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise RsqError(f"--init {path} does not fit this model: {str(exc).strip().splitlines()[-1][:200]}") from None


@torch.no_grad()
def initialize_quantizers(model: nn.Module, sample: torch.Tensor) -> None:
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
    for mode in mode_state(model).modes:  # every resolution, and every bit width of a joint model
        with using_mode(model, mode):
            model(resize_batch(sample, mode.resolution))
    for bn, state in zip(bns, saved):
        bn.load_state_dict(state)
    model.train(was_training)


def build_training_model(config: TrainConfig, num_classes: int, in_chans: int, sample: torch.Tensor,
                         device: torch.device, init: Optional[dict] = None) -> nn.Module:
    model = create_model(config.model, num_classes, in_chans, resolutions=config.resolutions,
                         bits=config.bit_widths or None)
    if init is not None:
        apply_init(model, init, config.init)
    model.to(device)
    if config.quantized:
        from .quantize import quantize_

        quantize_(model, quant_config(config))
        model.to(device)
        initialize_quantizers(model, sample.to(device))
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


