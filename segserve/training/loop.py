"""The training loop: one call from a labelled folder to a trained, measured FCN in RUN_DIR.

RUN_DIR holds ``last.pt`` (every epoch, and every K steps on request), ``best.pt`` (best validation mIoU),
``metrics.csv``, ``curves.png``, ``confusion.png`` and ``config.json``. ``resume=True`` continues from
``last.pt`` exactly: the data order and augmentation are functions of (seed, epoch, index), and the model's
own randomness (dropout) comes from generators whose states the checkpoint holds.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
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
from segserve.training.checkpoint import (
    FORMAT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from segserve.training.evaluate import evaluate, pairs_of
from segserve.training.records import plot_confusion, plot_curves, write_metrics_csv


class TrainingError(ValueError):
    """A training request that cannot go ahead as asked (the message says why and what to do)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint and in config.json."""

    data: str
    out: str
    layout: str | None = None
    backbone: str = "resnet18"
    variant: str = "8s"
    weights: str | None = None
    init: str | None = None
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adamw"
    schedule: str = "poly"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    class_weights: str = "none"
    input_scale: float = 1.0
    crop: tuple[int, int] | None = None
    scale_range: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    jitter: float = 0.2
    freeze_upsampling: bool = False
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 0
    val_every: int = 1
    progress: bool = True
    resume: bool = False


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


def train(config: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns the final history row and the best validation metrics."""
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    resume_from: dict[str, Any] | None = None
    if config.resume:
        if not last_path.exists():
            raise TrainingError(f"--resume: {last_path} does not exist; start without --resume")
        resume_from = load_checkpoint(last_path)
        _check_resumable(resume_from, config)
    elif last_path.exists():
        raise TrainingError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    train_set = open_collection(config.data, "train", config.layout)
    val_set = open_collection(config.data, "val", train_set.layout)
    if val_set.classes != train_set.classes:
        raise TrainingError("the train and val splits declare different classes")
    classes = train_set.classes
    train_pairs = _load_pairs(train_set, config.progress)
    statistics = check_pairs(train_set, train_pairs)
    val_pairs = _load_pairs(val_set, config.progress)
    check_pairs(val_set, val_pairs)
    if len(train_pairs) < config.batch_size:
        raise TrainingError(f"{len(train_pairs)} training images are fewer than one batch of {config.batch_size}")

    init_from = None if resume_from is not None or config.init is None else _load_init(config, classes.names)
    if resume_from is not None:
        model_config = resume_from["model_config"]
    else:
        if init_from is not None:  # the weights were trained on these statistics; keep them
            mean, std = init_from["model_config"]["mean"], init_from["model_config"]["std"]
        else:
            mean, std = _normalisation(config, train_pairs)
        model_config = {
            "backbone": config.backbone,
            "variant": config.variant,
            "classes": list(classes.names),
            "palette": [list(c) for c in classes.palette],
            "ignore_index": IGNORE,
            "mean": mean,
            "std": std,
            "input_scale": config.input_scale,
            "freeze_upsampling": config.freeze_upsampling,
            "training_data": f"{Path(config.data).name} ({train_set.layout}, {len(train_pairs)} train images)",
        }
    crop = config.crop or _default_crop(train_pairs, config.input_scale)

    torch.manual_seed(config.seed)
    weights: WeightsArg = None if resume_from is not None or init_from is not None else config.weights
    fcn = build_fcn(
        config.backbone, config.variant, len(classes.names), weights, freeze_upsampling=config.freeze_upsampling
    )
    pipeline = SegmentationPipeline(fcn, model_config["mean"], model_config["std"], config.input_scale)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if init_from is not None:
        pipeline.load_state_dict(init_from["model"])
    pipeline.to(device)
    if device.type == "cuda":
        pipeline.to(memory_format=torch.channels_last)

    per_epoch = len(train_pairs) // config.batch_size
    total_steps = per_epoch * config.epochs
    optimizer = _optimizer(config, [p for p in pipeline.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.schedule, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    class_weights = _class_weights(config.class_weights, statistics)
    criterion = torch.nn.CrossEntropyLoss(
        weight=None if class_weights is None else class_weights.to(device), ignore_index=IGNORE
    )

    epoch, batch_start, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best_miou = -1.0
    if resume_from is not None:
        pipeline.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        scaler.load_state_dict(resume_from["scaler"])
        epoch, batch_start, step = resume_from["epoch"], resume_from["batch"], resume_from["step"]
        history = list(resume_from["history"])
        best_miou = float(resume_from["best_miou"])
        set_rng_state(resume_from["rng"])
    _write_config(out / "config.json", config, argv, model_config, resumed=resume_from is not None)

    augment_config = AugmentConfig(config.input_scale, config.scale_range, crop, config.flip, config.jitter)
    dataset = _Pairs(train_pairs, augment_config, pipeline.mean.cpu().flatten(), config.seed)

    def checkpoint(path: Path, epoch_done: int, batch_done: int) -> None:
        save_checkpoint(
            path,
            {
                "format": FORMAT,
                "segserve_version": segserve.__version__,
                "model_config": model_config,
                "model": {k: v.detach().cpu() for k, v in pipeline.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch_done,
                "batch": batch_done,
                "step": step,
                "rng": rng_state(),
                "history": history,
                "best_miou": best_miou,
                "train_config": _jsonable(asdict(config)),
            },
        )

    final: dict[str, Any] = {}
    while epoch < config.epochs:
        pipeline.train()
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG when created,
        # which a resumed run does mid-epoch, shifting every later dropout mask.
        batches = _EpochBatches(len(train_pairs), config.batch_size, config.seed, epoch, batch_start)
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed),
        )
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not config.progress,
            initial=batch_start,
            total=per_epoch,
            leave=False,
        )
        for batch_index, (images, masks) in enumerate(bar, start=batch_start):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                logits = pipeline.fcn(pipeline.normalise(images))
                loss = criterion(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", img_s=f"{len(losses) * config.batch_size / elapsed:.1f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and batch_index + 1 < per_epoch:
                checkpoint(last_path, epoch, batch_index + 1)
        bar.close()
        seconds = time.perf_counter() - started
        epoch += 1
        batch_start = 0
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": round(seconds, 2),
            "images_per_second": round(len(losses) * config.batch_size / seconds, 2) if seconds else None,
        }
        metrics: SegmentationMetrics | None = None
        if epoch % config.val_every == 0 or epoch == config.epochs:
            pipeline.eval()
            metrics, confusion = evaluate(
                pipeline_predictor(pipeline, device), val_set, val_pairs, progress=config.progress
            )
            row.update(
                {
                    k: getattr(metrics, k)
                    for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")
                }
            )
            model_config["validation"] = {"split": "val", "epoch": epoch, **metrics.to_dict()}
        history.append(row)
        if metrics is not None and metrics.mean_iou is not None and metrics.mean_iou > best_miou:
            best_miou = metrics.mean_iou
            checkpoint(best_path, epoch, 0)
            plot_confusion(
                out / "confusion.png",
                confusion,
                classes.names,
                f"validation, epoch {epoch}: mIoU {100 * best_miou:.1f}",
            )
        checkpoint(last_path, epoch, 0)
        write_metrics_csv(out / "metrics.csv", history)
        plot_curves(out / "curves.png", history)
        print(_epoch_line(row, config.epochs), flush=True)
        final = row
    if final.get("mean_iou") is not None and final["epoch"] == config.epochs and metrics is not None:
        print(format_metrics(metrics))
    return {"final": final, "best_miou": best_miou, "run_dir": str(out)}


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  {row['images_per_second']} img/s"
    if row.get("mean_iou") is not None:
        text += (
            f"  val pixel acc {100 * row['pixel_accuracy']:.2f}  mean acc {100 * row['mean_accuracy']:.2f}"
            f"  mIoU {100 * row['mean_iou']:.2f}  fwIoU {100 * row['frequency_weighted_iou']:.2f}"
        )
    return text


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


def _load_init(config: TrainConfig, classes: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint to fine-tune from: same backbone, variant and classes; optimizer and schedule start afresh."""
    assert config.init is not None
    if config.weights not in (None, "none"):
        raise TrainingError("--init and --weights both initialise the model; pass one of them")
    checkpoint = load_checkpoint(config.init)
    saved = checkpoint["model_config"]
    for key, wanted in (("backbone", config.backbone), ("variant", config.variant), ("classes", list(classes))):
        if (list(saved[key]) if key == "classes" else saved[key]) != wanted:
            raise TrainingError(f"--init {config.init}: it has {key}={saved[key]!r}, this run {wanted!r}")
    if bool(saved.get("freeze_upsampling")) != config.freeze_upsampling:
        raise TrainingError(f"--init {config.init}: its freeze_upsampling differs from this run's")
    return checkpoint


def _check_resumable(checkpoint: dict[str, Any], config: TrainConfig) -> None:
    saved = checkpoint["train_config"]
    for key in ("backbone", "variant", "batch_size", "seed", "input_scale", "optimizer", "schedule"):
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
    path: Path, config: TrainConfig, argv: list[str] | None, model_config: dict[str, Any], resumed: bool
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
            "model": model_config,
        }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
