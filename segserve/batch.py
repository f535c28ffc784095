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
import os
import shutil
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from segserve.files import write_atomic
from segserve.images import ImageError, is_image_name, read_image
from segserve.runtime.outputs import OutputError, OutputPlan, Payload, render
from segserve.runtime.segmenter import SegmentationResult, Segmenter
from segserve.runtime.vectors import georeference

TEMP_DIR = ".segserve-tmp"


class BatchError(ValueError):
    """A problem with the request as a whole (bad output kind, unknown class, no inputs)."""


@dataclass(frozen=True)
class Job:
    """One input image and the output path stem (relative to OUT_DIR, no suffix) its results go to."""

    source: Path
    stem: PurePosixPath


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
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
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
    for source, relative in found:
        key = source.resolve()
        if key in seen:
            continue
        seen.add(key)
        jobs.append(Job(source, relative))
    stems = output_stems([j.stem for j in jobs])
    return [Job(j.source, stem) for j, stem in zip(jobs, stems, strict=True)], missing


def output_stems(relative: Sequence[PurePosixPath]) -> list[PurePosixPath]:
    """Each input's output stem: its relative path without the suffix, unless two inputs would share that stem
    (``a.jpg`` and ``a.png``): those keep their suffix. One rule for both engines' input listers."""
    counts = Counter(path.with_suffix("") for path in relative)
    return [path.with_suffix("") if counts[path.with_suffix("")] == 1 else path for path in relative]


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


# ---- atomic outputs -----------------------------------------------------------------------------------------------


