"""Engines: one interface over onnxruntime and OpenVINO, the candidates a machine offers, and the choice by measurement.

The same ``.onnx`` files and metadata run everywhere; what differs is the engine and the precision:

* **onnxruntime** on the float32 file (TensorRT, CUDA or CPU provider; TensorRT with fp16 on a GPU) and on the
  calibrated int8 file beside it (``NAME-int8.onnx``);
* **OpenVINO** (x86 CPUs, where the ``openvino`` package is installed) on the float32 file in fp32, in bf16 where
  the CPU computes bf16 natively (AMX or AVX512-BF16), and on the int8 file.

Which is fastest depends on the machine (the README's table: 1.8-4x between them), so :func:`open_engine` does not
guess from a table of CPU names: it loads each candidate, times a few runs on a typical frame and keeps the fastest
(a few seconds at start-up). The choice is cached per machine and model file (``engines.json`` in the cache
folder), so a restart loads only the winner. ``engine``/``precision`` force a choice. Every candidate offered
automatically keeps the labels within the bounds the tests hold on CamVid val frames (>= 98% agreement with
onnxruntime fp32, <= 0.3 mIoU lost).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from segserve.hardware import cpu_flags, cpu_model, gpu_present, native_bf16
from segserve.modelcard import INPUT, ModelMetadata
from segserve.runtime.session import load_model, session_options

log = logging.getLogger("segserve.runtime")

ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8", "bf16", "fp16")
CALIBRATION_SIZE = (360, 480)  # a typical road frame


class EngineError(ValueError):
    """No engine can run the model as asked (the message names what is available)."""


@dataclass(frozen=True)
class Candidate:
    """One way to run a model: an engine, a precision, the file it runs and the device."""

    engine: str
    precision: str
    path: Path
    device: str = "CPU"

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision} on {self.device}"


@dataclass
class Choice:
    """The candidate in use and why: its measured time per frame and the others'."""

    candidate: Candidate
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"engine": self.candidate.engine, "precision": self.candidate.precision,
                "device": self.candidate.device, "file": self.candidate.path.name, "reason": self.reason,
                "calibration_ms": self.timings_ms}  # fmt: skip


class Engine:
    """A loaded candidate: ``run(names, images)`` -> the named outputs for an N x H x W x 3 uint8 batch."""

    def __init__(self, candidate: Candidate, metadata: ModelMetadata, providers: list[str]) -> None:
        self.candidate, self.metadata, self.providers = candidate, metadata, providers

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


class OnnxRuntimeEngine(Engine):
    def __init__(self, candidate: Candidate, providers: Sequence[str] | None, threads: int | None,
                 trt_cache: Path | None) -> None:  # fmt: skip
        fp16 = candidate.device == "TensorRT" and candidate.precision == "fp16"
        model = load_model(candidate.path, providers, session_options(threads), trt_cache, trt_fp16=fp16)
        super().__init__(candidate, model.metadata, model.providers)
        self.session = model.session

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(names), {INPUT: images})


class OpenVinoEngine(Engine):
    """OpenVINO on the CPU with dynamic shapes; one infer request per calling thread (requests are not shared)."""

    def __init__(self, candidate: Candidate, metadata: ModelMetadata, threads: int | None) -> None:
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if _bf16_hint(candidate) else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = openvino_core()
        self.compiled = core.compile_model(core.read_model(str(candidate.path)), "CPU", config)
        super().__init__(candidate, metadata, ["OpenVINO CPU"])
        self._local = threading.local()

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({INPUT: images})
        # copies: the request's output buffers are overwritten by its next call
        return [np.array(request.get_tensor(name).data) for name in names]


def _bf16_hint(candidate: Candidate) -> bool:
    """bf16 compute: asked for, or on an int8 file where the CPU has it (the layers left in float run in bf16)."""
    return candidate.precision == "bf16" or (candidate.precision == "int8" and native_bf16())


_CONVERTER = "openvino.tools.ovc"


