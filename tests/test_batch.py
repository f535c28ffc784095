"""``segserve segment``, the batch command, through its entry point: outputs, failures, kill and resume, no torch."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segserve.batch import collect_inputs
from segserve.runtime import Segmenter
from segserve.runtime.outputs import OutputPlan


def write_images(folder: Path, count: int, size: tuple[int, int] = (60, 80), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = folder / f"img{index:03d}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def output_files(out: Path) -> dict[str, bytes]:
    """Relative path -> content of every output file, JSON without its timings (they differ run to run)."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".json":
            record = json.loads(data)
            record.pop("timings_ms")
            data = json.dumps(record, sort_keys=True).encode()
        files[path.relative_to(out).as_posix()] = data
    return files


def test_outputs_match_the_runtime_and_bad_files_are_listed(small_model, tmp_path: Path, segserve_command) -> None:
    path, _ = small_model
    inputs = tmp_path / "in"
    good = write_images(inputs / "a", 3) + write_images(inputs / "b" / "c", 2, size=(33, 47), seed=1)
    (inputs / "b" / "corrupt.png").write_bytes(good[1].read_bytes()[:200])  # truncated PNG
    (inputs / "b" / "empty.jpg").write_bytes(b"")
    (inputs / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    result = subprocess.run([*segserve_command, "segment", str(inputs), "-o", str(out), "--model", str(path),
                             "--outputs", "labels,overlay,heatmaps,json", "--classes", "road,car", "--batch-size",
                             "2", "--no-progress"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "done 5, skipped 0 (already complete), failed 3" in result.stderr
    for bad in ("corrupt.png", "empty.jpg", "notes.png"):
        assert sum(bad in line for line in result.stderr.splitlines()) >= 1
    assert "Traceback" not in result.stderr

    segmenter = Segmenter(path, threads=1)
    for source in good:
        stem = out / source.relative_to(inputs).with_suffix("")
        expected = segmenter.segment(source, probabilities=True)
        with Image.open(f"{stem}.labels.png") as labels:
            assert labels.mode == "P" and labels.size == Image.open(source).size
            assert np.array_equal(np.asarray(labels), expected.labels)
        with Image.open(f"{stem}.overlay.png") as overlay:
            assert overlay.size == labels.size
        heatmaps = np.load(f"{stem}.heatmaps.npz")
        assert sorted(heatmaps.files) == ["car", "road"]
        road = segmenter.metadata.classes.index("road")
        assert np.abs(heatmaps["road"].astype(np.float32) - expected.probabilities[road]).max() < 1e-3
        summary = json.loads(Path(f"{stem}.json").read_text())
        assert (
            summary["width"] == labels.size[0]
            and sum(c["pixels"] for c in summary["classes"]) == labels.size[0] * labels.size[1]
        )
    assert not (out / "b" / "corrupt.labels.png").exists() and not (out / ".segserve-tmp").exists()


def test_output_names_never_leave_the_output_folder(tmp_path: Path) -> None:
    (tmp_path / "x" / "deep").mkdir(parents=True)
    for name in ("x/a.png", "x/a.jpg", "x/deep/b.png", "x/skip.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    jobs, missing = collect_inputs([str(tmp_path / "x"), str(tmp_path / "x" / ".." / "c.webp"),
                                    str(tmp_path / "x" / "**" / "b.png"), str(tmp_path / "nothing.png")])  # fmt: skip
    stems = sorted(str(j.stem) for j in jobs)
    assert stems == ["a.jpg", "a.png", "c", "deep/b"]  # same stem twice: suffix kept; b.png found once
    assert all(".." not in j.stem.parts and not j.stem.is_absolute() for j in jobs)
    assert missing == [(str(tmp_path / "nothing.png"), "no such file or folder")]
    assert (
        OutputPlan(kinds=("labels", "heatmaps"), heatmap_format="png").file_names(jobs[0].stem)["heatmaps"].name
        == "a.jpg.heatmaps"
    )


def test_bad_requests_exit_2_before_any_work(small_model, tmp_path: Path, segserve_command) -> None:
    path, _ = small_model
    write_images(tmp_path / "in", 1)
    for extra, message in ((["--classes", "road,unicorn"], "unknown class(es) unicorn"),
                           (["--outputs", "labels,mask"], "unknown output kind(s) ['mask']")):  # fmt: skip
        result = subprocess.run([*segserve_command, "segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                 "--model", str(path), "--outputs", "heatmaps", *extra], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not list((tmp_path / "out").glob("*.npz"))
    missing_model = subprocess.run([*segserve_command, "segment", str(tmp_path / "in"), "-o", str(tmp_path / "o2"),
                                    "--model", str(tmp_path / "none.onnx")], capture_output=True, text=True,
                                   timeout=120)  # fmt: skip
    assert missing_model.returncode == 2 and "none.onnx" in missing_model.stderr


def test_killed_run_leaves_no_partial_file_and_resume_matches(small_model, tmp_path: Path, segserve_command) -> None:
    path, _ = small_model
    write_images(tmp_path / "in", 40, size=(384, 512))
    args = ["segment", str(tmp_path / "in"), "--model", str(path), "--outputs", "labels,overlay,heatmaps,json",
            "--threads", "1", "--workers", "1", "--no-progress"]  # fmt: skip
    reference = subprocess.run([*segserve_command, *args, "-o", str(tmp_path / "ref")], capture_output=True,
                               text=True, timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    process = subprocess.Popen([*segserve_command, *args, "-o", str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    partial = output_files(out) if out.exists() else {}
    assert 0 < len([n for n in partial if n.endswith(".json")]) < 40, "kill the run mid-way"
    for name in partial:  # every file present is complete
        if name.startswith(".segserve-tmp/"):
            continue
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                image.load()
        elif name.endswith(".npz"):
            assert len(np.load(out / name).files) == 5
    assert set(partial) - {n for n in partial if n.startswith(".segserve-tmp/")} <= set(output_files(tmp_path / "ref"))

    resumed = subprocess.run([*segserve_command, *args, "-o", str(out), "--resume"], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stderr.split("skipped ")[1].split()[0])
    assert skipped >= 1
    assert output_files(out) == output_files(tmp_path / "ref")  # temporaries of the killed run are gone too


def test_batch_command_runs_without_torch(small_model, tmp_path: Path, torchless_env: dict[str, str]) -> None:
    path, _ = small_model
    write_images(tmp_path / "in", 2)
    result = subprocess.run([sys.executable, "-m", "segserve", "segment", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), "--model", str(path), "--outputs", "labels,json"],
                            capture_output=True, text=True, timeout=120, env=torchless_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.labels.png"))) == 2


@pytest.mark.parametrize("batch_size", [1, 3])
def test_segment_many_equals_one_by_one(small_model, batch_size: int) -> None:
    path, _ = small_model
    segmenter = Segmenter(path, threads=1)
    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, size=size, dtype=np.uint8) for size in [(40, 50, 3), (40, 50, 3), (21, 17, 3)]]
    many = segmenter.segment_many(images[:batch_size] + images[2:], probabilities=True)
    for image, result in zip(images[:batch_size] + images[2:], many, strict=True):
        single = segmenter.segment(image, probabilities=True)
        assert np.array_equal(single.labels, result.labels)
        assert np.abs(single.probabilities - result.probabilities).max() < 1e-5


def test_png_heatmaps_are_one_folder_per_image(small_model, tmp_path: Path, segserve_command) -> None:
    path, _ = small_model
    image = Image.fromarray(np.full((20, 30, 3), 99, np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "one.png").write_bytes(buffer.getvalue())
    result = subprocess.run([*segserve_command, "segment", str(tmp_path / "one.png"), "-o", str(tmp_path / "out"),
                             "--model", str(path), "--outputs", "heatmaps", "--heatmap-format", "png"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out" / "one.heatmaps").iterdir())
    assert len(names) == 5 and all(n.endswith(".png") for n in names)
