"""The residual stream on a grid, two ways: quantized shortcuts (a block's input quantized once, on the
grid its first conv reads, and that same tensor carried by the shortcut: ``QuantConfig(quantized_shortcut=True)``),
or learned residual grids (what each add reads and each block's output: ``QuantConfig(residual_bits=8)``).

By default (as in RS-Nets and LQ-Nets) each conv quantizes its own input and the shortcut adds the
float block input, so an integer graph keeps a wide (int32) residual stream and int8 kernels cannot
fuse a block's add. With quantized shortcuts, conv1, the downsample conv and the identity shortcut
all read one quantized tensor (one quantizer, one step): a block's output is the sum of its second
conv and a tensor on a known integer grid, which an int8 backend computes inside that conv.
"""
from __future__ import annotations

from operator import attrgetter

from torch import nn

from ..errors import RsqError
from .quant_layers import QuantConv2d

CONV1_GRID = "conv1.act_quantizer"
RESIDUAL_INPUT, RESIDUAL_OUTPUT = "residual_input", "residual_output"
# (base class, kind, argument) -> the subclass of a block class that quantize_shortcuts_ ("input") or
# quantize_residual_ ("grid") gives a block; both only wrap its forward.
_VARIANTS: dict[tuple[type, str, object], type] = {}


def _block_variant(base: type, kind: str, arg) -> type:
    if (base, kind, arg) not in _VARIANTS:
        if kind == "input":  # x through the quantizer at attribute path ``arg`` first
            quantizer_of = attrgetter(arg)

            def forward(self, x, *args, **kwargs):
                return base.forward(self, quantizer_of(self)(x), *args, **kwargs)
            attrs, prefix = {"input_quantizer": property(quantizer_of)}, "QuantizedInput"
        else:  # the block's output, and with ``arg`` its input, through the residual stream's quantizers
            def forward(self, x, *args, **kwargs):
                if arg:
                    x = getattr(self, RESIDUAL_INPUT)(x)
                return getattr(self, RESIDUAL_OUTPUT)(base.forward(self, x, *args, **kwargs))
            attrs, prefix = {}, "ResidualGrid"

        def reduce(self, protocol):
            # Pickled as its importable base class; loading applies this subclass again.
            return _restore, (base, kind, arg, self.__getstate__())

        name = prefix + base.__name__
        variant = type(name, (base,), {**attrs, "forward": forward, "__reduce_ex__": reduce, "__qualname__": name})
        _VARIANTS[base, kind, arg] = variant
    return _VARIANTS[base, kind, arg]


def _restore(base: type, kind: str, arg, state: dict) -> nn.Module:
    block = base.__new__(base)
    block.__setstate__(state)
    block.__class__ = _block_variant(base, kind, arg)
    return block


def _base_of(block: nn.Module, kind: str):
    """The class a ``kind`` variant was made from, or None when ``block`` is not one."""
    return next((base for (base, k, _), cls in _VARIANTS.items() if k == kind and type(block) is cls), None)


def quantized_input_class(base: type, via: str = CONV1_GRID) -> type:
    """``base`` (a block class whose forward(x) feeds x to conv1 and to the shortcut) with x passed through
    the quantizer at attribute path ``via`` first: conv1's own by default; the brevitas bridge gives its
    twin a QuantIdentity there instead."""
    return _block_variant(base, "input", via)


def plain_class(block: nn.Module) -> type:
    """The block's own class, before quantize_shortcuts_ (itself when it was never changed)."""
    return _base_of(block, "input") or type(block)


def has_quantized_input(block: nn.Module) -> bool:
    return _base_of(block, "input") is not None


def downsample_conv(block: nn.Module):
    """A block's downsample conv: None without a downsample, False when it does not start with a quantized conv."""
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        return None
    first = downsample[0] if isinstance(downsample, nn.Sequential) and len(downsample) else downsample
    return first if isinstance(first, QuantConv2d) else False


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every ResNet-style block: a quantized conv1 and a ``downsample`` attribute that is
    None or starts with a quantized conv (rsq's CIFAR BasicBlock, torchvision's BasicBlock and Bottleneck)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "conv1", None), QuantConv2d) and hasattr(m, "downsample")
            and downsample_conv(m) is not False]


