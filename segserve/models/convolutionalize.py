"""Convolutionalization: a torchvision classifier rewritten as a fully convolutional network.

Every ``Linear`` of the head becomes a ``Conv2d`` holding the same numbers. The first one sees the pooled
feature map, so it becomes a convolution whose kernel is that map (VGG16 fc6: 7x7, 512 -> 4096; AlexNet fc6:
6x6, 256 -> 4096); the ones after it see a 1x1 map, so they become 1x1 convolutions (fc7, fc8). Heads that
follow a global average pool take one of two forms:

* a linear head (ResNet's single ``fc``) commutes with the pooling, so the pool is dropped and ``fc`` is
  applied at every position: the heatmap's spatial mean is exactly the classifier's logits at any input size;
* a head with a nonlinearity after its first ``Linear`` (MobileNetV3's Hardswish) does not, so the pool is
  kept as a sliding window of the native feature-map size (7x7, stride 1): at 224x224 it covers the whole map
  and the heatmap is the classifier's logits at its single position.

Parameter names and counts are the classifier's own; only the Linear weights change shape.

**Inputs smaller than the native 224x224.** A windowed head (VGG, AlexNet, MobileNetV3) needs a feature map
at least as large as its window, which the trunk yields only from a native-size input. Such inputs are
zero-padded at the bottom and right to 224 along each short side (zero is the mean colour once normalised,
so the image sits in the top-left corner of a mean-grey canvas), and the heatmap has one position along that
side. Any H, W >= 1 works; a 224x224 input is untouched. Per-location heads (ResNet) need no padding: the
heatmap has ``ceil(H / 32)`` x ``ceil(W / 32)`` positions, down to 1x1 for a 1x1 image.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from segserve.models.backbones import NATIVE_INPUT, family_of
from segserve.models.padding import pad_to_min_size


class ConvolutionalizedClassifier(nn.Module):
    """A classifier whose head is convolutional: N x 3 x H x W in, an N x classes x h x w heatmap out.

    It holds the classifier's own children under their own names, so its state_dict keys (and parameter
    count) are the classifier's. ``min_size`` is the side below which inputs are padded (see module docs).
    """

    def __init__(self, layers: dict[str, nn.Module], min_size: int) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        if self.min_size > 1:
            x = pad_to_min_size(x, self.min_size)
        for layer in self.children():
            x = layer(x)
        return x


def linear_to_conv(linear: nn.Linear, kernel: int, padding: int = 0) -> nn.Conv2d:
    """A ``Conv2d`` computing ``linear`` on every ``kernel`` x ``kernel`` window of its input.

    ``Linear`` sees its input flattened channel-major (C, H, W), which is exactly the layout of a convolution
    weight ``(out, C, kH, kW)``, so the weight is a reshape, not a permutation.
    """
    in_channels, remainder = divmod(linear.in_features, kernel * kernel)
    if remainder:
        raise ValueError(f"a Linear with {linear.in_features} inputs is not a {kernel}x{kernel} window of channels")
    weight = linear.weight
    conv = nn.Conv2d(
        in_channels,
        linear.out_features,
        kernel,
        padding=padding,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(linear.out_features, in_channels, kernel, kernel))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    conv.weight.requires_grad_(weight.requires_grad)
    return conv


def convolutionalize_head(head: nn.Module, kernel: int, padding: int = 0) -> nn.Module:
    """``head`` (a Linear or a Sequential) with its first Linear as a ``kernel`` conv and later ones as 1x1.

    Non-Linear layers (ReLU, Dropout, Hardswish) are reused as they are; Sequential indices are preserved.
    """
    if isinstance(head, nn.Linear):
        return linear_to_conv(head, kernel, padding)
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"cannot convolutionalize a head of type {type(head).__name__}")
    layers: list[nn.Module] = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            first = not any(isinstance(done, nn.Conv2d) for done in layers)
            layers.append(linear_to_conv(layer, kernel if first else 1, padding if first else 0))
        else:
            layers.append(layer)
    return nn.Sequential(*layers)


def is_linear(head: nn.Module) -> bool:
    """Whether ``head`` is affine (only Linear, Dropout, Identity), so it commutes with average pooling."""
    return all(isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Sequential)) for m in head.modules())


def pooled_size(pool: nn.Module) -> int:
    """The square output side of the classifier's adaptive average pool (7 for VGG, 6 AlexNet, 1 ResNet)."""
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        raise TypeError(f"expected an AdaptiveAvgPool2d before the head, found {type(pool).__name__}")
    size = pool.output_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width or height is None:
        raise ValueError(f"expected a square adaptive pool, found output size {size}")
    return int(height)


def convolutionalize(model: nn.Module, *, copy_weights: bool = True) -> ConvolutionalizedClassifier:
    """Turn a torchvision classifier into a fully convolutional net with the same weights.

    At 224x224 the result's output, averaged over its positions, equals ``model``'s logits (VGG, AlexNet and
    MobileNetV3 give a 1x1 map there); larger inputs give a class heatmap, smaller ones are handled as the
    module docs describe. ``model`` is left untouched unless ``copy_weights=False``, in which case the result
    shares the trunk's modules with it (cheaper, for callers that discard ``model``).
    """
    family = family_of(model)
    source = copy.deepcopy(model) if copy_weights else model
    layers = {name: source.get_submodule(name) for name in family.trunk}
    window = pooled_size(source.get_submodule(family.pool))
    head = source.get_submodule(family.head)
    if window > 1:  # the pooled map is the first Linear's window: VGG, AlexNet
        layers[family.head] = convolutionalize_head(head, window)
        min_size = NATIVE_INPUT
    elif is_linear(head):  # global pool + affine head: apply per location (ResNet)
        layers[family.head] = convolutionalize_head(head, 1)
        min_size = 1
    else:  # global pool + nonlinear head: keep the pool as a native-size window (MobileNetV3)
        layers[family.pool] = nn.AvgPool2d(family.native_map, stride=1)
        layers[family.head] = convolutionalize_head(head, 1)
        min_size = NATIVE_INPUT
    return ConvolutionalizedClassifier(layers, min_size)
