"""Top-1/top-5 at every resolution and of the alpha-weighted ensemble; the results rows."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .convert import mode_state, using_mode
from .counting import summarize


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA ("auto" or "bf16"); full fp32 on the CPU unless asked."""
    use_bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _topk_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(target[:, None])
    return torch.stack([hits[:, :1].any(1).sum(), hits.any(1).sum()]).float()


@torch.no_grad()
def evaluate(model: nn.Module, test_data, resolutions: list[int], ensemble_weights: Optional[torch.Tensor] = None,
             device=torch.device("cpu"), amp: str = "off", channels_last: bool = False,
             progress=None) -> dict:
    """{"per_resolution": {r: {"top1","top5"}}, "ensemble": {...} or None, "images": n}.

    Counts are summed over DDP ranks when a process group is running.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(resolutions) + 1, 2, device=device)
    images = torch.zeros((), device=device)
    batches = test_data.batches()
    if progress is not None:
        batches = progress(batches, total=len(test_data))
    for xs, target in batches:
        logits = []
        for i, r in enumerate(resolutions):
            x = xs[r].contiguous(memory_format=torch.channels_last) if channels_last else xs[r]
            with using_mode(model, r), autocast_for(device, amp):
                z = model(x).float()
            counts[i] += _topk_correct(z, target)
            logits.append(z)
        if ensemble_weights is not None:
            z_ens = sum(w * z for w, z in zip(ensemble_weights.to(device), logits))
            counts[-1] += _topk_correct(z_ens, target)
        images += len(target)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(images)
    model.train(was_training)
    n = max(images.item(), 1.0)
    pct = (counts * 100.0 / n).tolist()
    return {
        "per_resolution": {r: {"top1": pct[i][0], "top5": pct[i][1]} for i, r in enumerate(resolutions)},
        "ensemble": {"top1": pct[-1][0], "top5": pct[-1][1]} if ensemble_weights is not None else None,
        "images": int(n),
    }


def evaluate_modes(model: nn.Module, test_data, resolutions: list[int], ensemble: Optional[nn.Module] = None,
                   device=torch.device("cpu"), amp: str = "off", channels_last: bool = False) -> dict:
    """``evaluate`` at every bit width of a joint model, {bits: metrics}; {None: metrics} for a model
    that switches resolution only. ``ensemble``: EnsembleWeights, or BitWidthEnsembles, or None."""
    bit_widths = mode_state(model).bit_widths
    if not bit_widths:
        weights = ensemble.weights().detach() if ensemble is not None else None
        return {None: evaluate(model, test_data, resolutions, weights, device, amp, channels_last)}
    grid = {}
    for bits in bit_widths:
        weights = ensemble[bits].weights().detach() if ensemble is not None else None
        with using_mode(model, resolutions[0], bits):  # the resolution loop inside keeps this bit width
            grid[bits] = evaluate(model, test_data, resolutions, weights, device, amp, channels_last)
    return grid


def grid_rows(model: nn.Module, grid: dict, in_chans: int, weight_bits: int, act_bits: int,
              calibrated: set[int] = frozenset()) -> list[dict]:
    """The result rows of ``evaluate_modes``'s grid: one per (resolution, bit width)."""
    rows = []
    for bits, metrics in grid.items():
        if bits is None:
            rows += result_rows(model, metrics, in_chans, weight_bits, act_bits, calibrated)
            continue
        with using_mode(model, next(iter(metrics["per_resolution"])), bits):
            rows += result_rows(model, metrics, in_chans, bits, bits, calibrated)
    return rows


def grid_summary(grid: dict) -> str:
    """One line per bit width: "28: 91.20 / 24: 90.85 ..., ensemble 91.30"."""
    parts = []
    for bits, metrics in grid.items():
        text = " / ".join(f"{r}: {m['top1']:.2f}" for r, m in metrics["per_resolution"].items())
        if metrics["ensemble"] is not None:
            text += f", ensemble {metrics['ensemble']['top1']:.2f}"
        parts.append(text if bits is None else f"{bits_label(bits, bits)} {text}")
    return "; ".join(parts)


def bits_label(weight_bits: int, act_bits: int) -> str:
    return "FP" if weight_bits == 32 and act_bits == 32 else f"W{weight_bits}A{act_bits}"


def config_bits_label(config) -> str:
    """"W4A4", "FP", or for a model that switches bit widths "FP+W8A8+W4A4+W2A2"."""
    if config.bit_widths:
        return "+".join(bits_label(b, b) for b in config.bit_widths)
    return bits_label(config.weight_bits, config.act_bits)


def config_quant(config) -> dict:
    """A config's quantization as results.json's "quant" records it (less the model's full-precision layers)."""
    return {"label": config_bits_label(config), "weight_bits": config.weight_bits,
            "bit_widths": list(config.bit_widths),
            "act_bits": config.act_bits, "quantizer": config.quantizer if config.quantized else None,
            "first_last": config.first_last if config.quantized else None,
            "quantized_shortcut": config.quantized_shortcut, "residual_bits": config.residual_bits}


def quant_text(quant: dict) -> str:
    """One line for a "quant" record: "W4A4 (lsq, first/last at 8, quantized shortcut)", "FP"."""
    text = quant.get("label", "?")
    if quant.get("quantizer"):
        text += f" ({quant['quantizer']}, first/last at {quant.get('first_last')}"
        text += ", quantized shortcut" if quant.get("quantized_shortcut") else ""
        residual = quant.get("residual_bits", 32)
        text += f", {residual}-bit residual stream)" if residual != 32 else ")"
    return text


def result_rows(model: nn.Module, metrics: dict, in_chans: int, weight_bits: int, act_bits: int,
                calibrated: set[int] = frozenset()) -> list[dict]:
    """One row per (resolution, bits): accuracy and cost columns (see rsq/counting.py)."""
    rows = []
    label = bits_label(weight_bits, act_bits)
    for r, acc in metrics["per_resolution"].items():
        rows.append({"resolution": r, "bits": label, "weight_bits": weight_bits, "act_bits": act_bits,
                     "top1": round(acc["top1"], 3), "top5": round(acc["top5"], 3),
                     **summarize(model, r, in_chans), "calibrated": r in calibrated})
    return rows


def format_table(rows: list[dict], ensemble: Optional[dict] = None, ensembles: Optional[dict] = None) -> str:
    """The per-resolution table printed at the end of train and eval; ``ensembles`` ({bits label:
    metrics}) gives a joint model one ensemble row per bit width."""
    lines = ["| resolution | bits | top-1 | top-5 | MACs | BitOPs | weight size |",
             "|---:|:---|---:|---:|---:|---:|---:|"]
    for row in rows:
        tag = " (calibrated)" if row.get("calibrated") else ""
        lines.append(
            f"| {row['resolution']}{tag} | {row['bits']} | {row['top1']:.2f} | {row['top5']:.2f} | "
            f"{_si(row['macs'])} | {_si(row['bitops'])} | {row['weight_size_bits'] / 8 / 1024:.1f} KiB |"
        )
    if ensembles:
        for label, metrics in ensembles.items():
            lines.append(f"| ensemble | {label} | {metrics['top1']:.2f} | {metrics['top5']:.2f} | | | |")
    elif ensemble is not None:
        lines.append(f"| ensemble | | {ensemble['top1']:.2f} | {ensemble['top5']:.2f} | | | |")
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)