def import_openvino() -> ModuleType:
    """The OpenVINO runtime, imported without its model converter (``openvino.tools.ovc``).

    Why: importing the converter sends a usage event to OpenVINO's telemetry, from a child process that
    openvino_telemetry forks off a thread of the importing process (seen here: ``multiprocessing.Process.start`` at
    ``import openvino``). A server worker should neither phone home nor fork itself while serving; segserve reads
    ONNX files directly and never converts, so the converter is kept out. A later explicit
    ``import openvino.tools.ovc`` still works.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = _CONVERTER not in sys.modules
    if blocked:
        sys.modules[_CONVERTER] = None  # type: ignore[assignment]  # import machinery: None means "not importable"
    try:
        import openvino
    finally:
        if blocked and sys.modules.get(_CONVERTER, 0) is None:
            del sys.modules[_CONVERTER]
    return openvino


@functools.cache
def openvino_core():  # -> openvino.Core (the module is imported lazily)
    """The process's one OpenVINO ``Core``, never released.

    Why: compiling on OpenVINO's CPU plugin gives the calling thread an alternate signal stack owned by the plugin,
    and when the last ``Core`` goes the plugin is unloaded while only the releasing thread's setting is undone. A
    thread that compiled then takes its next signal on unmapped memory. Measured in the server: the start-up
    measurement compiled OpenVINO candidates on the main thread, dropped them when onnxruntime won, and the next
    SIGTERM crashed the worker (SIGSEGV in the signal delivery) with a request in flight. With one ``Core`` for the
    process the plugin stays loaded (and is loaded once). Test: test_engines.py, the SIGTERM after a dropped engine.
    """
    return import_openvino().Core()


def openvino_available() -> bool:
    try:
        import_openvino()
    except ImportError:
        return False
    return "avx2" in cpu_flags() or not cpu_flags()


def int8_sibling(path: Path) -> Path | None:
    """``NAME-int8.onnx`` beside ``NAME.onnx``: the calibrated int8 export of the same model."""
    sibling = path.with_name(f"{path.stem}-int8{path.suffix}")
    return sibling if sibling.is_file() and sibling != path else None


PRECISION_OF_FILE = {"float32": "fp32", "int8": "int8", "float16": "fp16"}


def candidates(path: Path, metadata: ModelMetadata) -> list[Candidate]:
    """Every way this machine can run the model at ``path`` (whose metadata is ``metadata``), default first."""
    own = PRECISION_OF_FILE.get(metadata.precision, "fp32")
    found = [Candidate("onnxruntime", own, path)]
    if gpu_present():
        found += [Candidate("onnxruntime", own, path, "CUDA")]
        if own == "fp32":
            found.append(Candidate("onnxruntime", "fp16", path, "TensorRT"))
    int8 = int8_sibling(path) if own == "fp32" else None
    if int8 is not None:
        found.append(Candidate("onnxruntime", "int8", int8))
    if openvino_available() and own in ("fp32", "int8"):
        found.append(Candidate("openvino", own, path))
        if own == "fp32" and native_bf16():
            found.append(Candidate("openvino", "bf16", path))
        if int8 is not None:
            found.append(Candidate("openvino", "int8", int8))
    return found


class _Loader:
    """Loads candidates, keeping the first (onnxruntime on the file as given, CPU) that reading the metadata made."""

    def __init__(self, path: Path, providers: Sequence[str] | None, threads: int | None, trt_cache: Path | None):
        self.providers, self.threads, self.trt_cache = providers, threads, trt_cache
        probe = Candidate("onnxruntime", "fp32", path, "the requested providers" if providers else "CPU")
        first = OnnxRuntimeEngine(probe, providers or ["CPUExecutionProvider"], threads, trt_cache)
        first.candidate = Candidate("onnxruntime", PRECISION_OF_FILE.get(first.metadata.precision, "fp32"), path,
                                    probe.device)  # fmt: skip
        self.metadata = first.metadata
        self.loaded: dict[Candidate, Engine] = {first.candidate: first}

    def __call__(self, candidate: Candidate) -> Engine:
        if candidate not in self.loaded:
            self.loaded[candidate] = self._load(candidate)
        return self.loaded[candidate]

    def _load(self, candidate: Candidate) -> Engine:
        if candidate.engine == "openvino":
            return OpenVinoEngine(candidate, self.metadata, self.threads)
        providers = {"CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "TensorRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                     "CPU": ["CPUExecutionProvider"]}.get(candidate.device, self.providers)  # fmt: skip
        return OnnxRuntimeEngine(candidate, providers, self.threads, self.trt_cache)

    def keep_only(self, engine: Engine) -> None:
        self.loaded = {engine.candidate: engine}


def _time(engine: Engine, frame: np.ndarray, runs: int = 5) -> float:
    """Median seconds per frame after two warm-up runs (labels only, as a /segment request)."""
    for _ in range(2):
        engine.run(["labels"], frame)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.run(["labels"], frame)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def open_engine(path: str | os.PathLike[str], *, engine: str = "auto", precision: str = "auto",
                providers: Sequence[str] | None = None, threads: int | None = None, trt_cache: Path | None = None,
                cache: Path | None = None) -> tuple[Engine, Choice]:  # fmt: skip
    """The fastest candidate for the model at ``path`` among those ``engine``/``precision`` allow (module docs).

    Explicit onnxruntime ``providers`` mean onnxruntime on the file as given."""
    if engine not in ("auto", *ENGINES):
        raise EngineError(f"unknown engine {engine!r}; choose auto, {', '.join(ENGINES)}")
    if precision not in ("auto", *PRECISIONS):
        raise EngineError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    load = _Loader(Path(path), providers, threads, trt_cache)
    offered = list(load.loaded) if providers else candidates(Path(path), load.metadata)
    allowed = [c for c in offered if engine in ("auto", c.engine) and precision in ("auto", c.precision)]
    if not allowed:
        available = ", ".join(c.label for c in offered)
        raise EngineError(f"no engine runs {Path(path).name} as {engine}/{precision} here; available: {available}")
    if len(allowed) == 1:
        forced = "forced" if engine != "auto" or precision != "auto" or providers else "the only candidate"
        choice = Choice(allowed[0], forced)
    else:
        key = _cache_key(allowed, threads)
        remembered = _remembered(cache, key, allowed)
        if remembered is None or not _runs_tiny_images(load(remembered.candidate)):
            return _calibrate(allowed, load, cache, key)  # measuring warms every candidate
        choice = remembered
    chosen = load(choice.candidate)
    load.keep_only(chosen)
    chosen.run(["labels"], _frame())  # warm: the first request pays no one-time set-up
    return chosen, choice


def probe(engine: Engine) -> None:
    """Run a tiny image. OpenVINO's fp32/bf16 compilations of files exported before segserve cropped with a Slice
    refuse inputs whose scaled size is under 32 pixels (measured: 17x23 and 40x50 on the shipped model at scale
    0.75), so a candidate that fails here is no choice for a service that takes any size."""
    try:
        engine.run(["labels"], np.zeros((1, 17, 23, 3), np.uint8))
    except Exception as error:
        first = str(error).strip().splitlines()
        raise EngineError(f"cannot run a 17x23 image ({first[-1][:160] if first else type(error).__name__})") from error


def _runs_tiny_images(engine: Engine) -> bool:
    try:
        probe(engine)
    except Exception:
        return False
    return True


def _frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(1, *CALIBRATION_SIZE, 3), dtype=np.uint8)


def _calibrate(allowed: list[Candidate], load: _Loader, cache: Path | None, key: str) -> tuple[Engine, Choice]:
    frame = _frame()
    timings: dict[str, float] = {}
    best: tuple[float, Engine] | None = None
    started = time.perf_counter()
    for candidate in allowed:
        try:
            loaded = load(candidate)
            probe(loaded)
            seconds = _time(loaded, frame)
        except Exception as error:  # a candidate that cannot load or run here is not a choice
            log.warning("engine candidate %s failed: %s", candidate.label, str(error).splitlines()[0][:200])
            continue
        timings[candidate.label] = round(1000 * seconds, 2)
        if best is None or seconds < best[0]:
            best = (seconds, loaded)
        load.keep_only(best[1])  # one engine's memory at a time besides the one being measured
    if best is None:
        raise EngineError("no engine candidate could run the model: " + ", ".join(c.label for c in allowed))
    spent = time.perf_counter() - started
    reason = (f"fastest of {len(timings)} candidates on a {CALIBRATION_SIZE[0]}x{CALIBRATION_SIZE[1]} frame, "
              f"measured at start-up in {spent:.1f} s")  # fmt: skip
    choice = Choice(best[1].candidate, reason, timings)
    _remember(cache, key, choice)
    log.info("engine: %s (%s)", choice.candidate.label, timings)
    return best[1], choice


def _cache_key(allowed: list[Candidate], threads: int | None) -> str:
    import onnxruntime

    parts = [cpu_model(), ",".join(sorted(cpu_flags())), str(os.cpu_count()), str(threads), onnxruntime.__version__]
    if any(c.engine == "openvino" for c in allowed):
        parts.append(import_openvino().__version__)
    for candidate in allowed:
        stat = candidate.path.stat()
        parts.append(f"{candidate.label}|{candidate.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _remembered(cache: Path | None, key: str, allowed: list[Candidate]) -> Choice | None:
    if cache is None:
        return None
    try:
        entry = json.loads(cache.read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    for candidate in allowed:
        if candidate.label == entry.get("label") and str(candidate.path) == entry.get("path"):
            return Choice(candidate, f"cached: {entry.get('reason', '')}", entry.get("timings_ms", {}))
    return None


def _remember(cache: Path | None, key: str, choice: Choice) -> None:
    if cache is None:
        return
    from segserve.files import write_atomic

    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known[key] = {"label": choice.candidate.label, "path": str(choice.candidate.path), "reason": choice.reason,
                  "timings_ms": choice.timings_ms}  # fmt: skip
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, (json.dumps(known, indent=2) + "\n").encode())
    except OSError as error:  # a read-only home (a hardened container) only costs the next start a calibration
        log.warning("engine choice not cached (%s)", error)
