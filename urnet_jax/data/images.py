"""Decoding image files of any mode into square uint8 RGB arrays.

Modes: RGB as is; palette, grayscale, 1-bit, CMYK, YCbCr, ... converted to RGB by Pillow; anything
with transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) composited over
white (a brightfield background is bright); 16-bit integer grayscale (I;16*, I) mapped linearly from
0..65535 to 0..255, so the relative brightness of images is kept; 32-bit float grayscale (F) stretched
from its own min..max. Multi-frame files use their first frame. When an image_size is given the image
is then resized to image_size x image_size (`resize_square`: bicubic, antialiased), without keeping the
aspect ratio (the PBC cells are 360x363, the paper's 200x200); without one it keeps its own size (what
`urnet_jax.data.transforms.model_input` takes).
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from urnet_jax.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def is_image_name(path: str | os.PathLike) -> bool:
    """True for a non-hidden file name with an image extension (case-insensitive)."""
    name = pathlib.Path(path).name
    return not name.startswith(".") and pathlib.Path(name).suffix.lower() in IMAGE_EXTENSIONS


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of a file's bytes (identifies byte-identical images)."""
    return hashlib.sha256(data).hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_square(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (image_size, image_size, 3), bicubic (Pillow's, antialiased)."""
    if image.shape[:2] == (image_size, image_size):
        return image
    resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def decode_image(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 (image_size, image_size, 3), or (H, W, 3) at the file's own size
    when image_size is None.

    Raises DataError whose message is the reason to skip the file: 'empty file', 'not an image ...',
    'image too large ...' or 'corrupt or truncated image ...'.
    """
    if not data:
        raise DataError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = _to_rgb(image)
        if image_size is not None:
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError("not an image (format not recognised)") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"image too large ({error})") from None
    except Exception as error:  # Pillow's decoders raise many types (OSError, SyntaxError, ...) on bad data.
        raise DataError(f"corrupt or truncated image ({type(error).__name__}: {error})") from None


def load_image(path: str | os.PathLike, image_size: int | None = None) -> np.ndarray:
    """Reads and decodes one image file (any mode) -> uint8 (image_size, image_size, 3) RGB, or
    (H, W, 3) at the file's own size when image_size is None.

    Raises DataError (one line, naming the file) when the file cannot be read or decoded.
    """
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return decode_image(data, image_size)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
