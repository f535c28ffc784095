"""What a deployed model computes: uint8 RGB images in, class scores at the images' full resolution out.

Normalisation and the inference scale (the resolution factor the model was trained at) live here, inside the
module that is exported, so training, evaluation and the ONNX runtime all resize and normalise with the same
operations, and the serving side has nothing to reproduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: torchvision's ImageNet normalisation (pixel values in [0, 1]); what ImageNet-trained trunks expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scale_fraction(scale: float) -> Fraction:
    """``scale`` as a small fraction (0.5 -> 1/2), so resized sizes are integer arithmetic on symbolic shapes."""
    if not 0 < scale <= 4:
        raise ValueError(f"input scale must be in (0, 4], got {scale}")
    return Fraction(scale).limit_denominator(64)


def scaled_size(height: int, width: int, scale: Fraction) -> tuple[int, int]:
    """The size an H x W image is resized to at ``scale``: rounded down, at least 1x1."""
    return (
        torch.sym_max(1, height * scale.numerator // scale.denominator),
        torch.sym_max(1, width * scale.numerator // scale.denominator),
    )


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an N x C x H x W float tensor (half-pixel centres: at 1/2 it averages 2x2 blocks)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegmentationPipeline(nn.Module):
    """uint8 N x 3 x H x W RGB -> N x classes x H x W logits: resize by the scale, normalise, FCN, resize back."""

    def __init__(self, fcn: nn.Module, mean: Sequence[float], std: Sequence[float], input_scale: float = 1.0) -> None:
        super().__init__()
        self.fcn = fcn
        # Stored for pixel values in [0, 255], so uint8 input needs no separate /255.
        self.register_buffer("mean", torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([255.0 * s for s in std]).view(1, 3, 1, 1))
        self.scale = scale_fraction(input_scale)

    def normalise(self, images: Tensor) -> Tensor:
        """Pixel values in [0, 255] (any dtype) -> the network's normalised float input."""
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2], images.shape[-1]
        if self.scale == 1:
            return self.fcn(self.normalise(images))
        # Resize, then normalise: bilinear weights sum to one, so the order does not change the result, and the
        # per-channel arithmetic runs on the smaller image (onnxruntime's int8 NHWC graph pays ~1.6 ms per op
        # for it on a 512x512 input).
        x = resize(images.to(self.mean.dtype), scaled_size(height, width, self.scale))
        logits = self.fcn(self.normalise(x))
        return resize(logits, (height, width))


def pipeline_predictor(
    pipeline: SegmentationPipeline, device: torch.device | str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """A predictor for :func:`segserve.training.evaluate.evaluate`: N x H x W x 3 uint8 -> N x H x W labels."""

    def predict(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            return pipeline(batch).argmax(1).cpu().numpy()

    return predict
