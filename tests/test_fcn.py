"""FCN-32s/16s/8s: reference parameter counts, exact output sizes, bilinear deconvolutions, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segserve.models import BACKBONES, VARIANTS, build_fcn, get_backbone
from segserve.models.upsample import SubPixelDeconvolution, bilinear_upsampler, subpixel_deconvolutions

# The reference Caffe nets (fc6 7x7, fc7 1x1, score layers with bias, bias-free deconvolutions), 21 classes.
REFERENCE_VGG16 = {"32s": 136_152_917, "16s": 134_815_994, "8s": 134_489_759}

sides = st.integers(min_value=1, max_value=700)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vgg16_matches_the_reference_parameter_counts(variant: str) -> None:
    with torch.device("meta"):
        model = build_fcn("vgg16", variant, num_classes=21)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_VGG16[variant]


@pytest.fixture(scope="module")
def small_fcns() -> dict[tuple[str, str], torch.nn.Module]:
    torch.manual_seed(0)
    return {(b, v): build_fcn(b, v, num_classes=3).eval() for b in ("resnet18", "mobilenet_v3_small") for v in VARIANTS}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=sides,
    width=sides,
    variant=st.sampled_from(VARIANTS),
    backbone=st.sampled_from(["resnet18", "mobilenet_v3_small"]),
)
def test_output_size_equals_input_size(small_fcns, height: int, width: int, variant: str, backbone: str) -> None:
    with torch.no_grad():
        logits = small_fcns[backbone, variant](torch.randn(1, 3, height, width))
    assert logits.shape == (1, 3, height, width)
    assert torch.isfinite(logits).all()


@settings(max_examples=30, deadline=None)
@given(
    height=sides,
    width=sides,
    batch=st.integers(1, 3),
    variant=st.sampled_from(VARIANTS),
    backbone=st.sampled_from(list(BACKBONES)),
)
def test_every_backbone_keeps_the_input_size(height: int, width: int, batch: int, variant: str, backbone: str) -> None:
    # The meta device computes shapes with PyTorch's own shape functions and no arithmetic: all 16 backbones
    # (VGG and AlexNet included) over hundreds of sizes in seconds.
    with torch.device("meta"):
        model = build_fcn(backbone, variant, num_classes=5).eval()
        assert model(torch.empty(batch, 3, height, width)).shape == (batch, 5, height, width)


@pytest.mark.parametrize("backbone", ["vgg11", "resnet34", "mobilenet_v3_large"])
def test_skip_grids_align_exactly(backbone: str) -> None:
    """Padding to a multiple of 32 makes every x2 deconvolution land exactly on its skip's grid."""
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        model = build_fcn(backbone, "8s", num_classes=4)
        for name in ("upscore2", "score_pool4", "upscore_pool4", "score_pool3"):
            model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
            )
        model(torch.empty(1, 3, 97, 131))
    assert shapes["upscore2"] == shapes["score_pool4"] == (1, 4, 8, 10)  # ceil(97/32)=4 -> 8, ceil(131/32)=5 -> 10
    assert shapes["upscore_pool4"] == shapes["score_pool3"] == (1, 4, 16, 20)


