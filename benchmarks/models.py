"""Random-weight models for the speed questions, exported once per run into a scratch folder (torch side)."""

from __future__ import annotations

from pathlib import Path

import torch


def fcn_pipeline(backbone: str, variant: str = "8s", classes: int = 21):
    """An FCN with ImageNet normalisation at input scale 1 (the paper's setting), eval mode."""
    from segserve.models.fcn import build_fcn
    from segserve.models.pipeline import IMAGENET_MEAN, IMAGENET_STD, SegmentationPipeline

    torch.manual_seed(0)
    fcn = build_fcn(backbone, variant, classes, None)
    with torch.no_grad():  # zero-initialised score layers would make every logit equal
        for name, parameter in fcn.named_parameters():
            if "score" in name:
                parameter.normal_(0, 0.01)
    return SegmentationPipeline(fcn, IMAGENET_MEAN, IMAGENET_STD, 1.0).eval()


def export_pipeline(pipeline, path: Path, backbone: str, variant: str, fp16: bool = False) -> Path:
    from segserve.export import ExportGraph, export_onnx, half_precision
    from segserve.modelcard import ModelMetadata

    classes = pipeline.fcn.num_classes
    metadata = ModelMetadata(
        kind="segmentation", classes=tuple(f"c{i}" for i in range(classes)), palette=((0, 0, 0),) * classes,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_scale=1.0, backbone=backbone,
        variant=variant, output_stride=8, label_dtype="uint8", segserve_version="bench",
    )  # fmt: skip
    graph = ExportGraph(pipeline, classes)
    if fp16:  # the network in float16 between float32 input handling and outputs, as `export --fp16` writes it
        graph, metadata = half_precision(graph, metadata)
    return export_onnx(graph, path, metadata)


def torchvision_fcn_resnet50(path: Path, size: int) -> tuple[torch.nn.Module, Path]:
    """torchvision's dilated FCN-ResNet50 (output stride 8), random weights, exported at size x size."""
    import warnings

    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False, num_classes=21).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)["out"]

    wrapper = Logits().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), None, input_names=["x"],
                                    output_names=["logits"], dynamo=True, opset_version=18, verbose=False)  # fmt: skip
    program.model_proto.ir_version = 10
    import onnx

    onnx.save_model(program.model_proto, str(path))
    return wrapper, path
