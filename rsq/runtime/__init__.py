"""rsq.runtime: run an integer export with numpy only (no torch needed).

    from rsq.runtime import load, Runtime
    model = load("export_dir/packed")          # or an IntegerModel from rsq.export.lower
    logits = Runtime(model).run(images, 28)    # int32 [N, classes]; images NCHW float32, normalised
"""
from .execute import Runtime, dequantize_logits, run
from .model import IntegerModel, Op, QuantWeight, TensorInfo

__all__ = ["IntegerModel", "Op", "QuantWeight", "Runtime", "TensorInfo", "dequantize_logits", "load", "run"]


def load(path) -> IntegerModel:
    """An IntegerModel from a packed export folder (its manifest.json)."""
    from .packed import read_packed
    return read_packed(path)
