"""ONNX export: dynamic sizes, parity with PyTorch in onnxruntime, metadata round trip, clear refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segserve.export import (
    IR_VERSION,
    check_export,
    checkpoint_graph,
    classifier_graph,
    export_onnx,
    graph_stats,
    half_precision,
)
from segserve.modelcard import METADATA_KEY, ModelFileError
from segserve.runtime import load_model
from segserve.training.checkpoint import Checkpoint, ModelConfig

SIZES = ((1, 1), (7, 13), (224, 224), (333, 517), (768, 1024))
CLASSES = ["sky", "road", "car", "tree", "person"]


def fake_checkpoint(variant: str, input_scale: float = 1.0, backbone: str = "resnet18") -> Checkpoint:
    """A checkpoint payload whose FCN gives varied, well-scaled logits (trained nets do; zero-init ones don't)."""
    config = {
        "backbone": backbone, "variant": variant, "classes": CLASSES,
        "palette": [[70, 130, 180], [128, 64, 128], [0, 0, 142], [107, 142, 35], [220, 20, 60]],
        "mean": [0.4, 0.42, 0.41], "std": [0.28, 0.27, 0.29], "input_scale": input_scale,
        "training_data": "synthetic", "validation": {"mean_iou": 0.5},
    }  # fmt: skip
    torch.manual_seed(0)
    config = ModelConfig(**config)
    pipeline = config.pipeline().eval()
    with torch.no_grad():
        for name, parameter in pipeline.named_parameters():
            if "score" in name:
                parameter.normal_(0, 0.05)
    return Checkpoint(config, pipeline.state_dict())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple]:
    folder = tmp_path_factory.mktemp("onnx")
    made = {}
    for variant in ("32s", "16s", "8s"):
        graph, metadata = checkpoint_graph(fake_checkpoint(variant))
        made[variant] = (graph, metadata, export_onnx(graph, folder / f"fcn{variant}.onnx", metadata))
    graph, metadata = classifier_graph("resnet18")
    made["classifier"] = (graph, metadata, export_onnx(graph, folder / "classifier.onnx", metadata))
    return made


@pytest.mark.parametrize("name", ["32s", "16s", "8s", "classifier"])
def test_onnxruntime_matches_pytorch_at_every_size(exports, name: str) -> None:
    graph, _, path = exports[name]
    model = onnx.load(str(path))
    assert model.ir_version == IR_VERSION
    rows = check_export(graph, path, sizes=SIZES, batches=(1, 3))  # includes onnx.checker full_check
    assert len(rows) == 2 * len(SIZES)
    for row in rows:
        assert row.max_abs_diff <= 1e-3, row
        assert row.argmax_agreement >= 0.999, row


@pytest.mark.parametrize("name", ["32s", "16s", "8s"])
def test_deconvolutions_are_exported_as_subpixel_convolutions(exports, name: str) -> None:
    graph, _, path = exports[name]
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == {"32s": 1, "16s": 2, "8s": 3}[name]
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in graph.modules())  # the caller's graph is untouched


