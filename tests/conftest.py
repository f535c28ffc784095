"""Shared helpers: seeded random weights with realistic scale, and the CLI entry point."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Every Segmenter, CLI call and server of the suite runs onnxruntime's CPU provider on the file it is given, so
    answers compare exactly with PyTorch and across processes; tests/test_engines.py lifts this to test the
    automatic engine choice. Measured choices are cached in a folder of this run, not the user's."""
    os.environ.setdefault("SEGSERVE_PROVIDERS", "CPUExecutionProvider")
    os.environ["SEGSERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="segserve-cache-")


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give a randomly initialised classifier realistic scale, so equality tolerances mean something.

    Untrained torchvision nets are badly scaled: ResNet-152's logits reach 1e8, MobileNetV3's 1e-9, where an
    absolute tolerance of 1e-4 is either unreachable or vacuous. BatchNorm statistics are set from ``x``
    (as after training) and the last Linear is rescaled so the logits have unit standard deviation.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the stats of exactly this batch
    with torch.no_grad():
        model.train()(x)
        logits = model.eval()(x)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        scale = logits.std()
        last.weight /= scale
        last.bias /= scale
    return model


@pytest.fixture(scope="session")
def segserve_command() -> list[str]:
    """The installed ``segserve`` console script (the real entry point, not a function call)."""
    script = Path(sys.executable).parent / "segserve"
    found = str(script) if script.exists() else shutil.which("segserve")
    assert found, "the segserve console script is not installed: pip install -e '.[dev]'"
    return [found]


# ---- synthetic labelled collections in the three layouts -------------------------------------------------------

SYNTHETIC_CLASSES = ["background", "box", "stripe"]
SYNTHETIC_COLOURS = [[0, 0, 0], [200, 40, 40], [40, 40, 200]]


def synthetic_pair(index: int, size: tuple[int, int] = (48, 64)):
    """An RGB image and its label map: a red box (class 1) and a blue stripe (class 2) on noise (class 0)."""
    import numpy as np

    rng = np.random.default_rng(index)
    height, width = size
    image = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), dtype=np.uint8)
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    labels[top : top + height // 3, left : left + width // 3] = 1
    column = int(rng.integers(0, width - 6))
    labels[:, column : column + 5] = 2
    for cls, colour in ((1, (220, 40, 40)), (2, (40, 40, 220))):
        image[labels == cls] = colour
    return image, labels


def write_dataset(root: Path, layout: str, train: int = 8, val: int = 3, size: tuple[int, int] = (48, 64)) -> Path:
    """A tiny labelled collection on disk in ``layout`` (camvid, voc or folder); returns its root."""
    import json

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    ignore = 11 if layout == "camvid" else 255
    names = SYNTHETIC_CLASSES
    for split, count in (("train", train), ("val", val)):
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for n, name in enumerate(ids):
            image, labels = synthetic_pair(n + (0 if split == "train" else 1000), size)
            labels = labels.copy()
            labels[0, :3] = ignore  # a few ignored pixels
            if layout == "camvid":
                (root / split).mkdir(exist_ok=True)
                (root / f"{split}annot").mkdir(exist_ok=True)
                Image.fromarray(image).save(root / split / f"{name}.png")
                Image.fromarray(labels).save(root / f"{split}annot" / f"{name}.png")
            elif layout == "voc":
                for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
                    (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=98)
                mask = Image.fromarray(labels).convert("P")  # indices kept; a full 256-colour palette as VOC's
                palette = [v for c in SYNTHETIC_COLOURS for v in c]
                mask.putpalette(palette + [224] * (768 - len(palette)))
                mask.save(root / "SegmentationClass" / f"{name}.png")
            else:
                (root / split / "images").mkdir(parents=True, exist_ok=True)
                (root / split / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / split / "images" / f"{name}.png")
                Image.fromarray(labels).save(root / split / "masks" / f"{name}.png")
        if layout == "voc":
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if layout != "voc":
        spec = {"classes": names, "colors": SYNTHETIC_COLOURS, "ignore_index": ignore}
        (root / "classes.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def dataset_factory(tmp_path: Path):
    def make(layout: str = "camvid", **kwargs) -> Path:
        return write_dataset(tmp_path / f"data_{layout}", layout, **kwargs)

    return make


# ---- the serving side without torch ------------------------------------------------------------------------------


@pytest.fixture
def torchless_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import torch`` / ``import torchvision`` raise, as on a serving image."""
    blocker = tmp_path / "torch-blocker"
    for name in ("torch", "torchvision"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {
        "PYTHONPATH": str(blocker),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SEGSERVE_PROVIDERS": os.environ.get("SEGSERVE_PROVIDERS", "CPUExecutionProvider"),
    }  # as the suite pins


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A MobileNetV3-small FCN-8s at input scale 0.5 exported to ONNX: (path, the PyTorch pipeline it came from)."""
    from test_export import fake_checkpoint

    from segserve.export import checkpoint_graph, export_onnx

    graph, metadata = checkpoint_graph(fake_checkpoint("8s", input_scale=0.5, backbone="mobilenet_v3_small"))
    path = export_onnx(graph, tmp_path_factory.mktemp("small-model") / "small.onnx", metadata)
    return path, graph.pipeline.eval()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with (almost) no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
