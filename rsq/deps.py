"""Optional packages: a missing one is a one-line error that says what to install."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from .errors import RsqError


def require(module: str, purpose: str, package: Optional[str] = None) -> ModuleType:
    """``import module``, or an RsqError naming the package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module.split(".")[0]
        raise RsqError(f"{purpose} needs the Python package {name!r}, which cannot be imported ({exc}); "
                       f"install it with: pip install {name}") from None
