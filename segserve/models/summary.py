"""Parameter accounting: one row per layer with the formula behind its count and its output shape.

Models are built on PyTorch's ``meta`` device, which has shapes but no storage, so a summary of VGG16 at
2048x1024 costs no memory and no arithmetic, and the shapes are PyTorch's own (the meta kernels are the shape
functions the real kernels use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from segserve.models.backbones import get_backbone, load_classifier
from segserve.models.convolutionalize import convolutionalize
from segserve.models.fcn import build_fcn


@dataclass(frozen=True)
class LayerRow:
    """One layer: ``formula`` spells out ``params``, e.g. ``3x3x64x128 + 128 = 73,856``."""

    name: str
    type: str
    kernel: str
    channels: str
    formula: str
    params: int
    output: str


@dataclass
class ModelSummary:
    """The rows of one model at one input size, and its total parameter count."""

    title: str
    input_size: tuple[int, int]
    rows: list[LayerRow] = field(default_factory=list)
    total: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.title,
            "input": list(self.input_size),
            "total": self.total,
            "layers": [asdict(row) for row in self.rows],
        }


def summarize(model: nn.Module, title: str, input_size: tuple[int, int]) -> ModelSummary:
    """Run ``model`` (built on the meta device) on a 1 x 3 x H x W input and record every layer it calls."""
    summary = ModelSummary(title, input_size, total=sum(p.numel() for p in model.parameters()))
    seen: set[str] = set()

    def record(name: str) -> Callable:
        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if name not in seen:  # modules called twice (ResNet's shared ReLU) get one row
                seen.add(name)
                summary.rows.append(describe(name, module, output))

        return hook

    layers = [(n, m) for n, m in model.named_modules() if n and _is_layer(m)]
    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, *input_size, device="meta"))
    except RuntimeError as error:
        raise ValueError(f"{title} cannot run at {input_size[0]}x{input_size[1]}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    for name, module in layers:  # layers the forward pass never reached still own parameters
        if name not in seen and any(True for _ in module.parameters(recurse=False)):
            summary.rows.append(describe(name, module, None))
    counted = sum(row.params for row in summary.rows)
    if counted != summary.total:
        raise AssertionError(f"{title}: rows count {counted:,} parameters but the model has {summary.total:,}")
    return summary


def _is_layer(module: nn.Module) -> bool:
    """A leaf module, or a container that owns parameters directly."""
    return not any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False))


def describe(name: str, module: nn.Module, output: torch.Tensor | None) -> LayerRow:
    """The row for one layer: its kernel, channels, the formula of its parameter count, its output shape."""
    params = sum(p.numel() for p in module.parameters(recurse=False))
    kernel, channels, terms = "", "", []
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        kh, kw = module.kernel_size
        stride = module.stride[0]
        kernel = f"{kh}x{kw}" + (f" s{stride}" if stride != 1 else "")
        channels = f"{module.in_channels}->{module.out_channels}"
        per_group = module.in_channels // module.groups
        terms = [f"{kh}x{kw}x{per_group}x{module.out_channels}"]
        if module.bias is not None:
            terms.append(str(module.out_channels))
    elif isinstance(module, nn.Linear):
        channels = f"{module.in_features}->{module.out_features}"
        terms = [f"{module.in_features}x{module.out_features}"]
        if module.bias is not None:
            terms.append(str(module.out_features))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        channels = str(module.num_features)
        terms = [f"2x{module.num_features}"] if module.affine else []
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        size = _pair(module.kernel_size)
        stride = _pair(module.stride)[0]
        kernel = f"{size[0]}x{size[1]}" + (f" s{stride}" if stride != 1 else "")
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        size = _pair(module.output_size)
        kernel = f"to {size[0]}x{size[1]}"
    else:
        terms = ["x".join(map(str, p.shape)) for p in module.parameters(recurse=False)]
    formula = f"{' + '.join(terms)} = {params:,}" if terms else "-"
    shape = "x".join(map(str, output.shape[1:])) if isinstance(output, torch.Tensor) else "-"
    return LayerRow(name, type(module).__name__, kernel, channels, formula, params, shape)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def classifier_parameters(backbone: str) -> int:
    """Parameter count of the torchvision classifier ``backbone`` (built on the meta device: instant)."""
    with torch.device("meta"):
        return sum(p.numel() for p in load_classifier(backbone).parameters())


def classifier_summaries(backbone: str, input_size: tuple[int, int]) -> tuple[ModelSummary, ModelSummary]:
    """The torchvision classifier and its convolutionalized twin, at ``input_size``."""
    get_backbone(backbone)
    with torch.device("meta"):
        classifier = load_classifier(backbone)
        twin = convolutionalize(classifier)
    return (
        summarize(classifier, f"{backbone} classifier", input_size),
        summarize(twin, f"{backbone} convolutionalized", input_size),
    )


def fcn_summary(backbone: str, variant: str, num_classes: int, input_size: tuple[int, int]) -> ModelSummary:
    """FCN-``variant`` on ``backbone`` with ``num_classes`` classes, at ``input_size``."""
    with torch.device("meta"):
        model = build_fcn(backbone, variant, num_classes).eval()
    return summarize(model, f"FCN-{model.variant} {backbone} ({num_classes} classes)", input_size)


_COLUMNS = ("name", "type", "kernel", "channels", "formula", "output")


def render(summary: ModelSummary) -> str:
    """A plain-text table of ``summary``, then its total."""
    header = ("layer", "type", "kernel", "channels", "parameters", "output")
    rows = [tuple(getattr(row, c) for c in _COLUMNS) for row in summary.rows]
    lines = [f"{summary.title} at {summary.input_size[0]}x{summary.input_size[1]}", *_table(header, rows)]
    lines.append(f"total parameters: {summary.total:,}")
    return "\n".join(lines)


def render_side_by_side(left: ModelSummary, right: ModelSummary) -> str:
    """Two summaries of same-named layers in one table (a classifier and its convolutionalized twin)."""
    left_rows = {row.name: row for row in left.rows}
    right_rows = {row.name: row for row in right.rows}
    names = list(left_rows) + [name for name in right_rows if name not in left_rows]

    def cells(row: LayerRow | None) -> tuple[str, str, str]:
        return (row.type, row.formula, row.output) if row else ("", "", "")

    rows = [(name, *cells(left_rows.get(name)), *cells(right_rows.get(name))) for name in names]
    header = ("layer", left.title, "parameters", "output", right.title, "parameters", "output")
    verdict = "equal" if left.total == right.total else "DIFFERENT"
    return "\n".join(
        [
            f"{left.title} vs {right.title} at {left.input_size[0]}x{left.input_size[1]}",
            *_table(header, rows),
            f"total parameters: {left.total:,} (classifier) vs {right.total:,} (convolutionalized): {verdict}",
        ]
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    numeric = {i for i, h in enumerate(header) if h == "parameters"}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
