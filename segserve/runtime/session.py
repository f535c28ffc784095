"""Opening an exported model: provider choice, the onnxruntime session, and its segserve metadata.

Providers: TensorRT, then CUDA, then CPU, keeping those this onnxruntime build offers and, for the GPU ones,
only where an NVIDIA device is present (onnxruntime-gpu lists CUDA even on a machine without a GPU and then logs
loud errors while falling back). Override with the ``providers`` argument or ``SEGSERVE_PROVIDERS``
(comma-separated, e.g. ``CPUExecutionProvider`` or ``CUDAExecutionProvider,CPUExecutionProvider``).
What actually runs is ``session.get_providers()``, reported as :attr:`LoadedModel.providers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from segserve.modelcard import METADATA_KEY, ModelFileError, ModelMetadata

log = logging.getLogger("segserve.runtime")

PROVIDERS_ENV = "SEGSERVE_PROVIDERS"
_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


def comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,a"`` -> ``("a", "b")``: the one parser for comma-list options and environment variables."""
    return tuple(dict.fromkeys(item.strip() for item in (text or "").split(",") if item.strip()))


def gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask onnxruntime for, best first (see module docs)."""
    available = ort.get_available_providers()
    if requested is None and os.environ.get(PROVIDERS_ENV):
        requested = list(comma_list(os.environ[PROVIDERS_ENV]))
    if requested is not None:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not available here (available: {available})")
        return list(requested)
    gpu = gpu_present()
    return [p for p in _PREFERENCE if p in available and (gpu or p not in _GPU)]


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
) -> LoadedModel:
    """Open an exported model; a missing, damaged, non-ONNX or non-segserve file raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file does not exist")
    chosen = choose_providers(providers)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Protobuf parsing failed" in reason or "INVALID_PROTOBUF" in reason:
            reason = "not an ONNX model, or a truncated one (protobuf parsing failed)"
        raise ModelFileError(f"{path}: cannot load: {reason}") from None
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ModelFileError(f"{path}: no segserve metadata (export the model with `segserve export`)")
    metadata = ModelMetadata.from_json(props[METADATA_KEY], source=str(path))
    log.info("loaded %s (%s %s) on %s", path, metadata.backbone, metadata.variant, session.get_providers())
    return LoadedModel(path, session, metadata)
