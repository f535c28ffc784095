"""Training-time augmentation: random scale, crop with ignore padding, horizontal flip, colour jitter and, on
request, camera-like photometric changes (white balance, gamma, blur, sensor noise).

Every random draw comes from a generator seeded by (seed, epoch, sample index), so a sample's augmentation does
not depend on worker count, batch order or whether the run was resumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segserve.datasets import IGNORE
from segserve.models.pipeline import resize


@dataclass(frozen=True)
class AugmentConfig:
    """``input_scale`` is the inference scale; training scales are ``input_scale`` times a factor drawn
    log-uniformly from ``scale_range``. ``crop`` is (height, width) at network resolution."""

    input_scale: float = 1.0
    scale_range: tuple[float, float] = (0.75, 1.5)
    crop: tuple[int, int] = (256, 256)
    flip: bool = True
    jitter: float = 0.2  # brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter]
    photometric: str = "light"  # "strong" adds white balance, gamma, blur and noise: another camera, another day


def augment(
    image: np.ndarray, mask: np.ndarray, mean: Tensor, config: AugmentConfig, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """One training pair: ``image`` H x W x 3 uint8, ``mask`` H x W uint8 -> (3 x h x w float in [0, 255],
    h x w int64) at the crop size. Image padding is ``mean`` (zero once normalised); mask padding is ignored."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    y = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    low, high = config.scale_range
    scale = config.input_scale * math.exp(rng.uniform(math.log(low), math.log(high)))
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    x = resize(x, size)
    y = F.interpolate(y, size=size, mode="nearest-exact")

    crop_h, crop_w = config.crop
    pad_h, pad_w = max(0, crop_h - size[0]), max(0, crop_w - size[1])
    if pad_h or pad_w:
        x = F.pad(x - mean.view(1, 3, 1, 1), (0, pad_w, 0, pad_h)) + mean.view(1, 3, 1, 1)
        y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE)
    top = int(rng.integers(0, x.shape[-2] - crop_h + 1))
    left = int(rng.integers(0, x.shape[-1] - crop_w + 1))
    x = x[..., top : top + crop_h, left : left + crop_w]
    y = y[..., top : top + crop_h, left : left + crop_w]
    if config.flip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if config.jitter > 0:
        x = _jitter(x, rng, config.jitter)
    if config.photometric == "strong":
        x = _camera(x, rng)
    return x[0], y[0, 0].long()


def _jitter(x: Tensor, rng: np.random.Generator, amount: float) -> Tensor:
    brightness, contrast, saturation = rng.uniform(1 - amount, 1 + amount, size=3)
    x = x * brightness
    x = x.mean() + (x - x.mean()) * contrast
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = grey + (x - grey) * saturation
    return x.clamp(0, 255)


def _camera(x: Tensor, rng: np.random.Generator) -> Tensor:
    """What another camera or another day changes: white balance (per-channel gain), tone curve (gamma), focus
    (Gaussian blur, one image in four) and sensor noise (one in four). Draws only from ``rng``."""
    gains = torch.from_numpy(rng.uniform(0.85, 1.15, size=3).astype(np.float32)).view(1, 3, 1, 1)
    gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    x = 255.0 * ((x * gains).clamp(0, 255) / 255.0) ** gamma
    if rng.random() < 0.25:
        x = _blur(x, rng.uniform(0.4, 1.2))
    if rng.random() < 0.25:
        noise = rng.normal(0.0, rng.uniform(2.0, 8.0), size=tuple(x.shape)).astype(np.float32)
        x = x + torch.from_numpy(noise)
    return x.clamp(0, 255)


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)  # one 1-D kernel per channel (depthwise)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(3, 1, 1, -1), groups=3)
    return F.conv2d(x, taps.view(3, 1, -1, 1), groups=3)
