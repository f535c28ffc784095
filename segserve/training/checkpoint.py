"""Checkpoints that lose nothing: typed, written atomically, loadable with ``weights_only=True``, complete for resume.

On disk a checkpoint is a plain dict of tensors, numbers, strings and lists (``torch.load(weights_only=True)``
runs no code from the file); in memory it is a :class:`Checkpoint`:

``format``       ``"segserve-checkpoint/1"``
``model_config`` what rebuilds the model (:class:`ModelConfig`): backbone, variant, classes, palette, mean/std,
                 input scale
``model``        the SegmentationPipeline's state_dict (the weights being trained)
``ema``          with ``--ema``: the moving average of those weights, which the run validated; what exports use
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``batch`` (batches done in the current
epoch), ``step`` (optimizer steps), ``rng`` (torch, CUDA, numpy and Python generator states), ``history``
(per-epoch records), ``best_miou``, ``train_config``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segserve
from segserve.datasets import IGNORE
from segserve.files import publish
from segserve.models.fcn import build_fcn
from segserve.models.pipeline import SegmentationPipeline

FORMAT = "segserve-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a usable segserve checkpoint."""


@dataclass
class ModelConfig:
    """What rebuilds a trained model, and what its exported card says about it."""

    backbone: str
    variant: str
    classes: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    input_scale: float = 1.0
    ignore_index: int = IGNORE
    freeze_upsampling: bool = False
    training_data: str | None = None
    validation: dict[str, Any] | None = None
    image_size: list[int] | None = None  # median (H, W) of the training frames: the scale objects were learned at

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    def pipeline(self) -> SegmentationPipeline:
        """A fresh (untrained) pipeline of this configuration."""
        fcn = build_fcn(self.backbone, self.variant, len(self.classes), freeze_upsampling=self.freeze_upsampling)
        return SegmentationPipeline(fcn, self.mean, self.std, self.input_scale)


@dataclass
class Checkpoint:
    """A model's weights and configuration, and for a training run everything that resumes it exactly."""

    model_config: ModelConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    epoch: int = 0
    batch: int = 0
    step: int = 0
    rng: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_miou: float = -1.0
    train_config: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    segserve_version: str = segserve.__version__

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically and durably: a crash leaves the old file or the new one, never half of one."""
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["model_config"] = dataclasses.asdict(self.model_config)
        with publish(path, durable=True) as temporary:
            torch.save(payload, temporary)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Checkpoint:
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
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {key: value for key, value in payload.items() if key in known}
            return cls(**{**values, "model_config": ModelConfig.from_dict(payload["model_config"])})
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{path} is an incomplete segserve checkpoint ({error})") from error

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to use: the moving average when the run kept one (it is what was validated)."""
        return self.ema if self.ema is not None else self.model

    def pipeline(self) -> SegmentationPipeline:
        """The trained pipeline this checkpoint holds, in eval mode."""
        pipeline = self.model_config.pipeline()
        pipeline.load_state_dict(self.weights)
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
