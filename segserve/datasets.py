"""Labelled image collections on disk: three layouts, one list of (image, mask) pairs, strict checks.

Layouts (``--layout``; detected from the folder when not given):

* ``camvid``: ``DIR/{split}/`` images and ``DIR/{split}annot/`` label maps with the same file names; classes from
  ``DIR/classes.json`` (CamVid's 11 classes, ignore index 11, when absent);
* ``voc``: Pascal VOC 2012: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 = border/ignore) and
  ``ImageSets/Segmentation/{split}.txt``; the 21 VOC classes;
* ``folder``: ``DIR/{split}/images/`` and ``DIR/{split}/masks/`` matched by file stem; classes from
  ``DIR/classes.json``.

``classes.json`` is ``{"classes": [names], "colors": [[r, g, b], ...], "ignore_index": N}``. Masks are
single-channel class indices (L or P mode) or, for ``folder``, RGB images in the class colours. Internally
the ignore index is always 255. This module needs only numpy and Pillow.

Images are decoded by the runtime's own decoder (:func:`segserve.images.read_image`: EXIF orientation, 16-bit,
every mode), so training, evaluation, calibration and serving see the same pixels. A mask is a per-pixel
annotation of the photograph as stored, so it is turned by its image's EXIF orientation too: both are oriented,
and labels stay on their pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.images import ImageError, is_image_name, orient, orientation, read_image

IGNORE = 255
LAYOUTS = ("camvid", "voc", "folder")

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
CAMVID_COLORS = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class DatasetError(ValueError):
    """The data on disk is not what the layout promises; the message names the first offending file."""


@dataclass(frozen=True)
class ClassInfo:
    """Class names, their display colours, and the ignore index used *on disk* (255 in memory)."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE

    def __post_init__(self) -> None:
        if not self.names:
            raise DatasetError("the class list is empty")
        if len(self.palette) != len(self.names):
            raise DatasetError(f"{len(self.names)} class names but {len(self.palette)} colours")
        if len(self.names) > IGNORE:
            raise DatasetError(f"at most {IGNORE} classes are supported, got {len(self.names)}")


def voc_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """Pascal VOC's colour map (the bit-interleaved one its palette PNGs use)."""
    colours = []
    for index in range(count):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def read_classes(path: Path) -> ClassInfo:
    """Parse a ``classes.json``."""
    try:
        spec = json.loads(path.read_text())
        names = tuple(str(n) for n in spec["classes"])
        colours = spec.get("colors") or spec.get("palette") or voc_palette(len(names))
        palette = tuple((int(r), int(g), int(b)) for r, g, b in colours)
        ignore = int(spec.get("ignore_index", IGNORE))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: not a valid classes.json ({error!r}); expected "
            '{"classes": [...], "colors": [[r, g, b], ...], "ignore_index": N}'
        ) from error
    return ClassInfo(names, palette, ignore)


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path


@dataclass
class Collection:
    """The (image, mask) pairs of one split and their classes."""

    root: Path
    layout: str
    split: str
    classes: ClassInfo
    samples: list[Sample] = field(default_factory=list)


def detect_layout(root: Path, split: str) -> str:
    """Guess the layout from the folder's structure."""
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / split).is_dir() and (root / f"{split}annot").is_dir():
        return "camvid"
    if (root / split / "images").is_dir():
        return "folder"
    raise DatasetError(
        f"{root}: cannot tell the layout for split {split!r}: expected {split}/ + {split}annot/ (camvid), "
        f"JPEGImages/ + SegmentationClass/ (voc) or {split}/images/ + {split}/masks/ (folder)"
    )


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if is_image_name(p) and p.is_file())


