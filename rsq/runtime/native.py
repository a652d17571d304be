"""Build and call a C export (``rsq export --format c``) from Python: how `rsq verify` and the tests hold the
C runtime's logits against rsq.runtime's. Numpy and the standard library only (no torch), like rsq.runtime.

The export's sources are compiled into a shared library with the system's C compiler (``$CC``, else cc,
gcc or clang) and called once per image through ctypes.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import RsqError

# -O3 lets the compiler vectorise the int16 dot products; no -ffast-math: the input's float32 division
# and round-half-to-even must be IEEE's, as in numpy.
CFLAGS = ("-O3", "-std=c99", "-Wall", "-Wextra")


def find_compiler() -> Optional[str]:
    """The C compiler to use: $CC if set, else the first of cc, gcc, clang on PATH (None if none)."""
    given = os.environ.get("CC")
    if given:
        return shutil.which(given) or given
    return next((found for found in map(shutil.which, ("cc", "gcc", "clang")) if found), None)


def require_compiler() -> str:
    compiler = find_compiler()
    if compiler is None:
        raise RsqError("running a C export needs a C compiler: install one (e.g. apt-get install gcc) or set CC")
    return compiler


def compile_export(folder, output, shared: bool = True, extra_flags=()) -> Path:
    """Compile a C export folder into ``output``: a shared library, or with ``shared=False`` the rsq_run
    command-line program (``extra_flags``: e.g. ("-march=native",)). A compiler error is an RsqError with its
    first lines."""
    folder, output = Path(folder), Path(output)
    sources = [folder / "rsq_model.c", folder / "rsq_runtime.c"]
    if not shared:
        sources.append(folder / "rsq_run.c")
    missing = [s.name for s in sources if not s.is_file()]
    if missing:
        raise RsqError(f"{folder} is not a C export ({', '.join(missing)} missing)")
    command = [require_compiler(), *CFLAGS, *extra_flags, *(("-shared", "-fPIC") if shared else ()), "-o", str(output),
               *map(str, sources), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        first = " ".join((done.stderr or done.stdout).strip().splitlines()[:3])
        raise RsqError(f"compiling the C export {folder} failed: {first}")
    return output


class _ModelHead(ctypes.Structure):
    """The first fields of rsq_runtime.h's rsq_model."""
    _fields_ = [("name", ctypes.c_char_p), ("num_classes", ctypes.c_int32), ("in_chans", ctypes.c_int32)]


class NativeRuntime:
    """A C export compiled and loaded: ``run(x, resolution)`` gives int32 logits [N, classes] for NCHW float
    images, as rsq.runtime.Runtime.run does."""

    def __init__(self, folder, extra_flags=()):
        self._dir = tempfile.mkdtemp(prefix="rsq_c_")
        try:
            path = compile_export(folder, Path(self._dir) / "librsq_model.so", extra_flags=extra_flags)
            self._lib = ctypes.CDLL(str(path))
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)  # a loaded library needs no file
        lib = self._lib
        lib.rsq_exported.restype = ctypes.c_void_p
        lib.rsq_arena_bytes.restype = ctypes.c_size_t
        lib.rsq_arena_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        for run in (lib.rsq_run, lib.rsq_run_pixels):
            run.restype = ctypes.c_int
            run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._model = lib.rsq_exported()
        head = ctypes.cast(self._model, ctypes.POINTER(_ModelHead)).contents
        self.num_classes, self.in_chans = int(head.num_classes), int(head.in_chans)
        self._arenas: dict[int, np.ndarray] = {}

    def arena_bytes(self, resolution: int) -> int:
        """The arena the C runtime needs at ``resolution`` (0: not exported)."""
        return int(self._lib.rsq_arena_bytes(self._model, int(resolution)))

    def run(self, x: np.ndarray, resolution: int) -> np.ndarray:
        return self._run(self._lib.rsq_run, np.ascontiguousarray(x, dtype=np.float32), resolution)

    def run_pixels(self, pixels: np.ndarray, resolution: int) -> np.ndarray:
        """int32 logits [N, classes] for uint8 NCHW images already at ``resolution``, through rsq_run_pixels
        (no floating point: each pixel's quantized input comes from the export's pixel table)."""
        return self._run(self._lib.rsq_run_pixels, np.ascontiguousarray(pixels, dtype=np.uint8), resolution)

    def _run(self, entry, x: np.ndarray, resolution: int) -> np.ndarray:
        if resolution not in self._arenas:
            size = self.arena_bytes(resolution)
            if size == 0:
                raise RsqError(f"resolution {resolution} is not in this C export")
            self._arenas[resolution] = np.zeros(-(-size // 8), np.int64)  # 8-byte aligned
        arena = self._arenas[resolution]
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, resolution, resolution):
            raise RsqError(f"input shape {tuple(x.shape)} is not [N, {self.in_chans}, {resolution}, {resolution}]")
        logits = np.zeros((len(x), self.num_classes), np.int32)
        for i in range(len(x)):
            code = entry(self._model, int(resolution), x[i].ctypes.data, logits[i].ctypes.data, arena.ctypes.data)
            if code == -3:
                raise RsqError("this C export records no input normalisation (mean, std): feed rsq_run float images")
            if code != 0:
                raise RsqError(f"the C runtime failed at resolution {resolution} (code {code})")
        return logits
