"""rsq: quantization-aware training of resolution-switchable networks (RS-Nets)."""
from .errors import RsqError

__version__ = "0.1.0"

__all__ = ["QuantConfig", "RsqError", "TrainConfig", "add_resolution", "convert", "create_model", "dequantize_",
           "list_models", "mode_state", "quantize_", "set_mode", "using_mode"]

# rsq.runtime (numpy only) must import on a machine without torch, and importing a submodule
# runs this file first: so the torch-based names are bound only when torch imports. (They cannot
# load lazily: importing the submodule rsq.convert would then bind the module over the function.)
try:
    import torch as _torch  # noqa: F401
except ImportError as _error:
    _TORCH_ERROR = _error
else:
    _TORCH_ERROR = None
    from .config import TrainConfig
    from .convert import add_resolution, convert, mode_state, set_mode, using_mode
    from .models import create_model, list_models
    from .quantize import QuantConfig, dequantize_, quantize_


def __getattr__(name):
    if name in __all__ and _TORCH_ERROR is not None:
        raise ImportError(f"rsq.{name} needs PyTorch, which does not import here: {_TORCH_ERROR}")
    raise AttributeError(f"module 'rsq' has no attribute {name!r}")
