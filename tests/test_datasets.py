"""The three dataset layouts load, and broken collections are refused naming the first offending file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTHETIC_CLASSES, synthetic_pair, write_dataset
from PIL import Image

from segserve.datasets import (
    CAMVID_CLASSES,
    VOC_CLASSES,
    DatasetError,
    check_pairs,
    detect_layout,
    load_image,
    load_mask,
    load_pair,
    open_collection,
)
from segserve.images import read_image
from segserve.training.evaluate import pairs_of


@pytest.mark.parametrize("layout", ["camvid", "voc", "folder"])
def test_layouts_load_pairs_and_classes(dataset_factory, layout: str) -> None:
    root = dataset_factory(layout)
    assert detect_layout(root, "train") == layout
    train = open_collection(root, "train")
    assert train.layout == layout and len(train.samples) == 8
    assert len(open_collection(root, "val", layout).samples) == 3
    expected_names = VOC_CLASSES if layout == "voc" else tuple(SYNTHETIC_CLASSES)
    assert train.classes.names == expected_names
    image = load_image(train.samples[0].image)
    mask = load_mask(train.samples[0].mask, train.classes)
    _, labels = synthetic_pair(0)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert (mask[0, :3] == 255).all()  # the dataset's ignore index becomes 255
    assert np.array_equal(mask[1:], labels[1:])
    stats = check_pairs(train)
    assert stats.pixels.sum() == 8 * (48 * 64 - 3)
    assert stats.pixels[len(SYNTHETIC_CLASSES) :].sum() == 0


def test_camvid_without_classes_json_uses_the_camvid_list(dataset_factory) -> None:
    root = dataset_factory("camvid")
    (root / "classes.json").unlink()
    collection = open_collection(root, "train")
    assert collection.classes.names == CAMVID_CLASSES and collection.classes.ignore_index == 11


def test_folder_masks_may_be_colour_images(dataset_factory) -> None:
    root = dataset_factory("folder")
    classes = open_collection(root, "train").classes
    _, labels = synthetic_pair(0)
    colours = np.array(json.loads((root / "classes.json").read_text())["colors"], dtype=np.uint8)[labels]
    Image.fromarray(colours).save(root / "rgb.png")
    assert np.array_equal(load_mask(root / "rgb.png", classes), labels)
    colours[5, 7] = (1, 2, 3)
    Image.fromarray(colours).save(root / "rgb.png")
    with pytest.raises(DatasetError, match=r"rgb\.png: colour \(1, 2, 3\) at \(7, 5\) is not a class colour"):
        load_mask(root / "rgb.png", classes)


def test_missing_mask_is_named(dataset_factory) -> None:
    root = dataset_factory("camvid")
    (root / "trainannot" / "train_003.png").unlink()
    with pytest.raises(DatasetError, match=r"train_003\.png: its mask .*trainannot/train_003\.png does not exist"):
        open_collection(root, "train")


def test_size_mismatch_is_named(dataset_factory) -> None:
    root = dataset_factory("folder")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "train" / "masks" / "train_002.png")
    with pytest.raises(DatasetError, match=r"train_002\.png: mask is 10x10 but its image train_002\.png is 64x48"):
        check_pairs(open_collection(root, "train"))


def test_label_outside_the_class_list_is_named(dataset_factory) -> None:
    root = dataset_factory("camvid")
    path = root / "trainannot" / "train_005.png"
    labels = np.array(Image.open(path))
    labels[10, 10] = 7
    Image.fromarray(labels).save(path)
    with pytest.raises(DatasetError, match=r"train_005\.png: label 7 is outside the 3 classes \(0-2\)"):
        check_pairs(open_collection(root, "train"))


def test_voc_listing_with_a_missing_image_is_named(dataset_factory) -> None:
    root = dataset_factory("voc")
    listing = root / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(listing.read_text() + "ghost\n")
    with pytest.raises(DatasetError, match=r"ghost\.jpg: image listed for split 'train' does not exist"):
        open_collection(root, "train")


def test_unreadable_files_and_folders(dataset_factory, tmp_path: Path) -> None:
    root = dataset_factory("camvid")
    (root / "train" / "train_001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"train_001\.png: cannot read image"):
        load_image(root / "train" / "train_001.png")
    with pytest.raises(DatasetError, match="does not exist"):
        open_collection(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        open_collection(tmp_path / "empty", "train")
    (root / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"classes\.json: not a valid classes\.json"):
        open_collection(root, "train")


def test_median_frequency_weights_favour_rare_classes(dataset_factory) -> None:
    stats = check_pairs(open_collection(dataset_factory("camvid"), "train"))
    weights = stats.median_frequency_weights()
    assert weights[0] < 1 < weights[2]  # background is common, the stripe rare
    assert np.median(weights) == pytest.approx(1.0)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_pair_stays_aligned(tmp_path: Path, orientation: int) -> None:
    """The image is decoded upright (as the runtime decodes it); its mask, drawn on the stored pixels, turns with it."""
    root = write_dataset(tmp_path / "data", "folder", train=2, val=1)
    stored, labels = synthetic_pair(0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    target = root / "train" / "images" / "train_000.png"
    image.save(target, exif=exif.tobytes())
    Image.fromarray(labels).save(root / "train" / "masks" / "train_000.png")
    collection = open_collection(root, "train")
    pixels, mask = load_pair(collection.samples[0], collection.classes)
    assert np.array_equal(pixels, read_image(target))  # the very pixels serving sees
    assert pixels.shape[:2] == mask.shape == ((64, 48) if orientation in (6, 8) else (48, 64))
    for cls, colour in ((1, (220, 40, 40)), (2, (40, 40, 220))):
        assert (pixels[mask == cls] == colour).all()
    upright = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}[orientation]
    assert np.array_equal(pixels, upright(stored)) and np.array_equal(mask, upright(labels))
    check_pairs(collection, list(pairs_of(collection)))  # sizes agree, labels valid
