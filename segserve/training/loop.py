"""The training loop: one call from a labelled folder to a trained, measured FCN in RUN_DIR.

RUN_DIR holds ``last.pt`` (every epoch, and every K steps on request), ``best.pt`` (best validation mIoU),
``metrics.csv``, ``curves.png``, ``confusion.png`` and ``config.json``. ``resume=True`` continues from
``last.pt`` exactly: the data order and augmentation are functions of (seed, epoch, index), and the model's
own randomness (dropout) comes from generators whose states the checkpoint holds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import segserve
from segserve.datasets import IGNORE, Collection, LabelStatistics, check_pairs, open_collection
from segserve.metrics import SegmentationMetrics, format_metrics
from segserve.models.backbones import WeightsArg
from segserve.models.fcn import build_fcn
from segserve.models.pipeline import IMAGENET_MEAN, IMAGENET_STD, SegmentationPipeline, pipeline_predictor
from segserve.training.augment import AugmentConfig, augment
from segserve.training.checkpoint import Checkpoint, ModelConfig, rng_state, set_rng_state
from segserve.training.config import TrainConfig
from segserve.training.evaluate import evaluate, pairs_of
from segserve.training.records import plot_confusion, plot_curves, write_metrics_csv


class TrainingError(ValueError):
    """A training request that cannot go ahead as asked (the message says why and what to do)."""


class _Pairs(Dataset):
    """Decoded training pairs, augmented on access; keys are (epoch, index)."""

    def __init__(
        self, pairs: list[tuple[np.ndarray, np.ndarray]], augment_config: AugmentConfig, mean: torch.Tensor, seed: int
    ) -> None:
        self.pairs, self.config, self.mean, self.seed = pairs, augment_config, mean, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image, mask = self.pairs[index]
        return augment(image, mask, self.mean, self.config, np.random.default_rng([self.seed, epoch, index]))


class _EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch from ``start`` on: a permutation seeded by (seed, epoch); the last partial
    batch is dropped (BatchNorm needs more than one sample, and equal batches keep resume exact)."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0) -> None:
        order = np.random.default_rng([seed, epoch, 1 << 20]).permutation(size)
        count = size // batch_size
        self.batches = [[(epoch, int(i)) for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(count)]
        self.batches = self.batches[start:]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _schedule(kind: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step."""
    if kind == "poly":
        return lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9
    if kind == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    raise TrainingError(f"unknown schedule {kind!r}; choose poly or cosine")


def _optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise TrainingError(f"unknown optimizer {config.optimizer!r}; choose sgd or adamw")


