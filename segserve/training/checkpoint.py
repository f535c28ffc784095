"""Checkpoints that lose nothing: written atomically, loadable with ``weights_only=True``, complete for resume.

A checkpoint is a plain dict of tensors, numbers, strings and lists:

``format``       ``"segserve-checkpoint/1"``
``model_config`` what rebuilds the model: backbone, variant, classes, palette, mean/std, input scale
``model``        the SegmentationPipeline's state_dict
``optimizer``, ``scheduler``, ``epoch`` (epochs completed), ``batch`` (batches done in the current epoch),
``step`` (optimizer steps), ``rng`` (torch, CUDA, numpy and Python generator states), ``history`` (per-epoch
records), ``best_miou``, ``train_config``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segserve.models.fcn import build_fcn
from segserve.models.pipeline import SegmentationPipeline

FORMAT = "segserve-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a usable segserve checkpoint."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (no code from the file runs) or raise a CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with code, not a torch file: all are "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a segserve checkpoint (format {found!r}, expected {FORMAT!r})")
    return payload


def build_pipeline(config: dict[str, Any]) -> SegmentationPipeline:
    """A fresh (untrained) pipeline for ``model_config``."""
    fcn = build_fcn(
        config["backbone"],
        config["variant"],
        len(config["classes"]),
        freeze_upsampling=config.get("freeze_upsampling", False),
    )
    return SegmentationPipeline(fcn, config["mean"], config["std"], config["input_scale"])


def pipeline_from_checkpoint(payload: dict[str, Any]) -> SegmentationPipeline:
    """The trained pipeline a checkpoint holds, in eval mode."""
    pipeline = build_pipeline(payload["model_config"])
    pipeline.load_state_dict(payload["model"])
    return pipeline.eval()


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, in types ``weights_only`` loading accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
