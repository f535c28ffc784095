"""Training end to end through the CLI: records, atomic checkpoints, exact resume after SIGKILL, evaluate."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segserve.training.augment import AugmentConfig, augment
from segserve.training.checkpoint import FORMAT, Checkpoint, CheckpointError

TRAIN = ["train", "--backbone", "mobilenet_v3_small", "--fcn", "8s", "--batch-size", "4", "--lr", "3e-3",
         "--seed", "7", "--no-progress"]  # fmt: skip


def run(command: list[str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, segserve_command: list[str]) -> tuple[Path, Path, str]:
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data", "camvid", train=8, val=3)
    out = root / "run"
    result = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "3", "--out", str(out),
                 "--class-weights", "median-freq")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return data, out, result.stdout


def test_run_dir_holds_every_record(trained_run: tuple[Path, Path, str]) -> None:
    _, out, stdout = trained_run
    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "confusion.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["mean_iou"]) <= 1 for r in rows)
    assert stdout.count("val pixel acc") == 3
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("segserve train --backbone mobilenet_v3_small")
    assert config["model"]["classes"] == ["background", "box", "stripe"]
    for png in ("curves.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_complete_and_loads_weights_only(trained_run: tuple[Path, Path, str]) -> None:
    _, out, _ = trained_run
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == FORMAT
    assert {"model_config", "model", "optimizer", "scheduler", "epoch", "batch", "step", "rng"} <= set(checkpoint)
    config = checkpoint["model_config"]
    assert config["backbone"] == "mobilenet_v3_small" and config["variant"] == "8s"
    assert len(config["palette"]) == 3 and len(config["mean"]) == 3 and config["input_scale"] == 1.0
    assert config["image_size"] == [48, 64]  # the training frames' size: the scale the runtime resamples to
    assert checkpoint["epoch"] == 3 and checkpoint["batch"] == 0 and checkpoint["step"] == 6
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng"])


def test_evaluate_reprints_the_training_figures(trained_run, segserve_command, tmp_path: Path) -> None:
    data, out, _ = trained_run
    best = Checkpoint.load(out / "best.pt")
    result = run(segserve_command, "evaluate", str(out / "best.pt"), "--data", str(data), "--split", "val",
                 "--json", str(tmp_path / "m.json"), "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "m.json").read_text())
    logged = best.model_config.validation
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert figures[key] == pytest.approx(logged[key], abs=1e-12), key
    assert f"{100 * logged['mean_iou']:6.2f}" in result.stdout
    row = next(r for r in csv.DictReader((out / "metrics.csv").open()) if int(r["epoch"]) == logged["epoch"])
    assert float(row["mean_iou"]) == pytest.approx(figures["mean_iou"], abs=1e-12)
    confusion = np.array(figures["confusion"])  # rows true, columns predicted: the metrics follow from it
    assert confusion.sum() == figures["pixels"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(figures["pixel_accuracy"], abs=1e-12)
    assert "most confused" in result.stdout and all(0 < m["share"] <= 1 for m in figures["top_confusions"])


def test_existing_run_is_not_overwritten(trained_run, segserve_command) -> None:
    data, out, _ = trained_run
    before = (out / "last.pt").stat().st_mtime_ns
    result = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "3", "--out", str(out))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    changed = run(segserve_command, *TRAIN[:-3], "--seed", "8", "--data", str(data), "--epochs", "4", "--out",
                  str(out), "--resume")  # fmt: skip
    assert changed.returncode == 2 and "started with seed=7" in changed.stderr
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_init_fine_tunes_from_a_checkpoint_at_another_scale(trained_run, segserve_command, tmp_path: Path) -> None:
    """--init: the new run starts from the old weights and normalisation; mismatched models are refused."""
    from segserve.training.config import TrainConfig
    from segserve.training.loop import TrainingError, train

    data, out, _ = trained_run
    source = Checkpoint.load(out / "best.pt")
    tuned = tmp_path / "tuned"
    result = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "1", "--out", str(tuned), "--init",
                 str(out / "best.pt"), "--input-scale", "0.5", "--class-weights", "sqrt-median-freq",
                 "--lr", "1e-12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = Checkpoint.load(tuned / "last.pt")
    assert after.model_config.input_scale == 0.5
    assert after.model_config.mean == source.model_config.mean
    trunk = "fcn.backbone.features.0.0.weight"
    assert torch.allclose(after.model[trunk], source.model[trunk], atol=1e-6)  # lr ~0: the weights it began with
    with pytest.raises(TrainingError, match="it has backbone='mobilenet_v3_small', this run 'resnet18'"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "x"), backbone="resnet18", init=str(out / "best.pt"),
                          progress=False))  # fmt: skip


def _precisions() -> list[str]:
    from segserve.hardware import native_bf16

    return ["fp32", *(["bf16"] if native_bf16() else []), *(["fp16"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("precision", _precisions())
def test_resume_after_sigkill_is_exact(tmp_path: Path, segserve_command: list[str], precision: str) -> None:
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", "camvid", train=8, val=2, size=(96, 128))
    args = [*TRAIN, "--data", str(data), "--epochs", "4", "--checkpoint-every", "1", "--jitter", "0.3",
            "--photometric", "strong", "--ema", "0.9", "--precision", precision]  # fmt: skip
    reference = run(segserve_command, *args, "--out", str(tmp_path / "straight"))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen([*segserve_command, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = Checkpoint.load(out / "last.pt")
    assert (interrupted.epoch, interrupted.batch) < (4, 0), "killed after the run had finished"

    resumed = run(segserve_command, *args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = Checkpoint.load(tmp_path / "straight" / "last.pt")
    b = Checkpoint.load(out / "last.pt")
    assert a.step == b.step == 8
    diff = max((a.model[k].float() - b.model[k].float()).abs().max().item() for k in a.model)
    assert diff <= 1e-6
    assert a.ema is not None and b.ema is not None  # the weight average resumes exactly too
    assert max((a.ema[k].float() - b.ema[k].float()).abs().max().item() for k in a.ema) <= 1e-6
    config = json.loads((out / "config.json").read_text())
    assert config["resumed"][0]["command"].endswith("--resume")


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable checkpoint"):
        Checkpoint.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt is not a segserve checkpoint"):
        Checkpoint.load(tmp_path / "other.pt")


def test_augmentation_is_a_function_of_its_seed() -> None:
    from conftest import synthetic_pair

    image, mask = synthetic_pair(0, (60, 80))
    config = AugmentConfig(input_scale=0.5, scale_range=(0.75, 1.5), crop=(48, 64), jitter=0.2)
    mean = torch.tensor([100.0, 100.0, 100.0])
    a = augment(image, mask, mean, config, np.random.default_rng([1, 2, 3]))
    b = augment(image, mask, mean, config, np.random.default_rng([1, 2, 3]))
    c = augment(image, mask, mean, config, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 48, 64) and a[1].shape == (48, 64)
    # At scale 0.5 x <=1.5 the 60x80 image is at most 45x60: the crop is padded with ignored labels.
    assert (a[1] == 255).any()
    assert set(a[1].unique().tolist()) <= {0, 1, 2, 255}


def test_holdout_chooses_on_the_held_out_frames_and_reports_val(tmp_path: Path, segserve_command) -> None:
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", "camvid", train=8, val=2)
    out = tmp_path / "run"
    result = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "2", "--out", str(out),
                 "--holdout", "train_001", "--precision", "fp32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "held-out pixel acc" in result.stdout and "val mIoU" in result.stdout
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert all(0 <= float(r["val_mean_iou"]) <= 1 for r in rows)
    card = Checkpoint.load(out / "best.pt").model_config.validation
    assert card["split"] == "train[train_001]" and 0 <= card["val"]["mean_iou"] <= 1
    assert json.loads((out / "config.json").read_text())["config"]["holdout"] == "train_001"
    refused = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "x"),
                  "--holdout", "0006R0")  # fmt: skip
    assert refused.returncode == 2 and "must match some but not all training frames" in refused.stderr


def test_precision_is_resolved_recorded_and_checkpoints_stay_fp32(tmp_path: Path, segserve_command) -> None:
    from conftest import write_dataset

    from segserve.hardware import native_bf16

    data = write_dataset(tmp_path / "data", "camvid", train=8, val=2)
    out = tmp_path / "run"
    result = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = "fp16" if torch.cuda.is_available() else "bf16" if native_bf16() else "fp32"
    assert f"precision: {expected} (auto;" in result.stdout
    assert json.loads((out / "config.json").read_text())["precision"] == expected
    assert all(
        v.dtype == torch.float32 for v in Checkpoint.load(out / "last.pt").model.values() if v.is_floating_point()
    )
    if not torch.cuda.is_available():
        refused = run(segserve_command, *TRAIN, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "y"),
                      "--precision", "fp16")  # fmt: skip
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


def test_weight_average_follows_its_formula_and_is_what_the_checkpoint_serves(tmp_path: Path) -> None:
    """--ema: the average moves by (1 - decay_t) toward each step's weights, BatchNorm statistics included, and a
    checkpoint holding one builds its pipeline (exports, evaluate) from the average, not the last step."""
    from segserve.models.fcn import build_fcn
    from segserve.models.pipeline import SegmentationPipeline
    from segserve.training.loop import TrainingError, WeightAverage

    pipeline = SegmentationPipeline(build_fcn("mobilenet_v3_small", "8s", 3), [0.5] * 3, [0.25] * 3)
    average = WeightAverage(pipeline, decay=0.99)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for value in pipeline.state_dict().values():
            if value.is_floating_point():
                value.add_(1.0)
    average.update(pipeline, step=100)  # decay_t = min(0.99, 101 / 110) = 0.918...
    weight = 1 - 101 / 110
    for key, value in average.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, start[key] + weight, atol=1e-5), key
    assert any("running_mean" in k for k in start)  # buffers are averaged as well
    with pytest.raises(TrainingError, match="between 0 and 1"):
        WeightAverage(pipeline, decay=1.0)

    from segserve.training.checkpoint import ModelConfig

    config = ModelConfig("mobilenet_v3_small", "8s", ["a", "b", "c"], [[0, 0, 0]] * 3, [0.5] * 3, [0.25] * 3)
    raw = {k: v.clone() for k, v in pipeline.state_dict().items()}
    ema = {k: v.clone() for k, v in average.model.state_dict().items()}
    Checkpoint(config, model=raw, ema=ema).save(tmp_path / "ema.pt")
    served = Checkpoint.load(tmp_path / "ema.pt").pipeline().state_dict()
    key = next(k for k in ema if k.endswith("weight"))
    assert torch.equal(served[key], ema[key]) and not torch.equal(served[key], raw[key])


def test_strong_photometric_augmentation_changes_colour_not_labels() -> None:
    """--photometric strong: a seeded function of the sample, labels untouched, values within [0, 255]."""
    from conftest import synthetic_pair

    image, mask = synthetic_pair(0, (60, 80))
    mean = torch.tensor([100.0, 100.0, 100.0])
    light = AugmentConfig(input_scale=1.0, scale_range=(1.0, 1.0), crop=(48, 64), jitter=0.2)
    strong = AugmentConfig(input_scale=1.0, scale_range=(1.0, 1.0), crop=(48, 64), jitter=0.2, photometric="strong")
    a = augment(image, mask, mean, light, np.random.default_rng([5, 0, 1]))
    b = augment(image, mask, mean, strong, np.random.default_rng([5, 0, 1]))
    c = augment(image, mask, mean, strong, np.random.default_rng([5, 0, 1]))
    assert torch.equal(a[1], b[1])  # same geometry: photometric draws come after every geometric one
    assert torch.equal(b[0], c[0]) and not torch.allclose(a[0], b[0])
    assert b[0].min() >= 0 and b[0].max() <= 255


def test_evaluate_on_the_frames_of_one_drive(trained_run, segserve_command, tmp_path: Path) -> None:
    data, out, _ = trained_run
    figures = {}
    for prefix in ("train_", "train_003"):
        result = run(segserve_command, "evaluate", str(out / "best.pt"), "--data", str(data), "--split", "train",
                     "--frames", prefix, "--json", str(tmp_path / f"{prefix}.json"), "--no-progress")  # fmt: skip
        assert result.returncode == 0, result.stderr
        figures[prefix] = json.loads((tmp_path / f"{prefix}.json").read_text())
    assert figures["train_"]["split"] == "train[train_]" and figures["train_003"]["split"] == "train[train_003]"
    assert figures["train_003"]["pixels"] * 8 == figures["train_"]["pixels"]  # one frame of eight, same size
    refused = run(segserve_command, "evaluate", str(out / "best.pt"), "--data", str(data), "--split", "train",
                  "--frames", "0006R0", "--no-progress")  # fmt: skip
    assert refused.returncode == 2 and "matches none of the train frames" in refused.stderr
