"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell 2015) on any registered backbone.

Layer names follow the paper's reference nets: ``score_fr`` scores the stride-32 features, ``score_pool4``
and ``score_pool3`` the stride-16 and stride-8 taps; ``upscore2`` and ``upscore_pool4`` upsample x2 before each
fusion and ``upscore`` (x32), ``upscore16`` or ``upscore8`` brings the scores to input resolution. For VGG
and AlexNet the convolutionalized fc6/fc7 sit in ``head`` between the trunk and ``score_fr``; for ResNet the
head is empty, and for MobileNetV3 it is the classifier's first 1x1 layer and its Hardswish.

**Alignment.** Instead of the paper's 100-pixel input padding and per-layer crop offsets, the input is
zero-padded at the bottom and right to a multiple of 32. For VGG, ResNet and MobileNetV3 every stride-s cell
then covers input pixels ``[s*i, s*i + s)`` exactly, fc6 is padded to keep its size, and each x2 deconvolution
(kernel 4, stride 2, padding 1) lands exactly on the next tap's grid; the result is cropped back to H x W.
One exported graph thus fits every input size from 1x1 up with no shape-dependent branches. AlexNet's
11x11/4 conv and unpadded pools lose a cell per stage, so its input gets 32 more pixels and each upsampled
map is cropped or zero-padded at the bottom/right to its skip's size; its cell centres sit up to half a
cell below-right of the exact grid, an offset the score layers learn around.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor, nn

from segserve.models.backbones import WeightsArg, get_backbone, load_classifier
from segserve.models.convolutionalize import convolutionalize_head, pooled_size
from segserve.models.padding import crop, fit, pad_to_multiple
from segserve.models.trunk import Trunk
from segserve.models.upsample import bilinear_upsampler

Variant = Literal["32s", "16s", "8s"]
VARIANTS: tuple[str, ...] = get_args(Variant)

#: Output stride of every registered trunk, and the multiple FCN inputs are padded to.
OUTPUT_STRIDE = 32


class FCN(nn.Module):
    """A fully convolutional network: N x 3 x H x W images in, N x classes x H x W logits out, for any H, W."""

    def __init__(
        self,
        backbone: Trunk,
        head: nn.Module,
        head_channels: int,
        num_classes: int,
        variant: Variant,
        *,
        extra_pad: int = 0,
        freeze_upsampling: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.num_classes = num_classes
        self.extra_pad = extra_pad
        channels8, channels16, _ = backbone.channels
        trainable = not freeze_upsampling

        self.backbone = backbone
        self.head = head
        self.score_fr = _score(head_channels, num_classes)
        if variant == "32s":
            self.upscore = bilinear_upsampler(num_classes, 32, trainable=trainable)
        else:
            self.score_pool4 = _score(channels16, num_classes)
            self.upscore2 = bilinear_upsampler(num_classes, 2, trainable=trainable)
        if variant == "16s":
            self.upscore16 = bilinear_upsampler(num_classes, 16, trainable=trainable)
        if variant == "8s":
            self.score_pool3 = _score(channels8, num_classes)
            self.upscore_pool4 = bilinear_upsampler(num_classes, 2, trainable=trainable)
            self.upscore8 = bilinear_upsampler(num_classes, 8, trainable=trainable)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        features8, features16, features32 = self.backbone(pad_to_multiple(x, OUTPUT_STRIDE, self.extra_pad))
        score = self.score_fr(self.head(features32))
        if self.variant == "32s":
            return crop(self.upscore(score), height, width)
        score = _fuse(self.upscore2(score), self.score_pool4(features16))
        if self.variant == "16s":
            return crop(self.upscore16(score), height, width)
        score = _fuse(self.upscore_pool4(score), self.score_pool3(features8))
        return crop(self.upscore8(score), height, width)


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 class-score layer, zero-initialised as in the paper (the first step learns from the features)."""
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _fuse(upsampled: Tensor, skip: Tensor) -> Tensor:
    """Sum of upsampled coarse scores and skip scores (sizes equal except on AlexNet, see module docs)."""
    return fit(upsampled, skip.shape[-2], skip.shape[-1]) + skip


def build_fcn(
    backbone: str,
    variant: Variant | str = "8s",
    num_classes: int = 21,
    weights: WeightsArg = None,
    *,
    freeze_upsampling: bool = False,
) -> FCN:
    """FCN-``variant`` on the registered ``backbone`` with ``num_classes`` outputs.

    ``weights`` initialises the trunk (and fc6/fc7 where the classifier has them) from the torchvision
    classifier: ``None``, ``"imagenet"`` or a state_dict path (see :func:`load_classifier`). The score layers
    start at zero and the deconvolutions as bilinear interpolation, learnable unless ``freeze_upsampling``.
    """
    spec = get_backbone(backbone)
    variant = variant.lower().removeprefix("fcn").lstrip("-_")
    if variant not in VARIANTS:
        raise ValueError(f"unknown FCN variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    classifier = load_classifier(backbone, weights).train()
    family = spec.family
    window = pooled_size(classifier.get_submodule(family.pool))
    head, head_channels = _fcn_head(classifier.get_submodule(family.head), window)
    if head_channels is None:
        head_channels = spec.tap(32).channels
    return FCN(
        Trunk(classifier, spec),
        head,
        head_channels,
        num_classes,
        variant,  # type: ignore[arg-type]
        extra_pad=family.fcn_pad,
        freeze_upsampling=freeze_upsampling,
    )


def _fcn_head(classifier_head: nn.Module, window: int) -> tuple[nn.Module, int | None]:
    """The classifier's head minus its last Linear, convolutionalized with ``window // 2`` padding (centred
    for VGG's 7x7; one cell larger for AlexNet's 6x6, cropped on fusion), and the head's output width.

    VGG keeps fc6 (7x7) and fc7, AlexNet fc6 (6x6) and fc7, MobileNetV3 its 1x1 960->1280 layer; a single
    Linear (ResNet) leaves nothing, and the score layer reads the trunk directly (width ``None``).
    """
    if isinstance(classifier_head, nn.Linear):
        return nn.Identity(), None
    layers = list(classifier_head)
    last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
    kept = nn.Sequential(*layers[:last])
    if not any(isinstance(layer, nn.Linear) for layer in kept):
        return nn.Identity(), None
    head = convolutionalize_head(kept, window, padding=window // 2)
    return head, layers[last].in_features
