"""Opening an exported model: provider choice, the onnxruntime session, and its segserve metadata.

Providers: TensorRT, then CUDA, then CPU, keeping those this onnxruntime build offers and, for the GPU ones,
only where an NVIDIA device is present (onnxruntime-gpu lists CUDA even on a machine without a GPU and then logs
loud errors while falling back). Override with the ``providers`` argument (the faces fill it from
``SEGSERVE_PROVIDERS``, e.g. ``CPUExecutionProvider`` or ``CUDAExecutionProvider,CPUExecutionProvider``).
What actually runs is ``session.get_providers()``, reported as :attr:`LoadedModel.providers`.

GPU hosts: the CUDA and cuDNN libraries of the ``nvidia-*`` wheels (``onnxruntime-gpu[cuda,cudnn]``, what the
container installs) live in site-packages, off the dynamic loader's path, so they are preloaded before a GPU session
opens (without that onnxruntime logs an error and quietly runs on the CPU). TensorRT is offered only where its
library loads (onnxruntime-gpu lists the provider regardless; TensorRT itself is a separate install). Provider
settings keep the first request of a new image size short: TensorRT engines and timings are cached on disk
(``trt_cache``, from ``SEGSERVE_TRT_CACHE``), and cuDNN picks convolution algorithms heuristically instead of
benchmarking every candidate for every new shape.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from segserve.hardware import gpu_present
from segserve.modelcard import ModelFileError, ModelMetadata, read_stamp
from segserve.settings import Settings

log = logging.getLogger("segserve.runtime")

_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


@functools.cache
def prepare_gpu_libraries() -> None:
    """Load CUDA and cuDNN from the ``nvidia-*`` wheels (then the loader's path) so the GPU providers find them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21: the libraries must be on the loader's path
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # it reports failures with print()
        try:
            preload(directory="")
        except Exception as error:  # a broken CUDA install must not stop a CPU fallback
            log.warning("preloading CUDA libraries failed: %s", error)
    for line in printed.getvalue().splitlines():
        if line.strip():
            log.warning("%s", line.strip())


@functools.cache
def tensorrt_present() -> bool:
    """Whether TensorRT's runtime library loads: from the ``tensorrt`` wheels if installed, else the loader's path."""
    candidates = []
    spec = importlib.util.find_spec("tensorrt_libs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("libnvinfer.so.*", "libnvinfer_plugin.so.*"):
            candidates += sorted(str(path) for path in Path(folder).glob(pattern))
    loaded = False
    for library in [*candidates, "libnvinfer.so.10"]:
        with contextlib.suppress(OSError):
            ctypes.CDLL(library)
            loaded = loaded or "libnvinfer.so" in library
    return loaded


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask onnxruntime for, best first (see module docs)."""
    available = ort.get_available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not available here (available: {available})")
        if _GPU & set(requested):
            prepare_gpu_libraries()
        return list(requested)
    if not gpu_present():
        return [p for p in _PREFERENCE if p in available and p not in _GPU]
    prepare_gpu_libraries()
    wanted = [p for p in _PREFERENCE if p in available]
    if "TensorrtExecutionProvider" in wanted and not tensorrt_present():
        wanted.remove("TensorrtExecutionProvider")
    return wanted


def provider_settings(providers: Sequence[str], cache: Path | None = None,
                      trt_fp16: bool = False) -> list[str | tuple[str, dict[str, str]]]:  # fmt: skip
    """``providers`` with the settings segserve runs them with (see module docs), as onnxruntime takes them."""
    entries: list[str | tuple[str, dict[str, str]]] = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            folder = cache or Settings.from_env().trt_cache
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                log.warning("no TensorRT engine cache (%s): every new shape builds its engine again", error)
                entries.append(provider)
                continue
            cached = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                      "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder),
                      "trt_fp16_enable": "True" if trt_fp16 else "False"}  # fmt: skip
            entries.append((provider, cached))
        elif provider == "CUDAExecutionProvider":
            entries.append((provider, {"cudnn_conv_algo_search": "HEURISTIC"}))
        else:
            entries.append(provider)
    return entries


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Settings for a model whose input size changes from call to call."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False  # memory patterns only pay off for a fixed input shape
    # Idle pool threads sleep instead of spinning: alone it costs nothing (64.7 vs 65.1 ms at 512x512), but spinning
    # threads steal the cores from image decoding/encoding threads and from any other session (1.6x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


@dataclass
class LoadedModel:
    """An onnxruntime session and the metadata of the file it was made from."""

    path: Path
    session: ort.InferenceSession
    metadata: ModelMetadata

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


def load_model(
    path: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    options: ort.SessionOptions | None = None,
    trt_cache: Path | None = None,
    trt_fp16: bool = False,
) -> LoadedModel:
    """Open an exported model; a missing, damaged, non-ONNX or non-segserve file raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file does not exist")
    chosen = choose_providers(providers)
    try:
        entries = provider_settings(chosen, trt_cache, trt_fp16)
        session = ort.InferenceSession(str(path), sess_options=options, providers=entries)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Protobuf parsing failed" in reason or "INVALID_PROTOBUF" in reason:
            reason = "not an ONNX model, or a truncated one (protobuf parsing failed)"
        raise ModelFileError(f"{path}: cannot load: {reason}") from None
    metadata = read_stamp(session.get_modelmeta().custom_metadata_map, str(path))
    log.info("loaded %s (%s %s) on %s", path, metadata.backbone, metadata.variant, session.get_providers())
    return LoadedModel(path, session, metadata)
