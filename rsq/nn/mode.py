"""The "mode" a switchable network runs in, and the state its switchable layers share.

A mode is what a switchable layer is keyed by: an input resolution, and in a model that also
switches bit widths, a (resolution, bits) pair. Layers only ever look up ``mode.key``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

from ..errors import RsqError


@dataclass(frozen=True, order=True)
class Mode:
    """One way of running the shared network: an input resolution, and (in a joint model) a bit width."""

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
    spatial size (set by a forward pre-hook on the root model). Both are per thread, so that
    threads can run different modes of one model at the same time (the training step runs its
    modes on two CPU threads); a new thread starts in the largest mode, unpinned.
    """

    def __init__(self, modes: list[Mode]):
        self.modes: list[Mode] = sorted(set(modes), reverse=True)
        self._local = threading.local()

    def _get(self, name: str, default):
        return getattr(self._local, name, default)

    @property
    def current(self) -> Optional[Mode]:
        return self._get("current", self.modes[0] if self.modes else None)

    @current.setter
    def current(self, mode: Optional[Mode]) -> None:
        self._local.current = mode

    @property
    def pinned(self) -> Optional[Mode]:
        return self._get("pinned", None)

    @pinned.setter
    def pinned(self, mode: Optional[Mode]) -> None:
        self._local.pinned = mode

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle take the calling thread's view; a thread-local object cannot be copied.
        return {"modes": self.modes, "current": self.current, "pinned": self.pinned}

    def __setstate__(self, state: dict) -> None:
        self.modes, self._local = state["modes"], threading.local()
        self.current, self.pinned = state["current"], state["pinned"]

    @property
    def resolutions(self) -> list[int]:
        return sorted({m.resolution for m in self.modes}, reverse=True)

    @property
    def bit_widths(self) -> list[int]:
        """The bit widths a joint model switches between, widest first; [] when it switches resolution only."""
        return sorted({m.bits for m in self.modes if m.bits is not None}, reverse=True)

    def grid_text(self) -> str:
        if not self.bit_widths:
            return ", ".join(str(r) for r in self.resolutions)
        return (f"resolutions {', '.join(str(r) for r in self.resolutions)} x bits "
                f"{', '.join(str(b) for b in self.bit_widths)}")

    def add(self, mode: Mode) -> None:
        if mode not in self.modes:
            self.modes = sorted(self.modes + [mode], reverse=True)

    def find(self, resolution: int, bits: Optional[int] = None) -> Mode:
        """The mode for a resolution (at ``bits``, default: the current bit width), or a clear error."""
        if bits is None and self.current is not None:
            bits = self.current.bits
        if bits is not None and bits not in self.bit_widths:
            raise RsqError(f"bit width {bits} is not one this model switches to (trained grid: {self.grid_text()})")
        for mode in self.modes:
            if mode.resolution == resolution and mode.bits == bits:
                return mode
        if self.bit_widths:
            raise RsqError(f"mode ({resolution} px, {bits} bits) is not in this model (trained grid: "
                           f"{self.grid_text()}); train it or add the resolution with `rsq calibrate`")
        known = ", ".join(str(r) for r in self.resolutions)
        raise RsqError(
            f"input resolution {resolution} has no BatchNorm set in this model "
            f"(known resolutions: {known}); train it or add it with `rsq calibrate`"
        )

    def for_key(self, key: str) -> Mode:
        return next(m for m in self.modes if m.key == key)
