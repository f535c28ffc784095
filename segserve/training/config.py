"""What a training run depends on, declared once: the dataclass, its command-line options and their help.

Stored in every checkpoint and in the run's config.json. Torch-free, so ``segserve --help`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from segserve.options import input_size, number_pair, option, positive_int

LAYOUTS = ("camvid", "voc", "folder")


@dataclass
class TrainConfig:
    """Everything a run depends on."""

    data: str = option(help="dataset folder")
    out: str = option(help="run folder", metavar="RUN_DIR")
    layout: str | None = option(None, "dataset layout (default: detected)", choices=LAYOUTS)
    backbone: str = option("resnet18", "registered backbone (default: resnet18)")
    variant: str = option("8s", "FCN variant (default: 8s)", flag="--fcn", choices=("32s", "16s", "8s"))
    weights: str = option("none", "trunk initialisation: none, imagenet or a state_dict PATH")
    init: str | None = option(
        None, "fine-tune: start from this checkpoint's weights (fresh optimizer)", metavar="CHECKPOINT"
    )
    epochs: int = option(30, "training epochs (default: 30)", type=positive_int)
    batch_size: int = option(8, "images per optimizer step (default: 8)", type=positive_int)
    lr: float = option(1e-3, "peak learning rate (default: 1e-3)")
    optimizer: str = option("adamw", "optimizer (default: adamw)", choices=("sgd", "adamw"))
    schedule: str = option("poly", "learning-rate schedule (default: poly)", choices=("poly", "cosine"))
    weight_decay: float = option(1e-4, "weight decay (default: 1e-4)")
    momentum: float = option(0.9, "SGD momentum (default: 0.9)")
    class_weights: str = option(
        "none",
        "median-freq: SegNet's median-frequency class balancing; sqrt-median-freq: its square root",
        choices=("none", "median-freq", "sqrt-median-freq"),
    )
    input_scale: float = option(1.0, "resolution factor the model works at, applied again at inference (e.g. 0.5)")
    crop: tuple[int, int] | None = option(
        None, "training crop at network resolution (default: the scaled image, to a multiple of 32)",
        type=input_size, metavar="HxW",
    )  # fmt: skip
    scale_range: tuple[float, float] = option(
        (0.75, 1.5), "random scale factor range around --input-scale (default: 0.75,1.5)",
        type=number_pair, metavar="LOW,HIGH",
    )  # fmt: skip
    flip: bool = option(True, "no random horizontal flips", negate=True)
    jitter: float = option(0.2, "colour jitter strength, 0 to disable")
    photometric: str = option(
        "light", "light: --jitter only; strong: also white balance, gamma, blur and sensor noise (other cameras)",
        choices=("light", "strong"),
    )  # fmt: skip
    ema: float = option(
        0.0, "keep an exponential moving average of the weights with this decay per step (e.g. 0.999; 0 = off); "
        "validation, best.pt and exports use the average", metavar="DECAY",
    )  # fmt: skip
    freeze_upsampling: bool = option(False, "keep the bilinear deconvolutions fixed")
    seed: int = option(0, "random seed (default: 0)")
    workers: int = option(0, "data loader worker processes (default: 0)")
    checkpoint_every: int = option(0, "also write last.pt every K optimizer steps", metavar="K")
    val_every: int = option(1, "validate every N epochs", type=positive_int, metavar="N")
    precision: str = option(
        "auto", "training arithmetic: auto = bf16 autocast on CPUs with native bf16 (AMX/AVX512-BF16), fp16 AMP on "
        "CUDA, else fp32 (weights and checkpoints stay fp32)", choices=("auto", "fp32", "bf16", "fp16"),
    )  # fmt: skip
    holdout: str | None = option(
        None, "cross-drive validation: hold out the training frames whose names start with this prefix (a CamVid "
        "drive, e.g. 0006R0), train on the rest, choose best.pt on them; val is still measured and reported",
        metavar="PREFIX",
    )  # fmt: skip
    progress: bool = option(True, "no progress bars", negate=True)
    resume: bool = option(False, "continue the run in RUN_DIR from last.pt")