def quantize_shortcuts_(model: nn.Module) -> int:
    """Give every residual block of a quantized model one input quantizer (conv1's), shared by its
    downsample conv and carried by its shortcut; returns how many blocks changed."""
    blocks = residual_blocks(model)
    if not blocks:
        raise RsqError("quantized_shortcut needs residual blocks (a module with a quantized conv1 and a "
                       "downsample attribute, as in ResNets); this model has none")
    for name, block in blocks:
        quantizer = block.conv1.act_quantizer
        downsample = downsample_conv(block)
        if downsample is not None:
            other = downsample.act_quantizer
            if (getattr(other, "bits", None), getattr(other, "signed", None)) != (
                    getattr(quantizer, "bits", None), getattr(quantizer, "signed", None)):
                raise RsqError(f"block {name}: conv1 and the downsample conv read their input at different bits "
                               f"or signs; a quantized shortcut needs one grid")
            downsample.act_quantizer = quantizer
            downsample.reads_quantized_input = True
        block.conv1.reads_quantized_input = True
        block.__class__ = quantized_input_class(type(block))
    return len(blocks)


def plain_shortcuts_(model: nn.Module) -> None:
    """Undo quantize_shortcuts_'s class change (the shared quantizer stays on each reader)."""
    for module in model.modules():
        if has_quantized_input(module):
            module.__class__ = plain_class(module)
        if isinstance(module, QuantConv2d):
            module.__dict__.pop("reads_quantized_input", None)


# ---- the residual stream on learned grids (QuantConfig(residual_bits=8)) ----

class ResidualGrid(nn.Sequential):
    """A branch's last BN (or a downsample) followed by the quantizer of the residual add's input."""


def residual_grid_class(base: type, quantize_input: bool) -> type:
    """``base`` (a residual block) with its output, and with ``quantize_input`` its input, through the residual
    stream's quantizers (attributes residual_output / residual_input)."""
    return _block_variant(base, "grid", quantize_input)


def _branch_end(block: nn.Module) -> str:
    """The attribute of the BN that ends a block's branch (before the add): bn3 in a bottleneck, else bn2."""
    for name in ("bn3", "bn2"):
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise RsqError(f"residual_bits needs each residual block's branch to end in a BatchNorm named bn2 or bn3; "
                   f"{type(block).__name__} has neither")


def quantize_residual_(model: nn.Module, quantizer) -> int:
    """Put the residual stream of every block of a quantized ResNet on learned grids: the branch's last BN
    output and the downsample output (what the add reads; ``quantizer(signed=True)``), the block's output
    (``quantizer(signed=False)``: after the block's ReLU) and the first block's input (the stem's output).
    Returns how many blocks changed."""
    blocks = residual_blocks(model)
    if not blocks:
        raise RsqError("residual_bits needs residual blocks (a module with a quantized conv1 and a downsample "
                       "attribute, as in ResNets); this model has none")
    for i, (name, block) in enumerate(blocks):
        end = _branch_end(block)
        setattr(block, end, ResidualGrid(getattr(block, end), quantizer(signed=True)))
        if block.downsample is not None:
            if not isinstance(block.downsample, nn.Sequential):
                raise RsqError(f"block {name}: residual_bits needs its downsample to be an nn.Sequential")
            block.downsample = ResidualGrid(*block.downsample, quantizer(signed=True))
        setattr(block, RESIDUAL_OUTPUT, quantizer(signed=False))
        if i == 0:
            setattr(block, RESIDUAL_INPUT, quantizer(signed=False))
        block.__class__ = residual_grid_class(type(block), i == 0)
    return len(blocks)


def refuse_residual_grids(model: nn.Module, what: str) -> None:
    """An RsqError when ``model`` has its residual stream on learned grids, which ``what`` does not carry."""
    if any(isinstance(m, ResidualGrid) for m in model.modules()):
        raise RsqError(f"{what} does not take a residual stream on learned grids (residual_bits); export the model "
                       f"as onnx, qlinear, packed or c")


def plain_residual_(model: nn.Module) -> None:
    """Undo quantize_residual_: the blocks' own classes, BNs and downsamples, the residual quantizers dropped."""
    for module in list(model.modules()):
        base = _base_of(module, "grid")
        if base is None:
            continue
        module.__class__ = base
        for attribute in (RESIDUAL_INPUT, RESIDUAL_OUTPUT):
            if attribute in module._modules:
                del module._modules[attribute]
        end = _branch_end(module)
        if isinstance(getattr(module, end), ResidualGrid):
            setattr(module, end, getattr(module, end)[0])
        if isinstance(module.downsample, ResidualGrid):
            module.downsample = nn.Sequential(*list(module.downsample)[:-1])
