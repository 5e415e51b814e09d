"""Image preparation and the base64 wire format of NumPy arrays."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = (224, 224)
IMAGE_SHAPE = (224, 224, 3)
IMAGE_DTYPE = "uint8"

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SUPPORTED_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"} | _ALPHA_MODES | _SIXTEEN_BIT_MODES


class ImageError(ValueError):
    """An upload that cannot be turned into a model input; the message is for the person who sent it."""


class PayloadError(ValueError):
    """A base64 array that does not decode to the declared dtype and shape."""


def encode_array(array: np.ndarray) -> str:
    """Base64 text of the array's raw bytes (C order). Send dtype and shape beside it."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def decode_array(data: str, dtype: str, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of `encode_array`; raises PayloadError if the bytes do not fit dtype and shape."""
    try:
        np_dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"bad dtype or shape: {exc}") from None
    if any(n < 0 for n in shape):
        raise PayloadError(f"negative dimension in shape {shape}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise PayloadError(f"image is not valid base64: {exc}") from None
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(raw) != expected:
        raise PayloadError(f"image has {len(raw)} bytes, but {dtype} {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def prepare_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode an uploaded file into a (224, 224, 3) uint8 RGB array.

    Applies the EXIF orientation, flattens transparency onto white, scales 16-bit images
    to 8 bits, and refuses images larger than `max_pixels` before decoding their pixels.
    """
    if not data:
        raise ImageError("the uploaded file is empty")
    image = _open(data, max_pixels)
    image = _to_rgb(image)
    image = image.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
        if image.mode not in _SUPPORTED_MODES:
            raise ImageError(f"images in mode {image.mode} are not supported; send an RGB or grayscale image")
        image.draft("RGB", IMAGE_SIZE)  # JPEG only: decode at a reduced scale, much faster
        image.load()
        return ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the uploaded file is not an image Pillow can read (JPEG, PNG, GIF, WebP ...)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"the image has too many pixels; the limit is {max_pixels:,}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image is damaged or truncated ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode != "I" or wide.max(initial=0) > 255 else 255
        eight = (np.clip(wide, 0, peak) * 255 // peak).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