@pytest.mark.parametrize("name", ["8s", "classifier"])
def test_output_sizes(exports, name: str) -> None:
    _, metadata, path = exports[name]
    session = load_model(path).session
    for height, width in ((1, 1), (7, 13), (333, 517)):
        logits, labels = session.run(None, {"images": np.zeros((2, height, width, 3), np.uint8)})
        if metadata.outputs_at_input_size:
            assert logits.shape == (2, 5, height, width) and labels.shape == (2, height, width)
            assert labels.dtype == np.uint8
        else:  # ResNet's coarse heatmap: one position per 32 pixels (rounded up)
            assert logits.shape == (2, 1000, -(-height // 32), -(-width // 32))
            assert labels.dtype == np.uint16 and labels.shape == (2, *logits.shape[2:])


@pytest.mark.parametrize("name", ["8s", "classifier"])
def test_fp16_export_keeps_the_labels(exports, tmp_path: Path, name: str) -> None:
    graph, metadata, path32 = exports[name]
    half, half_metadata = half_precision(graph, metadata)
    path = export_onnx(half, tmp_path / "half.onnx", half_metadata)
    assert load_model(path).metadata.precision == "float16"
    assert path.stat().st_size < 0.6 * path32.stat().st_size  # float16 weights
    sizes = SIZES if name == "8s" else SIZES[:-1]  # 1000 classes at 768x1024 x 3 cost more than they tell
    rows = check_export(graph, path, sizes=sizes, batches=(1, 3))  # against the float32 PyTorch model
    agreement, worst = min(r.argmax_agreement for r in rows), max(r.max_abs_diff for r in rows)
    print(f"fp16 {name}: argmax agreement {100 * agreement:.3f}%, max |logit diff| {worst:.2e}")
    assert agreement >= 0.99
    assert next(graph.parameters()).dtype == torch.float32  # the reference stayed float32


def test_simplified_export_is_equivalent(exports, tmp_path: Path) -> None:
    graph, metadata, path = exports["16s"]
    slim = export_onnx(graph, tmp_path / "slim.onnx", metadata, slim=True)
    assert graph_stats(slim)[0] <= graph_stats(path)[0]
    assert load_model(slim).metadata == metadata and onnx.load(str(slim)).ir_version == IR_VERSION
    for row in check_export(graph, slim, sizes=((7, 13), (333, 517)), batches=(2,)):
        assert row.max_abs_diff <= 1e-3 and row.argmax_agreement >= 0.999, row


def test_inference_scale_runs_inside_the_graph(tmp_path: Path) -> None:
    graph, metadata = checkpoint_graph(fake_checkpoint("8s", input_scale=0.5, backbone="mobilenet_v3_small"))
    path = export_onnx(graph, tmp_path / "half.onnx", metadata)
    for row in check_export(graph, path, sizes=((1, 1), (3, 5), (361, 479)), batches=(2,)):
        assert row.max_abs_diff <= 1e-3 and row.argmax_agreement >= 0.999, row
    assert load_model(path).metadata.input_scale == 0.5


def test_metadata_round_trips_into_the_runtime(exports) -> None:
    _, metadata, path = exports["8s"]
    loaded = load_model(path)
    assert loaded.metadata == metadata
    assert loaded.metadata.classes == tuple(CLASSES)
    assert loaded.metadata.palette[2] == (0, 0, 142)
    assert (loaded.metadata.mean, loaded.metadata.std) == ((0.4, 0.42, 0.41), (0.28, 0.27, 0.29))
    assert loaded.metadata.backbone == "resnet18" and loaded.metadata.variant == "8s"
    assert loaded.metadata.validation == {"mean_iou": 0.5}
    assert loaded.providers == ["CPUExecutionProvider"]
    classifier = load_model(exports["classifier"][2]).metadata
    assert (
        classifier.kind == "classifier-heatmap" and classifier.classes[0] == "tench" and len(classifier.classes) == 1000
    )


def _broken_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    plain = onnx.load(str(good))
    del plain.metadata_props[:]
    onnx.save(plain, str(folder / "plain.onnx"))
    future = onnx.load(str(good))
    future.metadata_props[0].value = future.metadata_props[0].value.replace("segserve-onnx/1", "segserve-onnx/9")
    onnx.save(future, str(folder / "future.onnx"))
    data = good.read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (folder / "photo.onnx").write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, not a model")
    return {
        "plain": (folder / "plain.onnx", "no segserve metadata"),
        "future": (folder / "future.onnx", "segserve metadata format 'segserve-onnx/9' is not one this segserve reads"),
        "truncated": (folder / "truncated.onnx", "cannot load"),
        "photo": (folder / "photo.onnx", "cannot load: not an ONNX model, or a truncated one"),
        "missing": (folder / "missing.onnx", "model file does not exist"),
    }


def test_bad_model_files_get_one_line_errors(exports, tmp_path: Path, segserve_command: list[str]) -> None:
    for path, message in _broken_files(tmp_path, exports["8s"][2]).values():
        with pytest.raises(ModelFileError) as caught:
            load_model(path)
        text = str(caught.value)
        assert text.startswith(str(path)) and message in text and "\n" not in text
        result = subprocess.run([*segserve_command, "info", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip() == f"segserve: error: {text}"


def test_cli_export_check_writes_a_verified_file(tmp_path: Path, segserve_command: list[str]) -> None:
    fake_checkpoint("16s", backbone="mobilenet_v3_small").save(tmp_path / "run.pt")
    out = tmp_path / "models" / "tiny.onnx"
    result = subprocess.run([*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(out), "--check"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "onnx.checker (full_check): passed" in result.stdout and "argmax agreement" in result.stdout
    assert load_model(out).metadata.variant == "16s" and load_model(out).metadata.image_size is None  # not recorded
    assert METADATA_KEY in {p.key for p in onnx.load(str(out)).metadata_props}
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx"]  # no temporary left behind

    failed = subprocess.run([*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(tmp_path / "x.onnx"),
                             "--check", "--tolerance", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert failed.returncode == 1 and "parity check failed" in failed.stderr
    assert not (tmp_path / "x.onnx").exists()

    half = subprocess.run([*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(tmp_path / "h.onnx"),
                           "--check", "--fp16", "--simplify", "--image-size", "720x1280"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert half.returncode == 0, half.stderr
    assert load_model(tmp_path / "h.onnx").metadata.image_size == (720, 1280)
    assert "onnxruntime (float16) vs PyTorch (float32)" in half.stdout
    assert load_model(tmp_path / "h.onnx").metadata.precision == "float16"
    assert not list(tmp_path.glob(".*tmp*"))


def test_evaluating_an_onnx_file_needs_no_torch(exports, tmp_path: Path, torchless_env: dict[str, str]) -> None:
    """The serving side (runtime, evaluate on .onnx) runs where importing torch fails."""
    import json
    import sys

    from conftest import write_dataset

    _, metadata, path = exports["8s"]
    data = write_dataset(tmp_path / "data", "folder", train=2, val=2)
    spec = {"classes": list(metadata.classes), "colors": [list(c) for c in metadata.palette], "ignore_index": 255}
    (data / "classes.json").write_text(json.dumps(spec))
    env = torchless_env
    result = subprocess.run([sys.executable, "-m", "segserve", "evaluate", str(path), "--data", str(data),
                             "--json", str(tmp_path / "m.json"), "--no-progress"],
                            capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m.json").read_text())["pixels"] == 2 * (48 * 64 - 3)
    blocked = subprocess.run([sys.executable, "-m", "segserve", "summary", "resnet18"], capture_output=True,
                             text=True, timeout=60, env=env)  # fmt: skip
    assert blocked.returncode == 2 and "needs PyTorch (torch is not installed here)" in blocked.stderr
    assert "Traceback" not in blocked.stderr


def test_int8_export_is_calibrated_on_images_and_keeps_the_contract(tmp_path: Path, segserve_command) -> None:
    from PIL import Image

    fake_checkpoint("8s", backbone="mobilenet_v3_small", input_scale=0.5).save(tmp_path / "run.pt")
    for index in range(4):
        pixels = np.random.default_rng(index).integers(0, 256, size=(72, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"calib{index}.png")
    out = tmp_path / "int8.onnx"
    missing = subprocess.run([*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(out), "--int8"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "--int8 needs --calibrate DIR" in missing.stderr
    command = [*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(out), "--int8", "--check"]
    result = subprocess.run([*command, "--calibrate", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "calibrating int8 ranges on 4 images" in result.stdout and "onnxruntime (int8)" in result.stdout
    loaded = load_model(out)
    assert loaded.metadata.precision == "int8" and loaded.metadata.classes == tuple(CLASSES)
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DepthToSpace" in ops  # deconvolutions in sub-pixel form: quantizable
    assert "ConvTranspose" not in ops
    logits, labels = loaded.session.run(None, {"images": np.zeros((2, 33, 47, 3), np.uint8)})
    assert logits.shape == (2, 5, 33, 47) and labels.shape == (2, 33, 47) and logits.dtype == np.float32


def test_tta_flip_export_averages_the_image_and_its_mirror(tmp_path: Path, segserve_command: list[str]) -> None:
    fake_checkpoint("8s", input_scale=0.5, backbone="mobilenet_v3_small").save(tmp_path / "run.pt")
    plain, flipped = tmp_path / "plain.onnx", tmp_path / "tta.onnx"
    for out, extra in ((plain, []), (flipped, ["--tta", "flip", "--check"])):
        done = subprocess.run([*segserve_command, "export", str(tmp_path / "run.pt"), "-o", str(out), *extra],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert load_model(flipped).metadata.tta == "flip" and load_model(plain).metadata.tta is None
    images = np.random.default_rng(3).integers(0, 256, size=(2, 45, 70, 3), dtype=np.uint8)
    base = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    tta = ort.InferenceSession(str(flipped), providers=["CPUExecutionProvider"])
    one = base.run(["logits"], {"images": images})[0]
    mirror = base.run(["logits"], {"images": np.ascontiguousarray(images[:, :, ::-1])})[0][..., ::-1]
    assert np.abs(tta.run(["logits"], {"images": images})[0] - (one + mirror) / 2).max() < 1e-4
    refused = subprocess.run([*segserve_command, "export", "--classifier", "mobilenet_v3_small", "-o",
                              str(tmp_path / "c.onnx"), "--tta", "flip"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "--tta is for segmentation checkpoints" in refused.stderr


def test_evaluate_scores_an_onnx_file_as_served(exports, tmp_path: Path, segserve_command) -> None:
    """--scale model (default) scores what the runtime serves (resampled to the model's training scale), --scale
    native the network on each frame as it is; both equal the runtime's own answers, pixel for pixel."""
    import dataclasses
    import json

    from conftest import write_dataset

    from segserve.datasets import open_collection
    from segserve.runtime import Segmenter
    from segserve.training.evaluate import evaluate

    graph, metadata, _ = exports["8s"]
    small = export_onnx(graph, tmp_path / "small.onnx", dataclasses.replace(metadata, image_size=(24, 32)))
    data = write_dataset(tmp_path / "data", "folder", train=2, val=3)
    spec = {"classes": list(metadata.classes), "colors": [list(c) for c in metadata.palette], "ignore_index": 255}
    (data / "classes.json").write_text(json.dumps(spec))
    confusions = {}
    for scale in ("model", "native"):
        result = subprocess.run([*segserve_command, "evaluate", str(small), "--data", str(data), "--scale", scale,
                                 "--json", str(tmp_path / f"{scale}.json"), "--no-progress"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr
        confusions[scale] = np.array(json.loads((tmp_path / f"{scale}.json").read_text())["confusion"])
        segmenter = Segmenter(small, ["CPUExecutionProvider"], scale=scale)
        assert segmenter.working_size(48, 64) == ((24, 32) if scale == "model" else (48, 64))
        _, expected = evaluate(lambda images, s=segmenter: np.stack([r.labels for r in s.segment_many(list(images))]),
                               open_collection(data, "val", None), progress=False)  # fmt: skip
        assert np.array_equal(confusions[scale], expected), scale
    assert not np.array_equal(confusions["model"], confusions["native"])  # 48x64 frames run at 24x32, or as they are
