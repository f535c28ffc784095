"""Batch segmentation on a Ray cluster (``segserve segment --engine ray``), built on Ray Data. No torch.

The driver lists the inputs once (or reads ``--from-list``), drops those already complete (``--resume``) and
streams (source, stem) rows through two stages, as Ray's offline batch-inference guide lays them out:

1. **read** (Ray tasks, CPU): fetch each input's bytes (a path, or any ``pyarrow.fs`` URI) and decode them with
   the same checks as the local engine; a bad input becomes a row that says why.
2. **segment** (a pool of actors, ``ActorPoolStrategy``): each actor loads the model once, in ``__init__``, then
   segments batch after batch, renders the outputs with the local engine's :func:`render` and writes them itself.

Only a small status row per image comes back to the driver, which counts, reports and shows images/s. Outputs
are published as the local engine publishes them: written under ``OUT/.segserve-tmp/ray-HOST-PID/`` and renamed
into place (local or shared disk), or, on object stores (``s3://``, ``gs://``), uploaded in one request, which
makes the object appear whole or not at all. So every output is complete or absent, whichever process is killed.

Ray is imported here only: the local engine and the service never load it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from segserve.batch import TEMP_DIR, BatchError, BatchReport, OutputFolder, _reason, output_stems, temp_folder_name
from segserve.runtime.outputs import OutputError, OutputPlan, Payload, render

#: What an actor passes to :class:`segserve.runtime.Segmenter` besides the model path.
SegmenterOptions = dict[str, Any]


class RayRunError(RuntimeError):
    """The cluster failed the run (unreachable, or a stage failed beyond Ray's retries); finished outputs stay."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: ``address`` None starts a Ray instance on this machine for the run."""

    address: str | None = None
    actors: int | None = None  # default: one per CPU the cluster has beyond one, at least one
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 16  # rows per read task and per actor call: enough to amortise Ray's per-call cost


# ---- inputs: a text file of paths or URIs --------------------------------------------------------------------------


def is_uri(text: str) -> bool:
    """``s3://...``, ``gs://...``, ``file:///...``: read and written through ``pyarrow.fs``."""
    return "://" in text


def jobs_from_list(list_file: Path) -> list[tuple[str, PurePosixPath]]:
    """(source, output stem) for each line of ``list_file`` (paths or URIs; blank lines and ``#`` comments skipped).

    Nothing is opened or listed on the driver: a missing file fails in its read task, with its reason. Stems
    mirror each entry's path below the entries' common folder; entries sharing a stem keep their suffix."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BatchError(f"--from-list {list_file}: {_reason(error)}") from None
    sources = list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")))
    if not sources:
        raise BatchError(f"--from-list {list_file} names no inputs")
    paths = [_path_part(source) for source in sources]
    parents = [p.parent.parts for p in paths]
    common = 0
    while all(len(parts) > common for parts in parents) and len({parts[common] for parts in parents}) == 1:
        common += 1
    stems = output_stems([PurePosixPath(*p.parts[common:]) for p in paths])
    return list(zip(sources, stems, strict=True))


def _path_part(source: str) -> PurePosixPath:
    """The path of a path or URI, without scheme or leading slash (``s3://b/x/y.png`` -> ``b/x/y.png``)."""
    text = source.split("://", 1)[1] if is_uri(source) else os.path.abspath(source)
    parts = [part for part in PurePosixPath(text.replace(os.sep, "/")).parts if part not in ("/", "..", ".")]
    if not parts:
        raise BatchError(f"--from-list entry {source!r} names no file")
    return PurePosixPath(*parts)


def read_bytes(source: str) -> bytes:
    """An input's bytes: a local path, or a URI any ``pyarrow.fs`` filesystem serves."""
    if not is_uri(source):
        return Path(source).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(source)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


# ---- outputs: a local folder or a pyarrow filesystem ----------------------------------------------------------------


class Destination:
    """OUT, shared by the driver and every actor (it pickles to its address and the run's temporary folder name).

    A plain path is an :class:`OutputFolder` (temporary file, then rename). A URI is a ``pyarrow.fs`` filesystem:
    ``file://`` likewise renames; object stores upload each output in one request (whole or absent)."""

    def __init__(self, out: str, temp_name: str) -> None:
        self.out, self.temp_name = out, temp_name
        self._folder: OutputFolder | None = None
        self._filesystem: Any = None
        self._base = ""

    def __getstate__(self) -> dict[str, str]:
        return {"out": self.out, "temp_name": self.temp_name}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["out"], state["temp_name"])  # type: ignore[misc]

    def open(self) -> Destination:
        """Connect (and on the driver: create OUT and remove temporaries of dead runs of this host)."""
        if is_uri(self.out):
            from pyarrow import fs

            self._filesystem, base = fs.FileSystem.from_uri(self.out)
            self._base = base.rstrip("/")
            self._filesystem.create_dir(self._base, recursive=True)
        else:
            self._folder = OutputFolder(Path(self.out), self.temp_name)
        return self

    @property
    def renames(self) -> bool:
        return self._folder is not None or self._filesystem.type_name == "local"

    def _key(self, relative: PurePosixPath) -> str:
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise BatchError(f"output {relative} would fall outside the output folder")
        return f"{self._base}/{relative.as_posix()}"

    def existing(self, wanted: Sequence[PurePosixPath]) -> set[PurePosixPath]:
        """Which of ``wanted`` exist: a stat each on a local folder, one recursive listing on a filesystem URI."""
        if self._folder is not None:
            return {p for p in wanted if self._folder.target(p).exists()}
        from pyarrow import fs

        listing = self._filesystem.get_file_info(fs.FileSelector(self._base, recursive=True, allow_not_found=True))
        found = {PurePosixPath(info.path[len(self._base) + 1 :]) for info in listing}
        return {p for p in wanted if p in found}

    def write(self, relative: PurePosixPath, payload: Payload) -> None:
        if self._folder is not None:
            self._folder.write(relative, payload)
            return
        if not isinstance(payload, bytes):
            raise OutputError("a heatmap PNG folder cannot be published atomically to a filesystem URI; use "
                              "--heatmap-format npz")  # fmt: skip
        key = self._key(relative)
        self._filesystem.create_dir(key.rpartition("/")[0], recursive=True)
        if not self.renames:  # object stores: one PUT, visible only once complete
            with self._filesystem.open_output_stream(key) as stream:
                stream.write(payload)
            return
        temporary = f"{self._base}/{TEMP_DIR}/{self.temp_name}/{os.getpid()}-{time.monotonic_ns()}.tmp"
        self._filesystem.create_dir(temporary.rpartition("/")[0], recursive=True)
        try:
            with self._filesystem.open_output_stream(temporary) as stream:
                stream.write(payload)
            self._filesystem.move(temporary, key)
        finally:
            if _exists(self._filesystem, temporary):  # the write failed part-way
                self._filesystem.delete_file(temporary)

    def close(self) -> None:
        """The driver's last word: this run's temporary folder goes, with whatever a killed worker left in it."""
        if self._folder is not None:
            self._folder.close()
        elif self.renames:
            shutil.rmtree(Path(self._base) / TEMP_DIR / self.temp_name, ignore_errors=True)


def _exists(filesystem: Any, path: str) -> bool:
    from pyarrow import fs

    return filesystem.get_file_info(path).type != fs.FileType.NotFound


# ---- the two stages ------------------------------------------------------------------------------------------------

_NO_PIXELS = np.zeros((1, 1, 3), np.uint8)  # the pixels column of a row whose input failed


def read_stage(batch: dict[str, np.ndarray], max_pixels: int | None, georeferenced: bool) -> dict[str, Any]:
    """Ray task: fetch and decode each input; a failure becomes ``error`` text, never an exception."""
    from segserve.images import read_image
    from segserve.runtime.vectors import georeference

    pixels, errors, references = [], [], []
    for source in batch["source"]:
        try:
            data = read_bytes(str(source))
            pixels.append(read_image(data, max_pixels, name=_path_part(str(source)).name))
            errors.append("")
            references.append(georeference(data) if georeferenced else None)
        except (OSError, ValueError) as error:
            pixels.append(_NO_PIXELS)
            errors.append(_reason(error) if not isinstance(error, FileNotFoundError) else "no such file")
            references.append(None)
    return {"source": batch["source"], "stem": batch["stem"], "pixels": pixels, "error": np.array(errors),
            "reference": references}  # fmt: skip


class SegmentStage:
    """Ray actor: one loaded model, reused for every batch this actor is given; writes the outputs itself.

    Encoding and writing image i overlap the model's run on image i + 1 (a writer thread; onnxruntime and
    OpenVINO release the GIL). On a GPU the whole batch goes to the model in one call instead."""

    def __init__(
        self, model: str | None, options: SegmenterOptions, plan: OutputPlan, destination: Destination
    ) -> None:
        from segserve.runtime import Segmenter

        self.segmenter = Segmenter(model, **options)
        self.plan = plan.checked(self.segmenter.metadata)
        self.destination = destination.open()  # a fresh, unpickled copy: connect from this worker
        on_gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self.segmenter.providers)
        self.whole_batch = bool(on_gpu)  # one model call per batch on a GPU, one per image on a CPU
        self.writer = ThreadPoolExecutor(2, "write")

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        errors = [str(e) for e in batch["error"]]
        good = [i for i, error in enumerate(errors) if not error]
        step = max(1, len(good)) if self.whole_batch else 1
        writes: list[tuple[int, Future]] = []
        for start in range(0, len(good), step):
            chunk = good[start : start + step]
            try:
                results = self.segmenter.segment_many([batch["pixels"][i] for i in chunk],
                                                      self.plan.needs_probabilities)  # fmt: skip
            except (OSError, ValueError, RuntimeError) as error:
                for i in chunk:
                    errors[i] = _reason(error)
                continue
            writes += [(i, self.writer.submit(self._publish, batch, i, r)) for i, r in zip(chunk, results, strict=True)]
        for i, future in writes:
            try:
                future.result()
            except (OSError, ValueError) as error:
                errors[i] = _reason(error)
        return {"source": np.asarray(batch["source"], dtype=object), "error": np.asarray(errors, dtype=object)}

    def _publish(self, batch: dict[str, Any], i: int, result: Any) -> None:
        source, stem = str(batch["source"][i]), PurePosixPath(str(batch["stem"][i]))
        payloads = render(self.plan, result, batch["pixels"][i], self.segmenter.metadata, source, batch["reference"][i])
        names = self.plan.file_names(stem)
        for kind, payload in payloads.items():
            self.destination.write(names[kind], payload)


