"""Shared helpers: seeded random weights with realistic scale, and the CLI entry point."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


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
