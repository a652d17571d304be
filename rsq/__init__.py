"""rsq: quantization-aware training of resolution-switchable networks (RS-Nets)."""
from .convert import add_resolution, convert, mode_state, set_mode, using_mode
from .errors import RsqError
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["RsqError", "add_resolution", "convert", "create_model", "list_models", "mode_state", "set_mode",
           "using_mode"]
