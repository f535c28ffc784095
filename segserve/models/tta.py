"""Test-time augmentation inside the graph: the scores of an image and of its mirror image, averaged.

Road scenes are left-right symmetric in distribution (cars park on both sides, the camera looks ahead), so the
mirrored view is a second, slightly different opinion of the same scene; averaging the two score maps removes
some of the network's position-dependent noise. It costs a second network pass (two calls rather than one batch
of twice the size: concatenating along the batch made torch.export fix the batch size). ``segserve export --tta
flip`` builds it into the file, so every runtime gets it unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

TTA_MODES = ("flip",)


class FlipAveraged(nn.Module):
    """``(net(x) + mirror(net(mirror(x)))) / 2`` for N x C x H x W inputs, mirrored along the width."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return (self.network(x) + self.network(x.flip(-1)).flip(-1)) * 0.5
