"""The backbone registry: every torchvision classifier segserve can convolutionalize or put under an FCN.

One table, no file per model. A :class:`Family` says how a torchvision architecture is laid out (which children
form the feature trunk, which pool and head follow); a :class:`Backbone` names one classifier of that family and
where its stride-8, -16 and -32 features come from. Tap paths are torchvision's own module names, so a tap is
found by ``classifier.get_submodule(path)`` and a state_dict of the classifier loads into the trunk unchanged.

For VGG and AlexNet the taps are the pooling layers' outputs (pool3, pool4, pool5, as in the FCN paper); for
ResNet and MobileNetV3 they are the last block of each stride stage.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

#: What ``weights`` may be: ``None``/``"none"`` (random init), ``"imagenet"`` (torchvision's DEFAULT weights,
#: downloaded or read from torch.hub's cache) or the path of a state_dict file of the torchvision classifier.
WeightsArg = str | os.PathLike[str] | None

#: Side length at which torchvision's ImageNet classifiers were trained and are evaluated.
NATIVE_INPUT = 224


@dataclass(frozen=True)
class Family:
    """How one torchvision architecture is laid out.

    ``trunk`` lists the classifier's top-level children that form the feature trunk, in execution order;
    ``pool`` and ``head`` are the children that turn the last feature map into logits. ``native_map`` is the
    side of the last feature map at :data:`NATIVE_INPUT`. ``fcn_pad`` is extra bottom/right input padding an
    FCN needs because the trunk's strides are not exact (see :mod:`segserve.models.fcn`).
    """

    name: str
    classifier_type: type[nn.Module]
    trunk: tuple[str, ...]
    pool: str
    head: str
    native_map: int
    fcn_pad: int = 0


@dataclass(frozen=True)
class Tap:
    """A feature map the FCN reads: the output of module ``path`` at ``stride``, with ``channels`` channels."""

    stride: int
    path: str
    channels: int


@dataclass(frozen=True)
class Backbone:
    """One registered classifier: its torchvision builder name, family, and stride-8/16/32 taps."""

    name: str
    family: Family
    taps: tuple[Tap, Tap, Tap]

    def tap(self, stride: int) -> Tap:
        for tap in self.taps:
            if tap.stride == stride:
                return tap
        raise KeyError(f"{self.name} has no tap at stride {stride}")

    def constructor(self) -> Callable[..., nn.Module]:
        """torchvision's builder function, e.g. ``torchvision.models.vgg16``."""
        return torchvision.models.get_model_builder(self.name)

    def imagenet_weights(self) -> torchvision.models.WeightsEnum:
        """torchvision's DEFAULT ImageNet weights enum member for this classifier."""
        return torchvision.models.get_model_weights(self.name).DEFAULT


_models = torchvision.models

VGG = Family("vgg", _models.VGG, trunk=("features",), pool="avgpool", head="classifier", native_map=7)
ALEXNET = Family(
    "alexnet",
    _models.AlexNet,
    trunk=("features",),
    pool="avgpool",
    head="classifier",
    native_map=6,
    # 11x11/4 first conv and unpadded 3x3/2 pools: each stage loses a cell, so an FCN pads one stride more.
    fcn_pad=32,
)
RESNET = Family(
    "resnet",
    _models.ResNet,
    trunk=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    pool="avgpool",
    head="fc",
    native_map=7,
)
MOBILENET_V3 = Family(
    "mobilenet_v3", _models.MobileNetV3, trunk=("features",), pool="avgpool", head="classifier", native_map=7
)
FAMILIES: tuple[Family, ...] = (VGG, ALEXNET, RESNET, MOBILENET_V3)


def _features(family: Family, name: str, s8: tuple[int, int], s16: tuple[int, int], s32: tuple[int, int]):
    """An entry whose taps are indices into ``features`` given as (index, channels)."""
    taps = tuple(
        Tap(stride, f"features.{index}", channels) for stride, (index, channels) in ((8, s8), (16, s16), (32, s32))
    )
    return Backbone(name, family, taps)  # type: ignore[arg-type]


