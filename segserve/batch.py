"""Offline batch segmentation: many images in, label maps / overlays / heatmaps / JSON summaries out. No torch.

Three stages overlap so the model never waits on the disk: a thread pool decodes the next images while the main
thread runs the model (onnxruntime releases the GIL), and a second pool encodes and writes finished results.
Both queues are bounded, so memory stays at a few images whatever the size of the set.

Every output is written to ``OUT_DIR/.segserve-tmp/<pid>/`` and renamed into place (a heatmap folder as a whole),
so an output file either is complete or does not exist. Temporaries of a killed run are removed by the next run.
``resume`` skips inputs whose outputs all exist.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from segserve.runtime import encode
from segserve.runtime.images import ImageError, read_image
from segserve.runtime.segmenter import Segmentation, Segmenter

OUTPUT_KINDS = ("labels", "overlay", "heatmaps", "json")
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
    | {".tga", ".jp2", ".ico", ".dib"}
)
TEMP_DIR = ".segserve-tmp"


class BatchError(ValueError):
    """A problem with the request as a whole (bad output kind, unknown class, no inputs)."""


@dataclass(frozen=True)
class Job:
    """One input image and the output path stem (relative to OUT_DIR, no suffix) its results go to."""

    source: Path
    stem: PurePosixPath


@dataclass(frozen=True)
class OutputPlan:
    """What to write for each image."""

    kinds: tuple[str, ...] = ("labels",)
    classes: tuple[str, ...] | None = None  # heatmap classes (None: all)
    overlay_format: str = "png"
    alpha: float = 0.5
    heatmap_format: str = "npz"

    @property
    def needs_probabilities(self) -> bool:
        return "heatmaps" in self.kinds or "json" in self.kinds

    def paths(self, stem: PurePosixPath, classes: Sequence[str]) -> dict[str, PurePosixPath]:
        """Output kind -> relative path (a heatmap PNG set is one folder)."""
        suffixes = {
            "labels": ".labels.png",
            "overlay": f".overlay.{'jpg' if self.overlay_format in ('jpeg', 'jpg') else 'png'}",
            "heatmaps": ".heatmaps.npz" if self.heatmap_format == "npz" else ".heatmaps",
            "json": ".json",
        }
        return {kind: stem.with_name(stem.name + suffixes[kind]) for kind in self.kinds}


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        return (
            f"done {self.done}, skipped {self.skipped} (already complete), failed {len(self.failed)} "
            f"in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )


# ---- inputs -------------------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Job], list[tuple[str, str]]]:
    """Files, folders (recursive, image suffixes only) and globs -> jobs, plus inputs that matched nothing.

    Output stems mirror each file's path relative to the folder or glob root it came from (a bare file: its name),
    so no stem can climb out of OUT_DIR. Two inputs with the same stem (``a.jpg`` and ``a.png``) keep their suffix.
    """
    found: list[tuple[Path, PurePosixPath]] = []
    missing: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p))
            found += [(p, PurePosixPath(p.relative_to(path).as_posix())) for p in files]
            if not files:
                missing.append((text, "folder holds no image files"))
        elif path.is_file():
            found.append((path, PurePosixPath(path.name)))
        elif glob.has_magic(text):
            root = _glob_root(text)
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            found += [(p, PurePosixPath(_relative(p, root))) for p in files]
            if not files:
                missing.append((text, "pattern matched no files"))
        else:
            missing.append((text, "no such file or folder"))
    jobs: list[Job] = []
    seen: set[Path] = set()
    stems: dict[PurePosixPath, int] = {}
    for source, relative in found:
        key = source.resolve()
        if key in seen:
            continue
        seen.add(key)
        stems[relative.with_suffix("")] = stems.get(relative.with_suffix(""), 0) + 1
        jobs.append(Job(source, relative))
    return [
        Job(j.source, j.stem.with_suffix("") if stems[j.stem.with_suffix("")] == 1 else j.stem) for j in jobs
    ], missing


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    for index, part in enumerate(parts):
        if glob.has_magic(part):
            return Path(*parts[:index]) if index else Path(".")
    return Path(pattern).parent


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # a symlinked folder led elsewhere: keep the name only
        return path.name


# ---- atomic writes ------------------------------------------------------------------------------------------------


class AtomicWriter:
    """Writes outputs under OUT_DIR through a private temporary folder and a rename."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir.resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.temp_root = self.out_dir / TEMP_DIR
        self._remove_stale_temporaries()
        self.temp = self.temp_root / str(os.getpid())
        self.temp.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def _remove_stale_temporaries(self) -> None:
        if not self.temp_root.is_dir():
            return
        for folder in self.temp_root.iterdir():
            if not folder.name.isdigit() or not _alive(int(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)

    def target(self, relative: PurePosixPath) -> Path:
        path = (self.out_dir / relative).resolve()
        if not path.is_relative_to(self.out_dir) or path == self.out_dir:
            raise BatchError(f"output {relative} would fall outside the output folder")
        return path

    def _temporary(self, name: str) -> Path:
        return self.temp / f"{next(self._counter)}-{threading.get_ident()}-{name}"

    def write(self, relative: PurePosixPath, payload: bytes | dict[str, bytes]) -> None:
        """Bytes to a file, or {file name: bytes} to a folder, appearing at once under ``relative``."""
        final = self.target(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._temporary(final.name)
        if isinstance(payload, dict):
            temporary.mkdir()
            for name, data in payload.items():
                (temporary / name).write_bytes(data)
            if final.exists():
                shutil.rmtree(final)
        else:
            temporary.write_bytes(payload)
        os.replace(temporary, final)

    def close(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run's temporaries are still there
            self.temp_root.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def heatmap_file_name(index: int, name: str) -> str:
    """``03-road.png``: class index first (names may clash once cleaned); separators and odd characters -> ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return f"{index:02d}-{cleaned or 'class'}.png"


# ---- encoding -----------------------------------------------------------------------------------------------------


def encode_outputs(
    result: Segmentation,
    pixels: np.ndarray,
    plan: OutputPlan,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    source: str,
) -> dict[str, bytes | dict[str, bytes]]:
    """Output kind -> encoded payload for one image."""
    payloads: dict[str, bytes | dict[str, bytes]] = {}
    if "labels" in plan.kinds:
        payloads["labels"] = encode.label_png(result.labels, palette)
    if "overlay" in plan.kinds:
        payloads["overlay"] = encode.overlay(pixels, result.labels, palette, plan.alpha, plan.overlay_format)
    if "heatmaps" in plan.kinds:
        assert result.probabilities is not None
        chosen = plan.classes or tuple(classes)
        indices = [classes.index(name) for name in chosen]
        probabilities = result.probabilities[indices]
        if plan.heatmap_format == "npz":
            payloads["heatmaps"] = encode.heatmaps_npz(probabilities, chosen)
        else:
            pngs = encode.heatmap_pngs(probabilities, chosen)
            payloads["heatmaps"] = {heatmap_file_name(i, name): pngs[name] for i, name in
                                    zip(indices, chosen, strict=True)}  # fmt: skip
    if "json" in plan.kinds:
        record = {"source": source, **encode.summary(result.labels, classes, result.probabilities, result.timings)}
        payloads["json"] = (json.dumps(record, indent=2) + "\n").encode()
    return payloads


# ---- the run ------------------------------------------------------------------------------------------------------


def check_plan(plan: OutputPlan, classes: Sequence[str]) -> None:
    """Refuse, before any work, output kinds, formats and class names that cannot be honoured."""
    unknown = [k for k in plan.kinds if k not in OUTPUT_KINDS]
    if unknown or not plan.kinds:
        raise BatchError(f"unknown output kind(s) {unknown}; choose from {', '.join(OUTPUT_KINDS)}")
    if plan.overlay_format not in ("png", "jpeg", "jpg"):
        raise BatchError(f"overlay format must be png or jpeg, got {plan.overlay_format!r}")
    if plan.heatmap_format not in ("npz", "png"):
        raise BatchError(f"heatmap format must be npz or png, got {plan.heatmap_format!r}")
    if not 0 <= plan.alpha <= 1:
        raise BatchError(f"alpha must be between 0 and 1, got {plan.alpha}")
    if len(classes) > 256 and "labels" in plan.kinds:
        raise BatchError(f"a palette PNG holds at most 256 classes; this model has {len(classes)}")
    missing = [name for name in plan.classes or () if name not in classes]
    if missing:
        raise BatchError(f"unknown class(es) {', '.join(missing)}; the model's classes are {', '.join(classes)}")


def run_batch(
    segmenter: Segmenter,
    jobs: Sequence[Job],
    out_dir: Path,
    plan: OutputPlan,
    *,
    batch_size: int = 1,
    workers: int = 2,
    resume: bool = False,
    progress: bool = True,
    report_failure: Callable[[str, str], None] | None = None,
) -> BatchReport:
    """Segment ``jobs`` into ``out_dir``; failures are reported and skipped, never fatal."""
    classes, palette = tuple(segmenter.metadata.classes), segmenter.metadata.palette
    check_plan(plan, classes)
    writer = AtomicWriter(out_dir)
    report = BatchReport()
    started = time.perf_counter()

    def fail(source: Path, reason: str) -> None:
        report.failed.append((str(source), reason))
        if report_failure is not None:
            report_failure(str(source), reason)

    targets = {job: plan.paths(job.stem, classes) for job in jobs}
    todo = []
    for job in jobs:
        if resume and all(writer.target(p).exists() for p in targets[job].values()):
            report.skipped += 1
        else:
            todo.append(job)

    def write(job: Job, result: Segmentation, pixels: np.ndarray) -> None:
        payloads = encode_outputs(result, pixels, plan, classes, palette, str(job.source))
        for kind, payload in payloads.items():
            writer.write(targets[job][kind], payload)

    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # a polite kill still removes the temporaries (finally below)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True)
    window = max(2, batch_size + 2 * workers)
    try:
        with ThreadPoolExecutor(workers, "decode") as decoders, ThreadPoolExecutor(workers, "encode") as encoders:
            pending: deque[tuple[Job, Future]] = deque()
            writing: deque[tuple[Job, Future]] = deque()
            queue = iter(todo)

            def refill() -> None:
                for job in queue:
                    pending.append((job, decoders.submit(read_image, job.source, segmenter.max_pixels)))
                    if len(pending) >= window:
                        return

            def settle(limit: int) -> None:
                while len(writing) > limit:
                    job, future = writing.popleft()
                    try:
                        future.result()
                        report.done += 1
                    except (OSError, ValueError) as error:
                        fail(job.source, _reason(error))
                    bar.update(1)

            refill()
            while pending:
                batch: list[tuple[Job, np.ndarray]] = []
                while pending and len(batch) < batch_size:
                    job, future = pending.popleft()
                    try:
                        batch.append((job, future.result()))
                    except (OSError, ValueError) as error:  # ImageError and friends: report, move on
                        fail(job.source, _reason(error))
                        bar.update(1)
                refill()
                if not batch:
                    continue
                try:
                    results = segmenter.segment_many([pixels for _, pixels in batch], plan.needs_probabilities)
                except (OSError, ValueError, RuntimeError) as error:
                    for job, _ in batch:
                        fail(job.source, _reason(error))
                        bar.update(1)
                    continue
                for (job, pixels), result in zip(batch, results, strict=True):
                    writing.append((job, encoders.submit(write, job, result, pixels)))
                settle(2 * workers)
                bar.set_postfix_str(f"failed {len(report.failed)}", refresh=False)
            settle(0)
    finally:
        bar.close()
        writer.close()
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report.seconds = time.perf_counter() - started
    return report


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _reason(error: BaseException) -> str:
    if isinstance(error, ImageError):
        return str(error)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__
