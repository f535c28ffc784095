"""Decoding whatever image a camera, an editor or a client sends into H x W x 3 uint8 RGB (numpy + Pillow).

* The pixel count is checked from the header, before any pixel is decoded: a 50000x50000 PNG of a few hundred
  bytes is refused in microseconds with :class:`ImageTooLarge` (the service answers 413). Pillow's own hard stop
  (about 179 million pixels) still applies above a larger configured limit.
* EXIF orientation is applied, so labels line up with the image as viewers display it.
* Animated GIF/WebP/APNG: the first frame. Alpha (RGBA, LA, PA, transparent P) is dropped: the colour channels
  are segmented as stored. Greyscale (L, 1, I;16, I, F) is replicated to three channels; 16-bit and 32-bit
  greyscale are scaled to 8 bits by their type's range. CMYK, YCbCr, LAB and HSV are converted by Pillow.
* Everything else a client can get wrong (empty body, not an image, truncated file, bad array) raises
  :class:`ImageError` with a message that names the problem and never a server path.

This is the one decoder: training data, int8 calibration, ``segserve evaluate``, the batch command and the
service all see the same pixels for the same file. :data:`IMAGE_SUFFIXES` is the one list of file names taken
for images when a folder is scanned. numpy and Pillow only (no onnxruntime, no torch).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ORIENTATION = 0x0112  # the EXIF orientation tag
#: EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: File name suffixes taken for images when a folder is scanned (batch inputs, datasets, calibration).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
    | {".tga", ".jp2", ".ico", ".dib"}
)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | Image.Image | np.ndarray


class ImageError(ValueError):
    """Input that is not a usable image (a client error)."""


class ImageTooLarge(ImageError):
    """An image whose declared size exceeds the pixel limit (refused before decoding)."""


def is_image_name(path: Path) -> bool:
    """Whether a file name has one of :data:`IMAGE_SUFFIXES` (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) an image declares; 1 (upright) when absent or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block should not cost the image
        return 1
    return value if value in _UPRIGHT else 1


def orient(image: Image.Image, value: int) -> Image.Image:
    """``image`` turned as EXIF orientation ``value`` asks (no copy when upright): also used for a mask, which
    follows its photograph's orientation so that labels stay on their pixels."""
    method = _UPRIGHT.get(value)
    return image if method is None else image.transpose(method)


def read_image(source: ImageSource, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """``source`` (encoded bytes, a path, a PIL image or an array) as an H x W x 3 uint8 RGB array; ``name``:
    what messages call encoded bytes (default "the upload")."""
    if max_pixels is None:
        from segserve.settings import Settings

        max_pixels = Settings.from_env().max_pixels
    limit = max_pixels
    if isinstance(source, np.ndarray):
        return _from_array(source, limit)
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, limit)
        return _to_rgb(orient(source, orientation(source)))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty image: the upload has no bytes")
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
        name = name or "the upload"
    else:
        stream = Path(source)
        name = stream.name
        if not stream.is_file():
            raise ImageError(f"{name}: no such file")
        if stream.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
        try:
            image = Image.open(stream)  # reads the header only
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image in a format Pillow reads") from None
        except Image.DecompressionBombError:  # Pillow's own hard stop, at twice Image.MAX_IMAGE_PIXELS
            raise ImageTooLarge(f"{name} is too large: more than {limit:,} pixels") from None
        except OSError as error:
            raise ImageError(f"{name} cannot be read: {error}") from None
    with image:
        _check_size(image.width, image.height, limit)
        try:
            image.seek(0)
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            message = "truncated or corrupt image data" if "truncated" in str(error) else str(error)
            raise ImageError(f"{name} cannot be decoded: {message}") from None
        return _to_rgb(orient(image, orientation(image)))


def _check_size(width: int, height: int, limit: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}")


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB",):
        return np.array(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values / peak * 255), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return np.array(image.convert("RGBA"))[..., :3].copy()
    return np.array(image.convert("RGB"))


def _from_array(array: np.ndarray, limit: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an H x W x 3 (or H x W, H x W x 1, H x W x 4) array, got shape {array.shape}")
    _check_size(array.shape[1], array.shape[0], limit)
    if array.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {array.dtype} (scale to 0-255 and convert first)")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])
