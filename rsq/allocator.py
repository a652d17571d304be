"""glibc malloc settings that keep freed memory for reuse: big-tensor inference on the CPU.

A batch of 32 at 224 px makes activations of 6-100 MB. glibc returns the top of its heap to the
operating system once more than M_TRIM_THRESHOLD bytes are free there (by default twice the
dynamic mmap threshold, at most 64 MB), and a compiled graph frees its buffers after every call,
so each call maps its memory afresh and the kernel zero-fills it page by page. On a 2-core Xeon
a ResNet-18 RS-Net's int8 PT2E program, whose convolutions before a float residual add write
float32 outputs, ran 1.2-2.1x faster with freed memory kept (tools/results/bench_pt2e_server.md).
Keeping the freed memory costs its size in resident memory, which a server running the same graph
again wants anyway.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems: bigger blocks are always mapped
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim in practice
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 32 MB from its heap and never trim the heap; True when set.

    Process-wide and lasting. Does nothing (False) off Linux, without glibc's mallopt (musl), or when
    the user already chose either setting through glibc's MALLOC_*_ environment variables.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold goes first so nothing is trimmed in between.
    _kept = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    return _kept
