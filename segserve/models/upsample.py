"""Learnable upsampling: ``ConvTranspose2d`` initialised as bilinear interpolation (the FCN paper's deconv)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def bilinear_kernel(size: int) -> Tensor:
    """The ``size`` x ``size`` bilinear interpolation filter (Caffe's ``upsample_filt``)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(taps, taps)


def bilinear_upsampler(channels: int, factor: int, *, trainable: bool = True) -> nn.ConvTranspose2d:
    """An x``factor`` channel-wise upsampler: kernel ``2 * factor``, stride ``factor``, no bias.

    Padding ``factor // 2`` makes the output exactly ``factor`` times the input and places samples where
    ``F.interpolate(mode="bilinear", align_corners=False)`` does, so the two agree away from the border (the
    deconvolution fades to zero at the edge instead of clamping). The weight is a full
    ``channels x channels`` matrix, diagonal at init, as in the paper: training may mix classes.
    """
    if factor < 2 or factor % 2:
        raise ValueError(f"upsampling factor must be an even integer >= 2, got {factor}")
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        kernel = bilinear_kernel(2 * factor).to(layer.weight.dtype)
        for channel in range(channels):
            layer.weight[channel, channel] = kernel
    layer.weight.requires_grad_(trainable)
    return layer
