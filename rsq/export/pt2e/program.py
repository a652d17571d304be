"""The PT2E program of one resolution: exported, quantized with rsq's steps, saved, loaded and compiled."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ...allocator import keep_freed_memory
from ...deps import require
from ...nn.residual import refuse_residual_grids
from .float_model import float_model_for
from .graph import unfold_float_layers
from .grids import PURPOSE, activation_dtype
from .quantizer import make_quantizer
from .xnnpack import fit_xnnpack_requantization, lowered


def _torchao_pt2e():
    return require("torchao.quantization.pt2e.quantize_pt2e", PURPOSE, "torchao")


def to_pt2e(model: nn.Module, resolution: int, in_chans: int, batch: Optional[int] = None,
            backend: str = "x86", int8_weights: bool = True,
            fold_float_bn: bool = True, integer=None, counts: Optional[dict] = None) -> torch.export.ExportedProgram:
    """The converted PT2E program (q/dq + float ops) of ``model`` at ``resolution``.

    ``batch=None`` keeps the batch dimension dynamic (the server path); an int fixes it.
    ``backend``: "x86" (Inductor, uint8 activations) or "xnnpack" (ExecuTorch, int8 activations).
    ``int8_weights=False``: float weights (rsq's dequantized ones) everywhere, see make_quantizer.
    ``fold_float_bn=False`` ("xnnpack" only): float-weight layers keep rsq's weight and apply their BN
    after it (unfold_float_layers), so every resolution's program holds the same float weights.
    ``integer`` ("xnnpack" with int8 weights): the model already lowered at this resolution (``lowered``),
    so that a caller writing several resolutions lowers once; lowered here when not given. ``counts``: see
    fit_xnnpack_requantization.
    """
    refuse_residual_grids(model, "the PT2E / ExecuTorch path")
    activation_dtype(backend)  # an unknown backend fails before any work
    pt2e = _torchao_pt2e()
    float_model, grids = float_model_for(model, resolution, in_chans)
    if backend == "xnnpack" and int8_weights:
        integer = integer if integer is not None else lowered(model, [resolution])
        fit_xnnpack_requantization(integer, float_model, grids, resolution, counts)
    # Batch 2 when dynamic: export specialises a size-1 dimension instead of keeping it symbolic.
    example = (torch.randn(batch or 2, in_chans, resolution, resolution),)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    graph = torch.export.export(float_model, example, dynamic_shapes=dynamic).module()
    if backend == "xnnpack" and not fold_float_bn:
        graph = unfold_float_layers(graph, grids, int8_weights)
    prepared = pt2e.prepare_pt2e(graph, make_quantizer(grids, backend, int8_weights))
    converted = pt2e.convert_pt2e(prepared)
    return torch.export.export(converted, example, dynamic_shapes=dynamic)


def write_pt2e(model: nn.Module, resolution: int, in_chans: int, path) -> Path:
    """Save the PT2E program of one resolution with torch.export.save; returns the path."""
    path = Path(path)
    torch.export.save(to_pt2e(model, resolution, in_chans), str(path))
    return path


def load_pt2e(path, compile: bool = True, keep_memory: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable for a saved PT2E program: Inductor-compiled (the server CPU path) unless compile=False.

    Inductor fuses dq -> conv -> act -> q into oneDNN int8 convs only with freezing on and with
    torchao's x86 passes registered, which importing its X86 Inductor quantizer module does.
    ``keep_memory`` (with compile) sets glibc to keep freed memory for the next call, process-wide
    (rsq/allocator.py): a ResNet-18 RS-Net at batch 32 ran 1.2-2.1x faster that way.
    """
    require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "the Inductor PT2E path", "torchao")
    program = torch.export.load(str(path))
    module = program.module()
    if not compile:
        return module
    if keep_memory:
        keep_freed_memory()
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    # One static graph per batch size: with dynamic shapes Inductor's fused int8 conv asserted the wrong
    # strides for a batch other than the first one it saw.
    return torch.compile(module, dynamic=False)
