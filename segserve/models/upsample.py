"""Learnable upsampling: ``ConvTranspose2d`` initialised as bilinear interpolation (the FCN paper's deconv),
and its sub-pixel convolution form for inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class SubPixelDeconvolution(nn.Module):
    """A ``ConvTranspose2d`` rewritten as a ``Conv2d`` to ``C_out * s * s`` channels and a pixel shuffle by ``s``.

    The same sums of the same products (outputs equal to float rounding), but where onnxruntime runs a transposed
    convolution as a thin GEMM into a ``C_out * k * k``-row column buffer and a col2im scatter, this is one
    ordinary convolution and a DepthToSpace. In float the two forms cost about the same on a CPU; in int8 this one
    is quantized at all (onnxruntime's CPU provider has no quantized ConvTranspose): on the shipped model at
    512x512, 8 ms of float transposed convolutions became under 3 ms of QLinearConv and DepthToSpace.

    Output row ``y = s * m + r`` of the transposed convolution collects input rows ``m - d`` through kernel row
    ``s * d + r + p`` for every ``d`` that keeps that row inside the kernel; the ``Conv2d`` kernel lays those taps
    out per output phase ``(r, q)``, in ``pixel_shuffle``'s channel order.
    """

    def __init__(self, layer: nn.ConvTranspose2d) -> None:
        super().__init__()
        if not can_rewrite(layer):
            raise ValueError(
                f"not a square, ungrouped transposed convolution with kernel = stride + 2 * padding: {layer}"
            )
        stride, size, pad = layer.stride[0], layer.kernel_size[0], layer.padding[0]
        weight = layer.weight.detach()  # C_in x C_out x k x k
        c_in, c_out = weight.shape[:2]
        offsets = [d for d in range(-size, size + 1) for r in range(stride) if 0 <= stride * d + r + pad < size]
        low, high = min(offsets), max(offsets)
        taps = high - low + 1
        kernel = weight.new_zeros(c_out, stride, stride, c_in, taps, taps)
        for r in range(stride):  # output phase along y, then along x
            for t in range(taps):
                ky = stride * (high - t) + r + pad
                if not 0 <= ky < size:
                    continue
                for q in range(stride):
                    for u in range(taps):
                        kx = stride * (high - u) + q + pad
                        if 0 <= kx < size:
                            kernel[:, r, q, :, t, u] = weight[:, :, ky, kx].T
        symmetric = high == -low
        self.conv = nn.Conv2d(c_in, c_out * stride * stride, taps, padding=high if symmetric else 0,
                              bias=layer.bias is not None, dtype=weight.dtype, device=weight.device)  # fmt: skip
        with torch.no_grad():
            self.conv.weight.copy_(kernel.reshape(c_out * stride * stride, c_in, taps, taps))
            if layer.bias is not None:
                self.conv.bias.copy_(layer.bias.detach().repeat_interleave(stride * stride))
        self.pad = None if symmetric else (high, -low, high, -low)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x if self.pad is None else F.pad(x, self.pad)), self.stride)


def can_rewrite(layer: nn.ConvTranspose2d) -> bool:
    """Whether :class:`SubPixelDeconvolution` reproduces ``layer`` (every FCN upsampler here qualifies)."""
    (sy, sx), (ky, kx), (py, px) = layer.stride, layer.kernel_size, layer.padding
    plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.output_padding == (0, 0)
    return plain and sy == sx and ky == kx and py == px and ky == sy + 2 * py


def subpixel_deconvolutions(module: nn.Module) -> nn.Module:
    """``module`` with every rewritable ``ConvTranspose2d`` replaced in place by a :class:`SubPixelDeconvolution`."""
    for name, child in module.named_children():
        if isinstance(child, nn.ConvTranspose2d) and can_rewrite(child):
            setattr(module, name, SubPixelDeconvolution(child))
        else:
            subpixel_deconvolutions(child)
    return module
