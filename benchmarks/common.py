"""Timing, machine description and Markdown helpers shared by the benchmark sections."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


@dataclass
class Section:
    """One question's answer: a title, a Markdown table and notes."""

    title: str
    headers: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def alternate(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
              settle: float = 0.05) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each contender, run in turn (A, B, A, B, ...) after ``warmup`` calls each.

    ``settle`` seconds (untimed) between calls let the previous contender's thread pool go idle: OpenMP and
    onnxruntime threads spin for a while after work and would otherwise slow whoever runs next."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(settle)
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, str]:
    """CPU model, cores, GPU (if any), library versions."""
    import onnxruntime as ort

    import segserve

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "none"  # fmt: skip
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "gpu": gpu, "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__, "segserve": segserve.__version__}  # fmt: skip
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    return info


def road_images(count: int, size: tuple[int, int] | None = None, split: str = "val") -> list[np.ndarray]:
    """CamVid frames when ../shared is present (resized to ``size`` = (H, W) if given), else seeded noise."""
    from PIL import Image

    frames = sorted((CAMVID / split).glob("*.png"))
    images = []
    for index in range(count):
        if frames:
            with Image.open(frames[(index * 7) % len(frames)]) as frame:
                frame = frame.convert("RGB")
                if size is not None:
                    frame = frame.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(frame))
        else:
            height, width = size or (360, 480)
            images.append(np.random.default_rng(index).integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return images


def default_model() -> Path:
    from segserve.runtime.segmenter import default_model_path

    return default_model_path()
