"""What the CPU can do, from /proc/cpuinfo (Linux; elsewhere nothing is known)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpuinfo_text() -> str:
    """/proc/cpuinfo, read once; empty where it is not readable."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 'flags', Arm 'Features'); empty where /proc/cpuinfo is not readable."""
    for line in cpuinfo_text().splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_amx_bf16() -> bool:
    """Intel AMX with bf16 tiles: oneDNN runs bf16 convolutions on it several times faster than fp32."""
    return "amx_bf16" in cpu_flags()
