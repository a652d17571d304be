"""Checkpoints: a plain dict that carries its config, written atomically, checked on load."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, config_from_dict
from .errors import RsqError

FORMAT = "rsq-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict:
    """The checkpoint dict, or a one-line error for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise RsqError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RsqError(f"{path} is not a readable rsq checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RsqError(f"{path} is not an rsq checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version", 0) > VERSION:
        raise RsqError(f"{path} was written by a newer rsq (format {ckpt['version']} > {VERSION})")
    return ckpt


def checkpoint_config(ckpt: dict) -> TrainConfig:
    return config_from_dict(ckpt["config"])


def build_model(ckpt: dict) -> nn.Module:
    """The RS-Net a checkpoint describes (trained plus calibrated resolutions), weights loaded."""
    from .convert import add_resolution
    from .models import create_model

    config = checkpoint_config(ckpt)
    model = create_model(config.model, ckpt["num_classes"], ckpt["in_chans"], resolutions=ckpt["resolutions"])
    for resolution, like in ckpt.get("calibrated", {}).items():
        add_resolution(model, int(resolution), like=int(like))
    if config.quantized:
        from .quantize import QuantConfig, quantize_

        quantize_(model, quant_config(config))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise RsqError(f"checkpoint weights do not fit model {config.model}: {str(exc).splitlines()[0]}") from None
    return model


def quant_config(config: TrainConfig):
    from .quantize import QuantConfig

    return QuantConfig(weight_bits=config.weight_bits, act_bits=config.act_bits, quantizer=config.quantizer,
                       first_last=config.first_last, act_per_mode=config.act_per_resolution)


def load_model(path) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    model.eval()
    return model, ckpt
