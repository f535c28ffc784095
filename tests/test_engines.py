"""Engines: the candidates this machine offers, the choice by measurement and its cache, forced choices, and the
quality bound every automatic candidate keeps on real road frames (>= 98% label agreement, <= 0.3 mIoU lost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segserve.hardware import native_bf16
from segserve.metrics import compute_metrics, confusion_matrix
from segserve.runtime import Segmenter
from segserve.runtime.engines import EngineError, candidates, int8_sibling, open_engine, openvino_available
from segserve.runtime.segmenter import default_model_path
from segserve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
SHIPPED = default_model_path(Settings.from_env({}))


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings with the automatic choice (the suite otherwise pins onnxruntime's CPU provider) and a fresh cache."""
    monkeypatch.delenv("SEGSERVE_PROVIDERS", raising=False)
    return Settings.from_env({"SEGSERVE_CACHE_DIR": str(tmp_path / "cache"), "SEGSERVE_THREADS": "2"})


def test_candidates_of_the_shipped_model_on_this_machine() -> None:
    assert int8_sibling(SHIPPED) == SHIPPED.with_name(SHIPPED.stem + "-int8.onnx")
    found = {c.label for c in candidates(SHIPPED, Segmenter(SHIPPED).metadata)}
    assert {"onnxruntime fp32 on CPU", "onnxruntime int8 on CPU"} <= found
    assert ("openvino fp32 on CPU" in found) == openvino_available()
    assert ("openvino bf16 on CPU" in found) == (openvino_available() and native_bf16())


def test_the_fastest_candidate_is_chosen_and_remembered(auto: Settings) -> None:
    first = Segmenter(settings=auto)
    timings = first.choice.timings_ms
    assert len(timings) >= 2 and first.choice.candidate.label == min(timings, key=timings.get)
    assert "fastest of" in first.choice.reason
    cache = auto.cache_dir / "engines.json"
    assert json.loads(cache.read_text())
    again = Segmenter(settings=auto)
    assert again.choice.candidate == first.choice.candidate and again.choice.reason.startswith("cached:")
    described = again.describe_engine()
    assert {"engine", "precision", "device", "reason", "calibration_ms", "providers"} <= set(described)


