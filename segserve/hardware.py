"""What the machine offers, probed without importing an engine: a GPU, and the CPU's model and ISA features."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: ISA features that decide which precision pays on a CPU (names as /proc/cpuinfo spells them).
ISA_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (onnxruntime-gpu lists its CUDA provider even where none is)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def isa_features() -> list[str]:
    """Which of :data:`ISA_FEATURES` this CPU has, in that order."""
    flags = cpu_flags()
    return [name for name in ISA_FEATURES if name in flags]


def native_bf16() -> bool:
    """bf16 arithmetic in hardware (AMX or AVX512-BF16): where bf16 inference and training can pay."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