class OutputFolder:
    """OUT_DIR, whose outputs are published atomically through a private temporary folder of this process.

    Temporaries live in ``OUT_DIR/.segserve-tmp/<pid>/``; those of a run that was killed are removed by the next."""

    def __init__(self, out_dir: Path, temp_name: str | None = None) -> None:
        self.out_dir = out_dir.resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.temp_root = self.out_dir / TEMP_DIR
        self._remove_stale_temporaries()
        self.temp = self.temp_root / (temp_name or temp_folder_name())
        self.temp.mkdir(parents=True, exist_ok=True)

    def _remove_stale_temporaries(self) -> None:
        if not self.temp_root.is_dir():
            return
        for folder in self.temp_root.iterdir():
            if _stale(folder.name):
                shutil.rmtree(folder, ignore_errors=True)

    def target(self, relative: PurePosixPath) -> Path:
        path = (self.out_dir / relative).resolve()
        if not path.is_relative_to(self.out_dir) or path == self.out_dir:
            raise BatchError(f"output {relative} would fall outside the output folder")
        return path

    def write(self, relative: PurePosixPath, payload: Payload) -> None:
        """Bytes to a file, or {file name: bytes} to a folder, appearing at once under ``relative``."""
        final = self.target(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(final, payload, temp_dir=self.temp)

    def close(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run's temporaries are still there
            self.temp_root.rmdir()


def temp_folder_name(prefix: str = "") -> str:
    """``[PREFIX-]HOST-PID``: whose temporaries these are, so a later run on a shared disk removes only those of
    dead processes on its own host."""
    return f"{prefix}{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _stale(name: str) -> bool:
    """A temporary folder left by a process of this host that is gone (bare ``PID``: older segserve versions)."""
    host, _, pid = name.rpartition("-")
    if not pid.isdigit():
        return False
    if host and host.rpartition("-")[2] != socket.gethostname().replace("-", "_"):
        return False  # another machine's: it may still be running
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


# ---- the run ------------------------------------------------------------------------------------------------------


class _Run:
    """One batch run's state: the plan, where outputs go, the report and the progress bar."""

    def __init__(self, segmenter: Segmenter, plan: OutputPlan, out_dir: Path, progress: bool,
                 report_failure: Callable[[str, str], None] | None) -> None:  # fmt: skip
        self.segmenter = segmenter
        try:
            self.plan = plan.checked(segmenter.metadata)
        except OutputError as error:
            raise BatchError(str(error)) from None
        self.folder = OutputFolder(out_dir)
        self.report = BatchReport()
        self.report_failure = report_failure
        self.bar = tqdm(total=0, unit="img", disable=not progress, dynamic_ncols=True)
        self.targets: dict[Job, dict[str, PurePosixPath]] = {}

    def todo(self, jobs: Sequence[Job], resume: bool) -> list[Job]:
        """The jobs to run; with ``resume`` those whose outputs all exist are skipped."""
        left = []
        for job in jobs:
            self.targets[job] = self.plan.file_names(job.stem)
            if resume and all(self.folder.target(p).exists() for p in self.targets[job].values()):
                self.report.skipped += 1
            else:
                left.append(job)
        self.bar.total = len(left)
        return left

    def fail(self, job: Job, error: BaseException) -> None:
        reason = _reason(error)
        self.report.failed.append((str(job.source), reason))
        if self.report_failure is not None:
            self.report_failure(str(job.source), reason)
        self.bar.update(1)

    def write(self, job: Job, result: SegmentationResult, pixels: np.ndarray) -> None:
        reference = georeference(job.source) if "geojson" in self.plan.kinds else None
        payloads = render(self.plan, result, pixels, self.segmenter.metadata, str(job.source), reference)
        for kind, payload in payloads.items():
            self.folder.write(self.targets[job][kind], payload)

    def segment(self, batch: list[tuple[Job, np.ndarray]]) -> list[tuple[Job, np.ndarray, SegmentationResult]]:
        """One model call for a batch; on failure every image of it is reported and nothing is returned."""
        try:
            results = self.segmenter.segment_many([pixels for _, pixels in batch], self.plan.needs_probabilities)
        except (OSError, ValueError, RuntimeError) as error:
            for job, _ in batch:
                self.fail(job, error)
            return []
        return [(job, pixels, result) for (job, pixels), result in zip(batch, results, strict=True)]


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
    """Segment ``jobs`` into ``out_dir``; failures are reported and skipped, never fatal.

    Three stages overlap: ``workers`` threads decode the next images while this thread runs the model
    (onnxruntime releases the GIL) and ``workers`` more encode and write finished results; both queues are
    bounded, so memory stays at a few images whatever the size of the set."""
    run = _Run(segmenter, plan, out_dir, progress, report_failure)
    started = time.perf_counter()
    todo = run.todo(jobs, resume)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # a polite kill still removes the temporaries (finally below)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with ThreadPoolExecutor(workers, "decode") as decoders, ThreadPoolExecutor(workers, "encode") as encoders:
            writing: deque[tuple[Job, Future]] = deque()
            for batch in _decoded_batches(run, decoders, todo, batch_size, max(2, batch_size + 2 * workers)):
                for job, pixels, result in run.segment(batch):
                    writing.append((job, encoders.submit(run.write, job, result, pixels)))
                _settle(run, writing, 2 * workers)
                run.bar.set_postfix_str(f"failed {len(run.report.failed)}", refresh=False)
            _settle(run, writing, 0)
    finally:
        run.bar.close()
        run.folder.close()
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run.report.seconds = time.perf_counter() - started
    return run.report


def _decoded_batches(run: _Run, decoders: ThreadPoolExecutor, todo: Sequence[Job], batch_size: int,
                     window: int) -> Iterator[list[tuple[Job, np.ndarray]]]:  # fmt: skip
    """Batches of decoded images, at most ``window`` decodes ahead; images that fail to decode are reported."""
    pending: deque[tuple[Job, Future]] = deque()
    queue = iter(todo)

    def refill() -> None:
        for job in queue:
            pending.append((job, decoders.submit(read_image, job.source, run.segmenter.max_pixels)))
            if len(pending) >= window:
                return

    refill()
    while pending:
        batch: list[tuple[Job, np.ndarray]] = []
        while pending and len(batch) < batch_size:
            job, future = pending.popleft()
            try:
                batch.append((job, future.result()))
            except (OSError, ValueError) as error:  # ImageError and friends: report, move on
                run.fail(job, error)
        refill()
        if batch:
            yield batch


def _settle(run: _Run, writing: deque[tuple[Job, Future]], limit: int) -> None:
    """Wait for finished writes until at most ``limit`` are in flight."""
    while len(writing) > limit:
        job, future = writing.popleft()
        try:
            future.result()
        except (OSError, ValueError) as error:
            run.fail(job, error)
            continue
        run.report.done += 1
        run.bar.update(1)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _reason(error: BaseException) -> str:
    if isinstance(error, ImageError):
        return str(error)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__