# ---- the driver -----------------------------------------------------------------------------------------------------


def run_ray_batch(
    model: str | None,
    options: SegmenterOptions,
    jobs: Sequence[tuple[str, PurePosixPath]],
    out: str,
    plan: OutputPlan,
    ray_options: RayOptions,
    *,
    max_pixels: int | None,
    resume: bool = False,
    progress: bool = True,
    report_failure: Callable[[str, str], None] | None = None,
) -> BatchReport:
    """Segment ``jobs`` (source, output stem) into ``out`` on a Ray cluster; failures are reported, never fatal.

    ``plan`` must be checked against the model (:meth:`OutputPlan.checked`) by the caller."""
    import ray

    report = BatchReport()
    started = time.perf_counter()
    destination = Destination(out, temp_folder_name("ray-")).open()
    try:
        wanted = {stem: plan.file_names(stem) for _, stem in jobs}
        present = destination.existing([p for names in wanted.values() for p in names.values()]) if resume else set()
        todo = [(s, stem) for s, stem in jobs if not resume or not set(wanted[stem].values()) <= present]
        report.skipped = len(jobs) - len(todo)
        if todo:
            try:
                _connect(ray, ray_options.address)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise BatchError(f"cannot reach the Ray cluster at {ray_options.address}: {error}") from None
            try:
                for source, reason in _stream(ray, todo, model, options, plan, destination, ray_options, max_pixels,
                                              progress, report):  # fmt: skip
                    report.failed.append((source, reason))
                    if report_failure is not None:
                        report_failure(source, reason)
            except ray.exceptions.RayError as error:
                first = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
                raise RayRunError(f"the Ray run failed after {report.done} images: {first}") from error
    finally:
        destination.close()
    report.seconds = time.perf_counter() - started
    return report


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` made here), or start one for this run."""
    if ray.is_initialized():
        return
    _check_reachable(address)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own: images/s, failures
    context.print_on_execution_start = False
    ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that refuses connections fails now: Ray itself would retry for minutes."""
    if address is None or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():
        raise ConnectionError(f"expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as error:
        raise ConnectionError(error.strerror or str(error)) from None


def _stream(ray: Any, todo: Sequence[tuple[str, PurePosixPath]], model: str | None, options: SegmenterOptions,
            plan: OutputPlan, destination: Destination, ray_options: RayOptions, max_pixels: int | None,
            progress: bool, report: BatchReport) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Run the pipeline, counting done images in ``report`` and yielding (source, reason) for each failure."""
    actors = ray_options.actors or _default_actors(ray, ray_options)
    batch = ray_options.batch_size
    rows = [{"source": source, "stem": stem.as_posix()} for source, stem in todo]
    blocks = max(1, min(10_000, -(-len(rows) // batch)))  # a block per batch: the reads stream in batch-sized bites
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    reading = {"max_pixels": max_pixels, "georeferenced": "geojson" in plan.kinds}
    decoded = dataset.map_batches(read_stage, batch_size=batch, num_cpus=0.5, batch_format="numpy",
                                  fn_kwargs=reading)  # fmt: skip
    segmented = decoded.map_batches(
        SegmentStage, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model": model, "options": options, "plan": plan, "destination": destination},
        num_cpus=ray_options.cpus_per_actor, num_gpus=ray_options.gpus_per_actor or None,
    )  # fmt: skip
    bar = tqdm(total=len(rows), unit="img", disable=not progress, dynamic_ncols=True)
    begun = time.perf_counter()
    try:
        for answer in segmented.iter_batches(batch_size=None, batch_format="numpy"):
            for source, error in zip(answer["source"], answer["error"], strict=True):
                if error:
                    yield str(source), str(error)
                else:
                    report.done += 1
                bar.update(1)
            elapsed = time.perf_counter() - begun
            bar.set_postfix_str(f"{bar.n / elapsed:.2f} images/s, failed {len(report.failed)}", refresh=False)
    finally:
        bar.close()


def _default_actors(ray: Any, ray_options: RayOptions) -> int:
    """One actor per GPU's worth (GPU actors), else one per CPU the cluster has beyond one (kept for reading)."""
    resources = ray.cluster_resources()
    if ray_options.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / ray_options.gpus_per_actor))
    return max(1, int((resources.get("CPU", 1) - 1) / ray_options.cpus_per_actor))
