"""The registry's taps are where it says, and every way of passing weights loads exactly what was saved."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision

from segserve.models import BACKBONES, WeightsError, build_fcn, get_backbone, load_classifier
from segserve.models.trunk import Trunk


@pytest.mark.parametrize("name", list(BACKBONES))
def test_taps_have_the_registered_strides_and_channels(name: str) -> None:
    backbone = BACKBONES[name]
    with torch.device("meta"):
        trunk = Trunk(load_classifier(name), backbone)
        features = trunk(torch.empty(1, 3, 256, 320))
    assert [f.shape[1] for f in features] == [tap.channels for tap in backbone.taps]
    for tap, feature in zip(backbone.taps, features, strict=True):
        expected = (256 // tap.stride, 320 // tap.stride)
        if backbone.family.name == "alexnet":  # unpadded 3x3/2 pools: within a cell or two of the stride grid
            assert all(abs(a - b) <= 2 for a, b in zip(feature.shape[2:], expected, strict=True)), tap
        else:
            assert tuple(feature.shape[2:]) == expected, tap
    assert trunk.steps[-1] == backbone.tap(32).path  # nothing after the last tap runs


def test_registry_covers_what_the_product_promises() -> None:
    promised = {"alexnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    promised |= {"mobilenet_v3_small", "mobilenet_v3_large"}
    promised |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    assert promised <= set(BACKBONES)
    for backbone in BACKBONES.values():
        assert isinstance(backbone.imagenet_weights(), torchvision.models.WeightsEnum)
        assert backbone.constructor() is torchvision.models.get_model_builder(backbone.name)


def _saved_classifier(name: str, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    classifier = torchvision.models.get_model_builder(name)(weights=None)
    with torch.no_grad():  # make every tensor distinctive, buffers included
        for value in classifier.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value))
    state = classifier.state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["resnet18", "alexnet", "mobilenet_v3_small"])
def test_weights_path_loads_bitwise_into_the_fcn_trunk(tmp_path: Path, name: str) -> None:
    saved = _saved_classifier(name, tmp_path / "weights.pt")
    model = build_fcn(name, "8s", num_classes=4, weights=tmp_path / "weights.pt")
    trunk = model.backbone.state_dict()
    assert trunk, "empty trunk"
    for key, value in trunk.items():
        assert torch.equal(value, saved[key]), key
    family = get_backbone(name).family
    head = model.head.state_dict()
    for key, value in head.items():  # fc6/fc7 are transplanted, reshaped to convolutions
        assert torch.equal(value.flatten(), saved[f"{family.head}.{key}"].flatten()), key
    if name == "alexnet":
        assert set(head) == {"1.weight", "1.bias", "4.weight", "4.bias"}


def test_imagenet_weights_take_torchvisions_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'imagenet' resolves torchvision's DEFAULT enum and reads torch.hub's cache (filled here by the test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = get_backbone("mobilenet_v3_small").imagenet_weights()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    saved = _saved_classifier("mobilenet_v3_small", cache / Path(enum.url).name)
    loaded = load_classifier("mobilenet_v3_small", "imagenet").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_imagenet_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_args, **_kwargs):  # stands in for the network, which tests must never use
        raise URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"could not fetch ImageNet weights for resnet18 from https://.*resnet18"):
        load_classifier("resnet18", "imagenet")


def test_weights_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_classifier("resnet18", tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read .*garbage\.pt as a state_dict"):
        load_classifier("resnet18", tmp_path / "garbage.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        load_classifier("resnet18", tmp_path / "list.pt")
    _saved_classifier("resnet34", tmp_path / "resnet34.pt")
    with pytest.raises(WeightsError, match=r"not a resnet18 state_dict: unexpected layer1\.2\."):
        load_classifier("resnet18", tmp_path / "resnet34.pt")
    state = _saved_classifier("resnet18", tmp_path / "ok.pt")
    state["fc.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "head10.pt")
    with pytest.raises(WeightsError, match=r"wrong shape fc\.weight \(10, 512\) != \(1000, 512\)"):
        load_classifier("resnet18", tmp_path / "head10.pt")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a file that would run code on load is rejected, not executed."""
    torch.save({"fc.weight": torch.zeros(1), "payload": Path("/")}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="cannot read"):
        load_classifier("resnet18", tmp_path / "evil.pt")


def test_none_means_random_init() -> None:
    torch.manual_seed(0)
    a = load_classifier("resnet18", "none").state_dict()
    torch.manual_seed(0)
    b = load_classifier("resnet18", None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not load_classifier("resnet18").training