def test_a_changed_model_file_is_measured_again(auto: Settings, small_model, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    shutil.copy(small_model[0], path)
    assert Segmenter(path, settings=auto).choice.reason.startswith(("fastest", "the only"))
    assert Segmenter(path, settings=auto).choice.reason.startswith(("cached", "the only"))
    os.utime(path, ns=(1, 1))  # the file changed: its entry no longer applies
    assert not Segmenter(path, settings=auto).choice.reason.startswith("cached")


def test_forced_choices_and_their_errors(auto: Settings, small_model) -> None:
    forced = Segmenter(small_model[0], engine="onnxruntime", precision="fp32", settings=auto)
    assert forced.choice.candidate.label == "onnxruntime fp32 on CPU" and forced.choice.reason == "forced"
    with pytest.raises(EngineError, match=r"no engine runs small\.onnx as onnxruntime/int8 here; available: "):
        Segmenter(small_model[0], engine="onnxruntime", precision="int8", settings=auto)
    with pytest.raises(EngineError, match="unknown engine 'tensorflow'"):
        open_engine(small_model[0], engine="tensorflow")
    with pytest.raises(ValueError, match="SEGSERVE_ENGINE must be valid, got 'tensorflow'"):
        Settings.from_env({"SEGSERVE_ENGINE": "tensorflow"})


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed for this CPU")
def test_openvino_matches_onnxruntime_and_is_thread_safe(auto: Settings, small_model) -> None:
    path, _ = small_model
    reference = Segmenter(path, engine="onnxruntime", precision="fp32", settings=auto)
    openvino = Segmenter(path, engine="openvino", precision="fp32", settings=auto)
    images = [np.random.default_rng(i).integers(0, 256, size=(97 + 13 * i, 151 - 9 * i, 3), dtype=np.uint8)
              for i in range(4)]  # fmt: skip
    expected = [reference.segment(image, probabilities=True) for image in images]
    results: dict[int, object] = {}

    def run(index: int) -> None:
        for _ in range(3):
            results[index] = openvino.segment(images[index], probabilities=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        got = results[index]
        assert (got.labels == want.labels).mean() >= 0.999
        assert np.abs(got.probabilities - want.probabilities).max() < 1e-3


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed here")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_runs_tiny_and_odd_sizes(auto: Settings, small_model, precision: str) -> None:
    """Sizes whose scaled form is under the padded multiple of 32 (OpenVINO had derived a lower bound of 32 for the
    final crop and refused them) give the same labels as onnxruntime."""
    if precision == "bf16" and not native_bf16():
        pytest.skip("this CPU has no native bf16")
    path, _ = small_model
    reference = Segmenter(path, engine="onnxruntime", precision="fp32", settings=auto)
    openvino = Segmenter(path, engine="openvino", precision=precision, settings=auto)
    agree = total = 0
    for height, width in ((1, 1), (2, 3), (17, 23), (40, 50), (63, 65), (64, 64)):
        image = np.random.default_rng(height).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        got, want = openvino.segment(image).labels, reference.segment(image).labels
        assert got.shape == (height, width)
        agree, total = agree + int((got == want).sum()), total + got.size
    assert agree / total >= (0.99 if precision == "fp32" else 0.9)


@pytest.fixture(scope="module")
def pad_cropped_model(tmp_path_factory) -> Path:
    """The small test model exported as segserve did before it cropped with a Slice (a negative Pad instead)."""
    from test_export import fake_checkpoint

    import segserve.models.fcn as fcn
    from segserve.export import checkpoint_graph, export_onnx
    from segserve.models.padding import fit

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fcn, "crop", fit)
        graph, metadata = checkpoint_graph(fake_checkpoint("8s", input_scale=0.5, backbone="mobilenet_v3_small"))
        return export_onnx(graph, tmp_path_factory.mktemp("pad-cropped") / "old.onnx", metadata)


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed here")
def test_a_candidate_that_refuses_tiny_images_is_never_chosen(auto: Settings, pad_cropped_model: Path) -> None:
    """OpenVINO fp32 refuses such a file's inputs under 32 scaled pixels: neither the measurement nor a cache that
    names it (an older segserve, another file at that path) may put it in service."""
    forced = Segmenter(pad_cropped_model, engine="openvino", precision="fp32", settings=auto)
    with pytest.raises(RuntimeError, match="Pad"):  # the premise: this file still shows the old refusal
        forced.segment(np.zeros((17, 23, 3), np.uint8))
    first = Segmenter(pad_cropped_model, settings=auto)
    assert "openvino fp32 on CPU" not in first.choice.timings_ms
    cache = auto.cache_dir / "engines.json"
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["label"] = "openvino fp32 on CPU"
    cache.write_text(json.dumps(entries))
    again = Segmenter(pad_cropped_model, settings=auto)
    assert again.choice.reason.startswith("fastest") and again.choice.candidate.label != "openvino fp32 on CPU"
    assert again.segment(np.zeros((17, 23, 3), np.uint8)).labels.shape == (17, 23)


def _frames(count: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """CamVid val frames with their labels, or (where ../shared is absent) smooth synthetic scenes without."""
    files = sorted((CAMVID / "val").glob("*.png"))[::4][:count]
    if files:
        return [(np.asarray(Image.open(f).convert("RGB")), np.asarray(Image.open(CAMVID / "valannot" / f.name)))
                for f in files]  # fmt: skip
    rng = np.random.default_rng(0)
    scenes = [rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8) for _ in range(count)]
    return [(np.asarray(Image.fromarray(s).resize((480, 360), Image.BILINEAR)), None) for s in scenes]


def _miou(
    frames: list[tuple[np.ndarray, np.ndarray | None]], labels: list[np.ndarray], names: tuple[str, ...]
) -> float:
    confusion = sum(confusion_matrix(truth, p, len(names), 11) for (_, truth), p in zip(frames, labels, strict=True))
    return compute_metrics(confusion, names).mean_iou


def test_every_automatic_candidate_keeps_the_labels_on_road_frames(auto: Settings) -> None:
    frames = _frames(24)
    reference = Segmenter(SHIPPED, engine="onnxruntime", precision="fp32", settings=auto)
    names = tuple(reference.metadata.classes)
    baseline = [reference.segment(image).labels for image, _ in frames]
    for candidate in candidates(SHIPPED, reference.metadata)[1:]:
        runner = Segmenter(SHIPPED, engine=candidate.engine, precision=candidate.precision, settings=auto)
        predictions = [runner.segment(image).labels for image, _ in frames]
        agreement = np.mean([(p == b).mean() for p, b in zip(predictions, baseline, strict=True)])
        assert agreement >= 0.98, (candidate.label, agreement)
        if frames[0][1] is not None:  # real frames: the mIoU against their labels drops by 0.3 points at most
            assert _miou(frames, predictions, names) >= _miou(frames, baseline, names) - 0.003, candidate.label


def test_service_and_info_say_which_engine_runs(segserve_command: list[str], small_model) -> None:
    env = {**os.environ, "SEGSERVE_ENGINE": "onnxruntime"}
    env.pop("SEGSERVE_PROVIDERS", None)
    result = subprocess.run([*segserve_command, "info", str(small_model[0])], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    engine = json.loads(result.stdout)["engine"]
    assert engine["engine"] == "onnxruntime" and engine["precision"] == "fp32" and engine["device"] == "CPU"
    assert engine["reason"] in ("forced", "the only candidate") or "fastest" in engine["reason"]


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed here")
def test_a_signal_after_an_openvino_engine_was_dropped_elsewhere_is_handled() -> None:
    """The server's start-up measurement compiles OpenVINO candidates on the main thread and may drop them; the next
    SIGTERM must still reach Python's handler (it had crashed the worker with SIGSEGV: the plugin's alternate signal
    stack was unmapped under the main thread)."""
    script = f"""
import gc, os, signal, threading
from segserve.runtime import Segmenter
from segserve.settings import Settings
held = [Segmenter({str(SHIPPED)!r}, engine="openvino", precision="fp32", settings=Settings.from_env({{}}))]
dropper = threading.Thread(target=lambda: (held.clear(), gc.collect()))
dropper.start(); dropper.join()
signal.signal(signal.SIGTERM, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGTERM)
print("after", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["handled", "after"], (done.returncode, done.stderr[-2000:])
