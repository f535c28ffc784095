"""Every image a camera or an editor produces decodes to H x W x 3 uint8 RGB; bad input is named, not crashed on."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bomb
from PIL import Image

from segserve.images import ImageError, ImageTooLarge, read_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)


def test_rgb_png_is_exact(rgb) -> None:
    assert np.array_equal(read_image(encode(Image.fromarray(rgb), "PNG")), rgb)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(rgb, mode: str) -> None:
    source = Image.fromarray(rgb)
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(source.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey.astype(np.uint16)).convert(mode) if mode != "I;16" else Image.fromarray(grey)
    else:
        image = source.convert(mode)
    fmt = {"CMYK": "TIFF", "F": "TIFF", "YCbCr": "JPEG", "I": "TIFF"}.get(mode, "PNG")
    decoded = read_image(encode(image, fmt) if mode != "PA" else image)
    assert decoded.shape == (23, 37, 3) and decoded.dtype == np.uint8
    if mode in ("RGBA",):
        assert np.array_equal(decoded, rgb)
    if mode in ("L", "LA", "I;16", "I", "F"):
        expected = np.asarray(source.convert("L"))
        assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 1
        assert (decoded[..., 0] == decoded[..., 2]).all()


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # red strip on the left of the stored image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    decoded = read_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.shape == (40, 20, 3)  # as displayed
    assert decoded[:10, :, 0].mean() > 200 and decoded[-10:, :, 0].mean() < 60  # the red strip is now on top


def test_first_frame_of_animations(rgb) -> None:
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    for fmt in ("GIF", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
        decoded = read_image(data)
        assert decoded.shape == (23, 37, 3)
        if fmt == "WEBP":
            assert np.array_equal(decoded, rgb)


def test_paths_arrays_and_pil_images(tmp_path: Path, rgb) -> None:
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    assert np.array_equal(read_image(str(tmp_path / "a.png")), rgb)
    assert np.array_equal(read_image(Image.fromarray(rgb)), rgb)
    assert np.array_equal(read_image(rgb), rgb)
    assert read_image(rgb[..., 0]).shape == (23, 37, 3)
    assert np.array_equal(read_image(np.dstack([rgb, rgb[..., :1]])), rgb)
    assert read_image(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1, 3)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"too large|over the limit"):
        read_image(png_bomb(50_000, 50_000))
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ImageTooLarge, match="image is 300x200 = 60,000 pixels, over the limit of 50,000"):
        read_image(png_bomb(300, 200), max_pixels=50_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"hello, this is text", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "not an image"),
    ],
)
def test_bad_bytes_are_named(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        read_image(data)


def test_truncated_image_is_named(rgb) -> None:
    data = encode(Image.fromarray(np.tile(rgb, (10, 10, 1))), "PNG")
    with pytest.raises(ImageError, match="the upload cannot be decoded"):
        read_image(data[: len(data) // 2])
    jpeg = encode(Image.fromarray(np.tile(rgb, (10, 10, 1))), "JPEG")
    with pytest.raises(ImageError, match="cannot be decoded"):
        read_image(jpeg[: len(jpeg) // 2])


def test_bad_arrays_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="expected uint8 pixels, got float32"):
        read_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"got shape \(4, 4, 2\)"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="image has no pixels"):
        read_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError) as caught:
        read_image(tmp_path / "missing.png")
    assert str(tmp_path) not in str(caught.value)  # never a server path