def _normalisation(config: TrainConfig, pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[float], list[float]]:
    """ImageNet statistics for ImageNet weights (the trunk expects them); the training set's own otherwise."""
    if isinstance(config.weights, str) and config.weights.lower() == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for image, _ in pairs:
        pixels = image.reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(axis=0)
        squares += (pixels**2).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _load_pairs(collection: Collection, progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    bar = tqdm(
        pairs_of(collection),
        total=len(collection.samples),
        desc=f"load {collection.split}",
        unit="img",
        disable=not progress,
        leave=False,
    )
    return list(bar)


@dataclass
class _Data:
    """The decoded, checked splits of a run; with a hold-out, ``choose_*`` is the held-out part of train."""

    train_set: Collection
    val_set: Collection
    train_pairs: list[tuple[np.ndarray, np.ndarray]]
    val_pairs: list[tuple[np.ndarray, np.ndarray]]
    statistics: LabelStatistics
    choose_set: Collection | None = None
    choose_pairs: list[tuple[np.ndarray, np.ndarray]] | None = None


def _load_data(config: TrainConfig) -> _Data:
    train_set = open_collection(config.data, "train", config.layout)
    val_set = open_collection(config.data, "val", train_set.layout)
    if val_set.classes != train_set.classes:
        raise TrainingError("the train and val splits declare different classes")
    train_pairs = _load_pairs(train_set, config.progress)
    check_pairs(train_set, train_pairs)
    choose_set = choose_pairs = None
    if config.holdout:
        train_set, choose_set, train_pairs, choose_pairs = _hold_out(train_set, train_pairs, config.holdout)
    statistics = check_pairs(train_set, train_pairs)  # class balance from what is trained on
    val_pairs = _load_pairs(val_set, config.progress)
    check_pairs(val_set, val_pairs)
    if len(train_pairs) < config.batch_size:
        raise TrainingError(f"{len(train_pairs)} training images are fewer than one batch of {config.batch_size}")
    return _Data(train_set, val_set, train_pairs, val_pairs, statistics, choose_set, choose_pairs)


def _hold_out(collection: Collection, pairs: list, prefix: str) -> tuple[Collection, Collection, list, list]:
    """(training part, held-out part) of the train split: the held-out frames' names start with ``prefix``."""
    held = [s.image.name.startswith(prefix) for s in collection.samples]
    if not any(held) or all(held):
        drives = sorted({s.image.name.split("_")[0] for s in collection.samples})
        raise TrainingError(f"--holdout {prefix!r} must match some but not all training frames; prefixes: {drives}")
    parts = []
    for keep in (False, True):
        samples = [s for s, h in zip(collection.samples, held, strict=True) if h == keep]
        split = f"train[{prefix}]" if keep else f"train[not {prefix}]"
        parts.append((dataclasses.replace(collection, split=split, samples=samples),
                      [p for p, h in zip(pairs, held, strict=True) if h == keep]))  # fmt: skip
    (train, train_pairs), (chosen, chosen_pairs) = parts
    return train, chosen, train_pairs, chosen_pairs


def _previous_run(config: TrainConfig) -> Checkpoint | None:
    """The checkpoint to resume from (``--resume``), after refusing to overwrite a run that was not asked to go on."""
    out = Path(config.out)
    last = out / "last.pt"
    if not config.resume:
        if last.exists():
            raise TrainingError(
                f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
            )
        return None
    if not last.exists():
        raise TrainingError(f"--resume: {last} does not exist; start without --resume")
    checkpoint = Checkpoint.load(last)
    _check_resumable(checkpoint, config)
    return checkpoint


def _new_model_config(config: TrainConfig, data: _Data, init_from: Checkpoint | None) -> ModelConfig:
    classes = data.train_set.classes
    if init_from is not None:  # the weights were trained on these statistics; keep them
        mean, std = init_from.model_config.mean, init_from.model_config.std
    else:
        mean, std = _normalisation(config, data.train_pairs)
    return ModelConfig(
        backbone=config.backbone, variant=config.variant, classes=list(classes.names),
        palette=[list(c) for c in classes.palette], ignore_index=IGNORE, mean=mean, std=std,
        input_scale=config.input_scale, freeze_upsampling=config.freeze_upsampling,
        training_data=f"{Path(config.data).name} ({data.train_set.layout}, {len(data.train_pairs)} train images)",
        image_size=[int(np.median([image.shape[axis] for image, _ in data.train_pairs])) for axis in (0, 1)],
    )  # fmt: skip


@dataclass
class _Trainer:
    """The model, its optimisation and the run's progress: what a checkpoint saves and restores."""

    config: TrainConfig
    model_config: ModelConfig
    pipeline: SegmentationPipeline
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    per_epoch: int
    precision: str = "fp32"
    epoch: int = 0
    batch_start: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_miou: float = -1.0
    average: WeightAverage | None = None

    @classmethod
    def build(cls, config: TrainConfig, model_config: ModelConfig, data: _Data,
              start: Checkpoint | None) -> _Trainer:  # fmt: skip
        """A new model (``start``: with that checkpoint's weights) and its optimizer, schedule and loss."""
        torch.manual_seed(config.seed)
        weights: WeightsArg = None if start is not None else config.weights
        fcn = build_fcn(config.backbone, config.variant, len(model_config.classes), weights,
                        freeze_upsampling=config.freeze_upsampling)  # fmt: skip
        pipeline = SegmentationPipeline(fcn, model_config.mean, model_config.std, config.input_scale)
        if start is not None:
            pipeline.load_state_dict(start.model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(config.precision, device)
        pipeline.to(device)
        if device.type == "cuda" or precision == "bf16":
            pipeline.to(memory_format=torch.channels_last)
        per_epoch = len(data.train_pairs) // config.batch_size
        optimizer = _optimizer(config, [p for p in pipeline.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.schedule, per_epoch * config.epochs))
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        class_weights = _class_weights(config.class_weights, data.statistics)
        criterion = torch.nn.CrossEntropyLoss(
            weight=None if class_weights is None else class_weights.to(device), ignore_index=IGNORE
        )
        average = WeightAverage(pipeline, config.ema) if config.ema > 0 else None
        return cls(config, model_config, pipeline, device, optimizer, scheduler, scaler, criterion, per_epoch,
                   precision, average=average)  # fmt: skip

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue exactly where ``checkpoint`` stopped (weights are already loaded by :meth:`build`)."""
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.epoch, self.batch_start, self.step = checkpoint.epoch, checkpoint.batch, checkpoint.step
        self.history = list(checkpoint.history)
        self.best_miou = float(checkpoint.best_miou)
        if self.average is not None:
            if checkpoint.ema is None:
                raise TrainingError("--resume: this run keeps no weight average (--ema); resume without --ema")
            self.average.model.load_state_dict(checkpoint.ema)
        set_rng_state(checkpoint.rng)

    def save(self, path: Path, epoch_done: int, batch_done: int) -> None:
        Checkpoint(
            model_config=self.model_config,
            model={k: v.detach().cpu() for k, v in self.pipeline.state_dict().items()},
            ema=None if self.average is None else {
                k: v.detach().cpu() for k, v in self.average.model.state_dict().items()
            },
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch_done, batch=batch_done, step=self.step, rng=rng_state(),
            history=self.history, best_miou=self.best_miou, train_config=_jsonable(asdict(self.config)),
        ).save(path)  # fmt: skip

    def train_epoch(self, dataset: Dataset, last_path: Path) -> tuple[list[float], float]:
        """One epoch from ``batch_start`` on: (losses, seconds)."""
        config = self.config
        self.pipeline.train()
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG when created,
        # which a resumed run does mid-epoch, shifting every later dropout mask.
        batches = _EpochBatches(len(dataset), config.batch_size, config.seed, self.epoch, self.batch_start)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.workers,
                            generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{config.epochs}", unit="batch", disable=not config.progress,
                   initial=self.batch_start, total=self.per_epoch, leave=False)  # fmt: skip
        for batch_index, (images, masks) in enumerate(bar, start=self.batch_start):
            losses.append(self._step(images, masks))
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", img_s=f"{len(losses) * config.batch_size / elapsed:.1f}")
            every = config.checkpoint_every
            if every and self.step % every == 0 and batch_index + 1 < self.per_epoch:
                self.save(last_path, self.epoch, batch_index + 1)
        bar.close()
        return losses, time.perf_counter() - started

    def _step(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        if self.device.type == "cuda" or self.precision == "bf16":
            images = images.contiguous(memory_format=torch.channels_last)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=low or torch.float32, enabled=low is not None):
            logits = self.pipeline.fcn(self.pipeline.normalise(images))
            loss = self.criterion(logits.float(), masks)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if self.average is not None:
            self.average.update(self.pipeline, self.step)
        return loss.item()

    def validate(self, data: _Data, row: dict[str, Any]) -> tuple[SegmentationMetrics, np.ndarray]:
        """Metrics on the split that chooses best.pt (the held-out drive, else val), added to ``row`` and to the
        model's card; with a hold-out, val's mIoU is measured and reported beside it."""
        measured = self.pipeline if self.average is None else self.average.model
        measured.eval()
        predictor = pipeline_predictor(measured, self.device)
        progress = self.config.progress
        val, confusion = evaluate(predictor, data.val_set, data.val_pairs, progress=progress)
        metrics = val
        if data.choose_set is not None:
            metrics, confusion = evaluate(predictor, data.choose_set, data.choose_pairs, progress=progress)
            row["val_mean_iou"] = val.mean_iou
        for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
            row[key] = getattr(metrics, key)
        split = data.choose_set.split if data.choose_set is not None else "val"
        self.model_config.validation = {"split": split, "epoch": self.epoch, **metrics.to_dict()}
        if data.choose_set is not None:
            self.model_config.validation["val"] = val.to_dict()
        return metrics, confusion


def train(config: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns the final history row and the best validation metrics."""
    out = Path(config.out)
    resume_from = _previous_run(config)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(config)
    init_from = None if resume_from is not None or config.init is None else _load_init(config, data)
    fresh = resume_from is None
    model_config = _new_model_config(config, data, init_from) if fresh else resume_from.model_config
    trainer = _Trainer.build(config, model_config, data, resume_from or init_from)
    print(f"precision: {trainer.precision} ({config.precision}; {trainer.device.type})", flush=True)
    if resume_from is not None:
        trainer.restore(resume_from)
    _write_config(out / "config.json", config, argv, asdict(model_config), resume_from is not None, trainer.precision)
    crop = config.crop or _default_crop(data.train_pairs, config.input_scale)
    augment_config = AugmentConfig(config.input_scale, config.scale_range, crop, config.flip, config.jitter,
                                   config.photometric)  # fmt: skip
    dataset = _Pairs(data.train_pairs, augment_config, trainer.pipeline.mean.cpu().flatten(), config.seed)
    final: dict[str, Any] = {}
    metrics: SegmentationMetrics | None = None
    while trainer.epoch < config.epochs:
        final, metrics = _run_epoch(trainer, data, dataset, out)
    if final.get("mean_iou") is not None and final["epoch"] == config.epochs and metrics is not None:
        print(format_metrics(metrics))
    return {"final": final, "best_miou": trainer.best_miou, "run_dir": str(out)}


def _run_epoch(trainer: _Trainer, data: _Data, dataset: Dataset,
               out: Path) -> tuple[dict[str, Any], SegmentationMetrics | None]:  # fmt: skip
    """Train one epoch, validate when due, and write the checkpoints and records."""
    config = trainer.config
    losses, seconds = trainer.train_epoch(dataset, out / "last.pt")
    trainer.epoch += 1
    trainer.batch_start = 0
    row: dict[str, Any] = {
        "epoch": trainer.epoch,
        "step": trainer.step,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "epoch_seconds": round(seconds, 2),
        "images_per_second": round(len(losses) * config.batch_size / seconds, 2) if seconds else None,
    }
    metrics: SegmentationMetrics | None = None
    if trainer.epoch % config.val_every == 0 or trainer.epoch == config.epochs:
        metrics, confusion = trainer.validate(data, row)
    trainer.history.append(row)
    if metrics is not None and metrics.mean_iou is not None and metrics.mean_iou > trainer.best_miou:
        trainer.best_miou = metrics.mean_iou
        trainer.save(out / "best.pt", trainer.epoch, 0)
        title = f"validation, epoch {trainer.epoch}: mIoU {100 * trainer.best_miou:.1f}"
        plot_confusion(out / "confusion.png", confusion, data.train_set.classes.names, title)
    trainer.save(out / "last.pt", trainer.epoch, 0)
    write_metrics_csv(out / "metrics.csv", trainer.history)
    plot_curves(out / "curves.png", trainer.history)
    print(_epoch_line(row, config.epochs), flush=True)
    return row, metrics


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics included): flatter
    minima than the last step's weights, which matters most when few images must stand for many roads.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so early averages are not dominated by the
    initial weights."""

    def __init__(self, pipeline: SegmentationPipeline, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"--ema {decay}: the decay must lie between 0 and 1 (e.g. 0.999)")
        self.decay = decay
        self.model = copy.deepcopy(pipeline)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, pipeline: SegmentationPipeline, step: int) -> None:
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        ours, theirs = self.model.state_dict(), pipeline.state_dict()
        floats = [key for key, value in ours.items() if value.is_floating_point()]
        torch._foreach_lerp_([ours[k] for k in floats], [theirs[k].detach() for k in floats], weight)
        for key, value in ours.items():
            if not value.is_floating_point():
                value.copy_(theirs[key])


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  {row['images_per_second']} img/s"
    if row.get("mean_iou") is not None:
        split = "held-out" if "val_mean_iou" in row else "val"
        text += (
            f"  {split} pixel acc {100 * row['pixel_accuracy']:.2f}  mean acc {100 * row['mean_accuracy']:.2f}"
            f"  mIoU {100 * row['mean_iou']:.2f}  fwIoU {100 * row['frequency_weighted_iou']:.2f}"
        )
        if "val_mean_iou" in row:
            text += f"  val mIoU {100 * row['val_mean_iou']:.2f}"
    return text


def resolve_precision(asked: str, device: torch.device) -> str:
    """What ``--precision`` means here: auto is fp16 AMP on CUDA, bf16 autocast on CPUs with native bf16."""
    from segserve.hardware import native_bf16

    if asked == "auto":
        return "fp16" if device.type == "cuda" else "bf16" if native_bf16() else "fp32"
    if asked == "fp16" and device.type != "cuda":
        raise TrainingError("--precision fp16 needs a CUDA GPU; use bf16 (CPUs with AMX or AVX512-BF16) or fp32")
    return asked


def _default_crop(pairs: list[tuple[np.ndarray, np.ndarray]], scale: float) -> tuple[int, int]:
    """The first image's size at the inference scale, rounded down to a multiple of 32 (at least 32)."""
    height, width = pairs[0][0].shape[:2]
    return (max(32, int(height * scale) // 32 * 32), max(32, int(width * scale) // 32 * 32))


def _class_weights(kind: str, statistics: LabelStatistics) -> torch.Tensor | None:
    if kind in ("none", None):
        return None
    if kind == "median-freq":
        return torch.tensor(statistics.median_frequency_weights(), dtype=torch.float32)
    if kind == "sqrt-median-freq":  # softer: rare classes gain recall without flooding false positives
        return torch.tensor(np.sqrt(statistics.median_frequency_weights()), dtype=torch.float32)
    raise TrainingError(f"unknown class weighting {kind!r}; choose none, median-freq or sqrt-median-freq")


def _load_init(config: TrainConfig, data: _Data) -> Checkpoint:
    """A checkpoint to fine-tune from: same backbone, variant and classes; optimizer and schedule start afresh."""
    assert config.init is not None
    if config.weights not in (None, "none"):
        raise TrainingError("--init and --weights both initialise the model; pass one of them")
    checkpoint = Checkpoint.load(config.init)
    saved = checkpoint.model_config
    classes = list(data.train_set.classes.names)
    for key, wanted in (("backbone", config.backbone), ("variant", config.variant), ("classes", classes)):
        found = getattr(saved, key)
        if (list(found) if key == "classes" else found) != wanted:
            raise TrainingError(f"--init {config.init}: it has {key}={found!r}, this run {wanted!r}")
    if bool(saved.freeze_upsampling) != config.freeze_upsampling:
        raise TrainingError(f"--init {config.init}: its freeze_upsampling differs from this run's")
    return dataclasses.replace(checkpoint, model=checkpoint.weights, ema=None)


def _check_resumable(checkpoint: Checkpoint, config: TrainConfig) -> None:
    saved = checkpoint.train_config
    for key in ("backbone", "variant", "batch_size", "seed", "input_scale", "optimizer", "schedule", "precision",
                "holdout", "ema"):  # fmt: skip
        if key in ("precision", "holdout", "ema") and key not in saved:  # runs from before these options
            continue
        if saved.get(key) != _jsonable(getattr(config, key)):
            raise TrainingError(
                f"--resume: the run was started with {key}={saved.get(key)!r}, not {getattr(config, key)!r}; "
                "resume with the original settings (config.json lists them)"
            )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_config(
    path: Path,
    config: TrainConfig,
    argv: list[str] | None,
    model_config: dict[str, Any],
    resumed: bool,
    precision: str,
) -> None:
    record: dict[str, Any] = json.loads(path.read_text()) if resumed and path.exists() else {}
    command = " ".join(["segserve", *(argv if argv is not None else sys.argv[1:])])
    if resumed:
        record.setdefault("resumed", []).append({"command": command, "at": _now()})
    else:
        record = {
            "command": command,
            "started": _now(),
            "segserve_version": segserve.__version__,
            "torch_version": torch.__version__,
            "config": _jsonable(asdict(config)),
            "precision": precision,
            "model": model_config,
        }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
