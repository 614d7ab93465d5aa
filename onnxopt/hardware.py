"""What the machine running onnxopt has: asked only for settings a target leaves to "auto".

A target decides everything that depends on the hardware (the same command gives the same
file on any build machine); only a setting the user or the target sets to "auto" probes
this machine, and the pass then records what it found and chose (``PassContext.metadata``:
the report and the output model's metadata).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """True when this CPU has a u8*s8 dot product without int16 saturation (x86 VNNI), or is
    not x86 (ARM's dot products do not saturate either)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        return bool(features.get("avx512vnni") or features.get("avxvnni"))
    except Exception:  # unknown: assume the older CPU, which is the safe choice
        return False


def describe_cpu() -> str:
    """One line for reports: architecture and whether it has VNNI."""
    return f"{platform.machine()} ({'with' if cpu_has_vnni() else 'without'} VNNI dot products)"


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (what makes a timing taken on one machine useless on another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
