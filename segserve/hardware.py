"""What the machine offers, probed without importing an engine (used for defaults: slots, providers)."""

from __future__ import annotations

from pathlib import Path


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (onnxruntime-gpu lists its CUDA provider even where none is)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()
