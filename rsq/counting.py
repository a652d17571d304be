"""MACs, BitOPs and weight size of one mode of a switchable network.

Definitions (also in the README):
- MACs: conv = C_out * H_out * W_out * (C_in / groups) * k_h * k_w; linear = in * out.
  Only conv and linear layers count (BN, ReLU, pooling, additions are left out).
- BitOPs: sum over conv/linear layers of MACs * weight bits * activation bits; a layer without
  a quantizer counts as 32 x 32. Quantized layers report their own ``weight_bits`` and
  ``act_bits`` attributes (so first/last layers count at whatever bits they run at).
- Weight size: conv/linear weights at their weight bits, plus everything else one mode needs
  (biases, that mode's BN scale and shift, quantizer step sizes) at 32 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .convert import mode_state, using_mode

FULL_PRECISION_BITS = 32


@dataclass
class LayerCost:
    name: str
    macs: int
    weight_bits: int
    act_bits: int

    @property
    def bitops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


def _bits(module: nn.Module, attr: str) -> int:
    value = getattr(module, attr, None)
    return FULL_PRECISION_BITS if value is None else int(value)


def _is_counted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


@torch.no_grad()
def layer_costs(model: nn.Module, resolution: int, in_chans: int) -> list[LayerCost]:
    """Run one dummy image at ``resolution`` and record each conv/linear layer's cost."""
    costs: list[LayerCost] = []
    handles = []

    def hook(module, inputs, output, name):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.shape[1] * output.shape[2] * output.shape[3] * (module.in_channels // module.groups) * kh * kw
        else:
            macs = module.in_features * module.out_features * (output.numel() // output.shape[-1] // output.shape[0])
        costs.append(LayerCost(name, int(macs), _bits(module, "weight_bits"), _bits(module, "act_bits")))

    for name, module in model.named_modules():
        if _is_counted(module):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with using_mode(model, resolution):
            model(torch.zeros(1, in_chans, resolution, resolution, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return costs


def mode_parameters(model: nn.Module, resolution: int) -> list[nn.Parameter]:
    """The parameters one resolution runs with: every shared one, and from each switchable
    layer (BN, per-resolution quantizer) only that resolution's own."""
    key = mode_state(model).find(resolution).key
    own: list[nn.Parameter] = []
    other_modes: set[int] = set()
    for module in model.modules():
        if callable(getattr(module, "for_mode", None)):
            mine = {id(p) for p in module.for_mode(key).parameters()}
            other_modes.update(id(p) for p in module.parameters() if id(p) not in mine)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in other_modes and id(p) not in seen:
            seen.add(id(p))
            own.append(p)
    return own


def weight_size_bits(model: nn.Module, resolution: int) -> int:
    """Bits to store what one resolution needs: conv/linear weights at their weight bits,
    everything else (biases, that resolution's BN, quantizer steps) at 32 bits."""
    weight_bits = {id(m.weight): _bits(m, "weight_bits") for m in model.modules() if _is_counted(m)}
    return sum(p.numel() * weight_bits.get(id(p), FULL_PRECISION_BITS) for p in mode_parameters(model, resolution))


def mode_params(model: nn.Module, resolution: int) -> int:
    """Parameters one resolution uses: all shared ones plus its own switchable layers' (BN, quantizers)."""
    return sum(p.numel() for p in mode_parameters(model, resolution))


def summarize(model: nn.Module, resolution: int, in_chans: int) -> dict:
    """The cost columns of one result row."""
    costs = layer_costs(model, resolution, in_chans)
    return {
        "macs": sum(c.macs for c in costs),
        "bitops": sum(c.bitops for c in costs),
        "weight_size_bits": weight_size_bits(model, resolution),
        "params": mode_params(model, resolution),
    }