def open_collection(root: str | Path, split: str, layout: str | None = None) -> Collection:
    """List the pairs of ``split`` under ``root``; every image must have its mask."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    layout = layout or detect_layout(root, split)
    if layout == "camvid":
        classes = (
            read_classes(root / "classes.json")
            if (root / "classes.json").exists()
            else ClassInfo(CAMVID_CLASSES, CAMVID_COLORS, ignore_index=11)
        )
        masks = root / f"{split}annot"
        samples = [Sample(image, masks / image.name) for image in _images_in(root / split)]
    elif layout == "voc":
        classes = ClassInfo(VOC_CLASSES, voc_palette(len(VOC_CLASSES)), IGNORE)
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DatasetError(f"{listing} does not exist (Pascal VOC lists each split there)")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        samples = [Sample(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    elif layout == "folder":
        base = root / split
        classes_file = next((p for p in (base / "classes.json", root / "classes.json") if p.exists()), None)
        if classes_file is None:
            raise DatasetError(f"{root}/classes.json does not exist (the folder layout takes its classes from it)")
        classes = read_classes(classes_file)
        by_stem = {p.stem: p for p in _images_in(base / "masks")}
        samples = [
            Sample(image, by_stem.get(image.stem, base / "masks" / f"{image.stem}.png"))
            for image in _images_in(base / "images")
        ]
    else:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not samples:
        raise DatasetError(f"{root}: no images in split {split!r} ({layout} layout)")
    for sample in samples:
        if not sample.image.is_file():
            raise DatasetError(f"{sample.image}: image listed for split {split!r} does not exist")
        if not sample.mask.is_file():
            raise DatasetError(f"{sample.image}: its mask {sample.mask} does not exist")
    return Collection(root, layout, split, classes, samples)


def load_image(path: Path) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, upright, exactly as the runtime decodes the file."""
    try:
        return read_image(path)
    except (ImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from error


def load_pair(sample: Sample, classes: ClassInfo) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask, both turned by the image's EXIF orientation (see the module docs)."""
    image = load_image(sample.image)
    with Image.open(sample.image) as header:  # the header only: cheap
        turn = orientation(header)
    return image, load_mask(sample.mask, classes, turn)


def load_mask(path: Path, classes: ClassInfo, turn: int = 1) -> np.ndarray:
    """An H x W uint8 array of class indices with 255 for ignored pixels; bad labels raise DatasetError.

    ``turn``: the EXIF orientation of the mask's image, applied to the mask as to its image."""
    try:
        with Image.open(path) as opened:
            image = orient(opened, turn)
            if image.mode in ("RGB", "RGBA"):
                labels = _colours_to_labels(np.asarray(image.convert("RGB")), classes, path)
            else:
                labels = np.asarray(image)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read mask ({error})") from error
    if labels.ndim != 2:
        raise DatasetError(f"{path}: a mask must have one channel of class indices, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    ignored = labels == classes.ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= len(classes.names)))
    if bad.any():
        value = int(labels[bad][0])
        raise DatasetError(
            f"{path}: label {value} is outside the {len(classes.names)} classes (0-{len(classes.names) - 1}) "
            f"and is not the ignore index {classes.ignore_index}"
        )
    out = labels.astype(np.uint8)
    out[ignored] = IGNORE
    return out


def _colours_to_labels(rgb: np.ndarray, classes: ClassInfo, path: Path) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lookup = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(classes.palette)}
    labels = np.full(codes.shape, classes.ignore_index, dtype=np.int64)
    found = np.zeros(codes.shape, dtype=bool)
    for code, index in lookup.items():
        hit = codes == code
        labels[hit] = index
        found |= hit
    if not found.all():
        y, x = np.argwhere(~found)[0]
        raise DatasetError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at ({x}, {y}) is not a class colour")
    return labels


@dataclass
class LabelStatistics:
    """Per-class pixel counts, for class balancing and the data card."""

    pixels: np.ndarray  # labelled pixels of each class
    image_pixels: np.ndarray  # total labelled pixels of the images in which each class appears
    images: int

    def median_frequency_weights(self) -> np.ndarray:
        """SegNet's median-frequency balancing: ``median(freq) / freq(c)``, freq over images containing c."""
        frequency = np.divide(
            self.pixels, self.image_pixels, out=np.zeros(len(self.pixels)), where=self.image_pixels > 0
        )
        present = frequency > 0
        weights = np.ones(len(frequency))
        weights[present] = np.median(frequency[present]) / frequency[present]
        return weights


def check_pairs(
    collection: Collection,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> LabelStatistics:
    """Check every pair (sizes agree, labels valid) and count labels. Uses ``pairs`` if already decoded."""
    count = len(collection.classes.names)
    pixels = np.zeros(count, dtype=np.int64)
    image_pixels = np.zeros(count, dtype=np.int64)
    for index, sample in enumerate(collection.samples):
        if pairs is not None:
            image_size = pairs[index][0].shape[:2]
            mask = pairs[index][1]
        else:
            with Image.open(sample.image) as image:
                image_size = (image.height, image.width)
            mask = load_mask(sample.mask, collection.classes)
        if tuple(image_size) != mask.shape:
            raise DatasetError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image.name} is "
                f"{image_size[1]}x{image_size[0]}"
            )
        histogram = np.bincount(mask[mask != IGNORE].ravel(), minlength=count)[:count]
        pixels += histogram
        image_pixels[histogram > 0] += histogram.sum()
    return LabelStatistics(pixels, image_pixels, len(collection.samples))
