"""The "mode" a switchable network runs in, and the state its switchable layers share.

A mode is what a switchable layer is keyed by. Today it is an input resolution; a bit width
can join it later without changing any layer: layers only ever look up ``mode.key``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import RsqError


@dataclass(frozen=True, order=True)
class Mode:
    """One way of running the shared network: an input resolution (and later a bit width)."""

    resolution: int
    bits: Optional[int] = None

    @property
    def key(self) -> str:
        # Module names may not contain dots, so the key is a plain identifier-like string.
        return f"r{self.resolution}" if self.bits is None else f"r{self.resolution}_b{self.bits}"

    def __str__(self) -> str:
        return str(self.resolution) if self.bits is None else f"{self.resolution}px/{self.bits}bit"


class ModeState:
    """The active mode, shared by reference between all switchable layers of one model.

    ``pinned`` is a mode chosen explicitly by the user; otherwise the mode follows the input's
    spatial size (set by a forward pre-hook on the root model).
    """

    def __init__(self, modes: list[Mode]):
        self.modes: list[Mode] = sorted(set(modes), reverse=True)
        self.current: Optional[Mode] = self.modes[0] if self.modes else None
        self.pinned: Optional[Mode] = None

    @property
    def resolutions(self) -> list[int]:
        return sorted({m.resolution for m in self.modes}, reverse=True)

    def add(self, mode: Mode) -> None:
        if mode not in self.modes:
            self.modes = sorted(self.modes + [mode], reverse=True)

    def find(self, resolution: int) -> Mode:
        """The mode for an input resolution, or a clear error naming the known ones."""
        bits = self.current.bits if self.current is not None else None
        for mode in self.modes:
            if mode.resolution == resolution and mode.bits == bits:
                return mode
        known = ", ".join(str(r) for r in self.resolutions)
        raise RsqError(
            f"input resolution {resolution} has no BatchNorm set in this model "
            f"(known resolutions: {known}); train it or add it with `rsq calibrate`"
        )
