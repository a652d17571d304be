"""Checkpoints: a plain dict that carries its config, written atomically, checked on load."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .config import TrainConfig, config_from_dict
from .errors import RsqError

FORMAT = "rsq-checkpoint"
VERSION = 1
# What every reader of a checkpoint (eval, calibrate, --init, --teacher, --resume) relies on.
REQUIRED_KEYS = ("config", "num_classes", "in_chans", "resolutions", "model")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic_write``: a crash leaves the old file or the new one.

    A full disk or a folder that cannot be written is a one-line RsqError; the old file stays.
    """
    try:
        atomic_write(path, lambda f: torch.save(obj, f), binary=True)
    except OSError as exc:
        raise RsqError(f"cannot write {path}: {exc.strerror or exc}") from None


def _first_sentence(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def checkpoint_file(path) -> Path:
    """A checkpoint file given as itself or as its run folder; a one-line error when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise RsqError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path) -> dict:
    """The checkpoint dict, or a one-line error for missing, truncated or foreign files."""
    path = checkpoint_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickles before failing on them
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle a user's file is the user's file
        reason = _first_sentence(str(exc)) or exc.__class__.__name__
        raise RsqError(f"{path} is not a readable rsq checkpoint (truncated, corrupt or another format): "
                       f"{reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RsqError(f"{path} is not an rsq checkpoint (no '{FORMAT}' marker)")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise RsqError(f"{path} was written by a newer rsq (format {ckpt.get('version')!r} > {VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise RsqError(f"{path} is a damaged rsq checkpoint: it lacks {', '.join(missing)}")
    return ckpt


def checkpoint_config(ckpt: dict) -> TrainConfig:
    if not isinstance(ckpt["config"], dict):
        raise RsqError("damaged rsq checkpoint: its config is not a table of settings")
    return config_from_dict(ckpt["config"])


def build_model(ckpt: dict) -> nn.Module:
    """The RS-Net a checkpoint describes (trained plus calibrated resolutions), weights loaded."""
    from .convert import add_resolution
    from .models import create_model

    config = checkpoint_config(ckpt)
    model = create_model(config.model, ckpt["num_classes"], ckpt["in_chans"], resolutions=ckpt["resolutions"],
                         bits=config.bit_widths or None)
    for resolution, like in ckpt.get("calibrated", {}).items():
        add_resolution(model, int(resolution), like=int(like))
    if config.quantized:
        from .quantize import quantize_

        quantize_(model, quant_config(config))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        # The first line only says "Error(s) in loading state_dict"; the second names the key.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise RsqError(f"checkpoint weights do not fit model {config.model}: {' '.join(lines[:2])[:300]}") from None
    return model


def quant_config(config: TrainConfig):
    from .quantize import QuantConfig

    return QuantConfig(weight_bits=config.weight_bits, act_bits=config.act_bits, quantizer=config.quantizer,
                       first_last=config.first_last, act_per_mode=config.act_per_resolution,
                       quantized_shortcut=config.quantized_shortcut, residual_bits=config.residual_bits)


def load_model(path) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    model.eval()
    return model, ckpt