def _resnet(name: str, expansion: int) -> Backbone:
    taps = (Tap(8, "layer2", 128 * expansion), Tap(16, "layer3", 256 * expansion), Tap(32, "layer4", 512 * expansion))
    return Backbone(name, RESNET, taps)


_ENTRIES: tuple[Backbone, ...] = (
    _features(ALEXNET, "alexnet", (2, 64), (5, 192), (12, 256)),
    # VGG taps: pool3 (256 ch), pool4 (512), pool5 (512). Indices shift with depth and with BatchNorm.
    _features(VGG, "vgg11", (10, 256), (15, 512), (20, 512)),
    _features(VGG, "vgg11_bn", (14, 256), (21, 512), (28, 512)),
    _features(VGG, "vgg13", (14, 256), (19, 512), (24, 512)),
    _features(VGG, "vgg13_bn", (20, 256), (27, 512), (34, 512)),
    _features(VGG, "vgg16", (16, 256), (23, 512), (30, 512)),
    _features(VGG, "vgg16_bn", (23, 256), (33, 512), (43, 512)),
    _features(VGG, "vgg19", (18, 256), (27, 512), (36, 512)),
    _features(VGG, "vgg19_bn", (26, 256), (39, 512), (52, 512)),
    _resnet("resnet18", 1),
    _resnet("resnet34", 1),
    _resnet("resnet50", 4),
    _resnet("resnet101", 4),
    _resnet("resnet152", 4),
    _features(MOBILENET_V3, "mobilenet_v3_small", (3, 24), (8, 48), (12, 576)),
    _features(MOBILENET_V3, "mobilenet_v3_large", (6, 40), (12, 112), (16, 960)),
)

#: Every registered backbone by name, in display order.
BACKBONES: Mapping[str, Backbone] = {entry.name: entry for entry in _ENTRIES}


class WeightsError(ValueError):
    """Weights could not be obtained or do not fit the architecture."""


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``, or a ValueError that suggests the closest names."""
    try:
        return BACKBONES[name]
    except KeyError:
        close = difflib.get_close_matches(name, BACKBONES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint} (registered: {', '.join(BACKBONES)})") from None


def family_of(model: nn.Module) -> Family:
    """The family of a torchvision classifier instance, or a TypeError naming what is supported."""
    for family in FAMILIES:
        if isinstance(model, family.classifier_type):
            return family
    supported = ", ".join(f.classifier_type.__name__ for f in FAMILIES)
    raise TypeError(
        f"cannot convolutionalize a {type(model).__name__}: supported torchvision classifiers are {supported}"
    )


def load_classifier(name: str, weights: WeightsArg = None) -> nn.Module:
    """Build torchvision's classifier ``name`` with ``weights`` (see :data:`WeightsArg`), in eval mode."""
    backbone = get_backbone(name)
    build = backbone.constructor()
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return build(weights=None).eval()
    if isinstance(weights, str) and weights.lower() == "imagenet":
        enum = backbone.imagenet_weights()
        try:
            return build(weights=enum).eval()
        except (URLError, OSError) as error:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise WeightsError(
                f"could not fetch ImageNet weights for {name} from {enum.url} ({error}); download that file where "
                f"the network allows and pass its path as weights, or place it at {cache}"
            ) from error
    model = build(weights=None)
    state = read_state_dict(weights)
    check_fits(model, state, f"{weights} is not a {name} state_dict")
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict file safely (``weights_only=True``: no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (expected 'imagenet', 'none' or a state_dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise WeightsError(f"cannot read {path} as a state_dict: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(state)


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], context: str) -> None:
    """Raise a :class:`WeightsError` starting with ``context`` unless ``state`` has exactly ``model``'s keys
    and shapes; the message names the first offending keys (torch's own message is a wall of text)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s
    ]
    problems = [
        f"{label} {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise WeightsError(f"{context}: " + "; ".join(problems))


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
