"""The feature trunk: a torchvision classifier's feature layers, run in order, returning the FCN's taps."""

from __future__ import annotations

from torch import Tensor, nn

from segserve.models.backbones import Backbone


class Trunk(nn.Module):
    """The classifier's trunk children, registered under their torchvision names.

    Because the names are torchvision's, ``trunk.state_dict()`` keys are the classifier's own (``conv1.weight``,
    ``features.0.weight``), and a classifier state_dict loads into the trunk without renaming. The forward pass
    walks the layers in order and stops after the stride-32 tap, so no work is spent on the classifier's head.
    """

    def __init__(self, classifier: nn.Module, backbone: Backbone) -> None:
        super().__init__()
        for name in backbone.family.trunk:
            self.add_module(name, classifier.get_submodule(name))
        self.taps: tuple[str, ...] = tuple(tap.path for tap in backbone.taps)
        self.channels: tuple[int, ...] = tuple(tap.channels for tap in backbone.taps)
        self.steps: tuple[str, ...] = self._steps(backbone.family.trunk)

    def _steps(self, children: tuple[str, ...]) -> tuple[str, ...]:
        """Module paths to run in order: a child holding a tap is opened into its own children."""
        steps: list[str] = []
        for child in children:
            if any(tap.startswith(child + ".") for tap in self.taps):
                steps.extend(f"{child}.{name}" for name, _ in self.get_submodule(child).named_children())
            else:
                steps.append(child)
        return tuple(steps[: steps.index(self.taps[-1]) + 1])

    def forward(self, x: Tensor) -> list[Tensor]:
        """The stride-8, -16 and -32 feature maps of ``x``."""
        features: list[Tensor] = []
        for path in self.steps:
            x = self.get_submodule(path)(x)
            if path in self.taps:
                features.append(x)
        return features