@pytest.mark.parametrize("variant", VARIANTS)
def test_alexnet_runs_at_tiny_and_odd_sizes(variant: str) -> None:
    torch.manual_seed(0)
    model = build_fcn("alexnet", variant, num_classes=2).eval()
    for size in [(1, 1), (31, 33), (64, 64), (95, 161)]:
        with torch.no_grad():
            assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_bilinear_deconvolution_matches_interpolate_in_the_interior(factor: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    layer = bilinear_upsampler(3, factor).double()
    with torch.no_grad():
        ours = layer(x)
    reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (2, 3, 9 * factor, 11 * factor)
    border = factor  # the deconvolution fades to zero within one input cell of the edge; interpolate clamps
    interior = (..., slice(border, -border), slice(border, -border))
    assert (ours[interior] - reference[interior]).abs().max().item() <= 1e-5
    float32 = bilinear_upsampler(3, factor)(x.float()).detach()
    assert (float32[interior] - reference[interior].float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("stride", "kernel", "padding"), [(2, 4, 1), (8, 16, 4), (16, 32, 8), (32, 64, 16),
                                                        (1, 3, 1), (3, 5, 1), (4, 4, 0), (3, 7, 2)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_subpixel_form_equals_the_transposed_convolution(stride: int, kernel: int, padding: int, bias: bool) -> None:
    torch.manual_seed(stride + kernel)
    layer = torch.nn.ConvTranspose2d(5, 3, kernel, stride=stride, padding=padding, bias=bias).double()
    rewritten = SubPixelDeconvolution(layer)
    for height, width in ((1, 1), (2, 7), (9, 4), (13, 17)):
        x = torch.randn(2, 5, height, width, dtype=torch.float64)
        with torch.no_grad():
            expected, ours = layer(x), rewritten(x)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() <= 1e-12


def test_fcn_in_subpixel_form_computes_the_same_scores() -> None:
    torch.manual_seed(0)
    fcn = build_fcn("resnet18", "8s", num_classes=4).eval()
    with torch.no_grad():
        for layer in (fcn.upscore2, fcn.upscore_pool4, fcn.upscore8):  # trained deconvolutions mix classes
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        x = torch.randn(1, 3, 77, 131)
        expected = fcn(x)
        twin = subpixel_deconvolutions(fcn)
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in twin.modules())
        assert (twin(x) - expected).abs().max().item() <= 1e-4


def test_unusual_transposed_convolutions_are_left_alone() -> None:
    grouped = torch.nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=2)
    padded_out = torch.nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
    holder = torch.nn.Sequential(grouped, padded_out)
    assert list(subpixel_deconvolutions(holder)) == [grouped, padded_out]
    with pytest.raises(ValueError, match="kernel = stride"):
        SubPixelDeconvolution(padded_out)


def test_upsampling_is_learnable_by_default_and_freezable() -> None:
    learnable = build_fcn("resnet18", "8s", num_classes=3)
    frozen = build_fcn("resnet18", "8s", num_classes=3, freeze_upsampling=True)
    names = ("upscore2", "upscore_pool4", "upscore8")
    assert all(learnable.get_submodule(n).weight.requires_grad for n in names)
    assert not any(frozen.get_submodule(n).weight.requires_grad for n in names)
    assert frozen.score_fr.weight.requires_grad


def test_training_steps_reduce_the_loss_and_respect_the_freeze() -> None:
    torch.manual_seed(0)
    model = build_fcn("resnet18", "8s", num_classes=2, freeze_upsampling=True).train()
    upscore8 = model.upscore8.weight.detach().clone()
    images = torch.randn(2, 3, 64, 80)
    target = torch.zeros(2, 64, 80, dtype=torch.long)
    target[:, 16:48, 24:56] = 1  # a square the net can fit
    images[:, :, 16:48, 24:56] += 1.0
    target[:, :4] = 255  # ignored pixels
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(images), target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.upscore8.weight, upscore8)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown FCN variant '4s'"):
        build_fcn("resnet18", "4s")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_fcn("resnet18", "8s", num_classes=0)
    with pytest.raises(ValueError, match="did you mean resnet18"):
        build_fcn("resnet81")


def test_variant_spellings() -> None:
    with torch.device("meta"):
        assert build_fcn("resnet18", "FCN-16s").variant == "16s"
        assert build_fcn("resnet18", "fcn8s").variant == "8s"


def test_vgg_head_is_the_classifiers_fc6_fc7() -> None:
    with torch.device("meta"):
        model = build_fcn("vgg16", "8s", num_classes=21)
    fc6, fc7 = model.head[0], model.head[3]
    assert (fc6.kernel_size, fc6.padding, fc6.out_channels) == ((7, 7), (3, 3), 4096)
    assert (fc7.kernel_size, fc7.in_channels, fc7.out_channels) == ((1, 1), 4096, 4096)
    assert get_backbone("vgg16").tap(8).channels == model.score_pool3.in_channels == 256
