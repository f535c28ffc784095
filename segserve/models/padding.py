"""Bottom/right padding and cropping that stay exact under ONNX export with dynamic height and width.

All size arithmetic here works on ``x.shape`` entries, which are plain ints in eager mode and symbolic ints
under ``torch.export``; ``torch.sym_max`` instead of ``max`` and a negative ``F.pad`` for cropping keep the graph
free of shape-dependent Python branches, so one exported graph serves every input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pad_to_multiple(x: Tensor, multiple: int, extra: int = 0) -> Tensor:
    """Zero-pad ``x`` at the bottom and right to the next multiple of ``multiple``, plus ``extra`` pixels."""
    height, width = x.shape[-2], x.shape[-1]
    pad_h = (multiple - height % multiple) % multiple + extra
    pad_w = (multiple - width % multiple) % multiple + extra
    return F.pad(x, (0, pad_w, 0, pad_h))


def pad_to_min_size(x: Tensor, size: int) -> Tensor:
    """Zero-pad ``x`` at the bottom and right so both sides are at least ``size``; larger inputs pass unchanged."""
    height, width = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, torch.sym_max(0, size - width), 0, torch.sym_max(0, size - height)))


def crop(x: Tensor, height: int, width: int) -> Tensor:
    """The top-left ``height`` x ``width`` of ``x`` (no larger than it): a Slice in ONNX.

    Why not a negative :func:`fit`: OpenVINO's CPU plugin bounds a Pad's output below by its input's lower bound, so
    for an input padded to a multiple of 32 it refused every output under 32 pixels (any image whose scaled size is
    under 32); a Slice's bounds it derives correctly.
    """
    return x[..., :height, :width]


def fit(x: Tensor, height: int, width: int) -> Tensor:
    """Crop or zero-pad ``x`` at the bottom and right to exactly ``height`` x ``width``."""
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
