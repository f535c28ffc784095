"""Convolutionalization keeps weights, parameter counts and outputs, and accepts any input size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate
from torch import nn

from segserve.models import BACKBONES, convolutionalize, load_classifier
from segserve.models.convolutionalize import linear_to_conv


@pytest.mark.parametrize("name", list(BACKBONES))
def test_twin_matches_classifier_at_native_size(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    classifier = calibrate(load_classifier(name), x)
    twin = convolutionalize(classifier).eval()
    with torch.no_grad():
        logits = classifier(x)
        heatmap = twin(x)
    assert heatmap.shape[:2] == (2, 1000)
    if BACKBONES[name].family.name != "resnet":  # windowed heads: one position at the native size
        assert heatmap.shape[2:] == (1, 1)
    assert logits.abs().max() > 1.0  # calibrated: the tolerance below is relative to O(1) logits
    assert (heatmap.mean(dim=(2, 3)) - logits).abs().max().item() <= 1e-4
    count = sum(p.numel() for p in classifier.parameters())
    assert sum(p.numel() for p in twin.parameters()) == count
    assert set(twin.state_dict()) <= set(classifier.state_dict())


def test_vgg16_layers_are_the_papers() -> None:
    twin = convolutionalize(load_classifier("vgg16"))
    fc6, fc7, fc8 = (twin.get_submodule(f"classifier.{i}") for i in (0, 3, 6))
    assert (fc6.in_channels, fc6.out_channels, fc6.kernel_size) == (512, 4096, (7, 7))
    assert (fc7.in_channels, fc7.out_channels, fc7.kernel_size) == (4096, 4096, (1, 1))
    assert (fc8.in_channels, fc8.out_channels, fc8.kernel_size) == (4096, 1000, (1, 1))
    assert sum(p.numel() for p in twin.parameters()) == 138_357_544
    assert not any(isinstance(m, nn.Linear) for m in twin.modules())


def test_alexnet_fc6_is_a_6x6_conv() -> None:
    fc6 = convolutionalize(load_classifier("alexnet")).get_submodule("classifier.1")
    assert (fc6.in_channels, fc6.out_channels, fc6.kernel_size) == (256, 4096, (6, 6))


def test_linear_to_conv_is_the_same_function() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(8 * 3 * 3, 5)
    x = torch.randn(4, 8, 3, 3)
    conv = linear_to_conv(linear, 3)
    assert torch.allclose(conv(x).flatten(1), linear(x.flatten(1)), atol=1e-6)


def test_source_model_is_left_untouched() -> None:
    classifier = load_classifier("resnet18")
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    twin = convolutionalize(classifier)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert isinstance(classifier.fc, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())


def test_rejects_unsupported_models() -> None:
    with pytest.raises(TypeError, match="supported torchvision classifiers are VGG, AlexNet, ResNet, MobileNetV3"):
        convolutionalize(nn.Sequential(nn.Linear(3, 3)))


def _expected_side(family: str, side: int) -> int:
    """Heatmap positions along one side, from the module docs' rules."""
    if family == "resnet":
        return -(-side // 32)
    side = max(side, 224)  # windowed heads: padded up to the native size
    if family == "vgg":
        return side // 32 - 6
    if family == "mobilenet_v3":
        return -(-side // 32) - 6
    conv1 = (side - 7) // 4 + 1  # alexnet: 11x11/4 pad 2, then three unpadded 3x3/2 pools, then the 6x6 fc6
    pool5 = (((conv1 - 3) // 2 + 1 - 3) // 2 + 1 - 3) // 2 + 1
    return pool5 - 5


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18", "mobilenet_v3_small"])
def test_any_input_size_gives_a_heatmap(name: str) -> None:
    torch.manual_seed(0)
    twin = convolutionalize(load_classifier(name)).eval()
    family = BACKBONES[name].family.name
    for size in [(1, 1), (7, 13), (31, 300), (224, 224), (250, 417)]:
        with torch.no_grad():
            heatmap = twin(torch.randn(1, 3, *size))
        assert heatmap.shape == (1, 1000, _expected_side(family, size[0]), _expected_side(family, size[1])), size
        assert torch.isfinite(heatmap).all()


def test_small_input_is_the_classifier_on_a_mean_grey_canvas() -> None:
    torch.manual_seed(0)
    classifier = load_classifier("vgg11")
    twin = convolutionalize(classifier).eval()
    x = torch.randn(1, 3, 100, 150)
    with torch.no_grad():
        canvas = F.pad(x, (0, 224 - 150, 0, 224 - 100))
        assert torch.allclose(twin(x).flatten(1), classifier(canvas), atol=1e-5)


def test_per_location_head_is_exact_at_any_size() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 320, 448)
    classifier = calibrate(load_classifier("resnet18"), x)
    twin = convolutionalize(classifier).eval()
    with torch.no_grad():
        heatmap = twin(x)
        assert heatmap.shape[2:] == (10, 14)
        assert (heatmap.mean(dim=(2, 3)) - classifier(x)).abs().max().item() <= 1e-4
