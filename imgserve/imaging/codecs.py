"""How a job carries its image: base64 text of the pixels packed by one of these codecs (JOB_CODEC).

    raw    the uint8 pixels as they are (200,704 base64 characters for 224x224x3)
    zstd   each row minus the row above (mod 256), then Zstandard level 1; lossless
    zstd2  green subtracted from red and blue (mod 256), then as zstd; lossless, and smaller for photos,
           whose three channels move together; the default
    jpeg   JPEG at a quality (JOB_QUALITY), colour at full resolution (4:4:4); lossy, much smaller than
           zstd2 for photos (each codec's bytes and cost: deliverables/TEST_RESULTS.md, the front door)
    webp   WebP at a quality; lossy, a little smaller than jpeg but far slower to encode

A worker reads every codec; a web server writes the one its settings name. A lossless codec that does
not make an image smaller (noise) sends it raw. Decoding treats the text as untrusted: it raises
PayloadError for anything that does not unpack to exactly the declared dtype and shape.
"""

from __future__ import annotations

import binascii
import io
import threading
from collections.abc import Callable

import numpy as np
import pybase64
import simplejpeg
import zstandard

LOSSLESS = ("raw", "zstd", "zstd2")
LOSSY = ("jpeg", "webp")
CODECS = LOSSLESS + LOSSY
DEFAULT_QUALITY = 90


class PayloadError(ValueError):
    """A base64 array that does not decode to the declared dtype and shape."""


def encode_array(array: np.ndarray) -> str:
    """Base64 text of the array's raw bytes (C order). Send dtype and shape beside it."""
    return pybase64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def decode_array(data: str, dtype: str, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of `encode_array`; raises PayloadError if the bytes do not fit dtype and shape."""
    np_dtype, shape, expected = _layout(dtype, shape)
    raw = _unbase64(data)
    if len(raw) != expected:
        raise PayloadError(f"image has {len(raw)} bytes, but {dtype} {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def encode_image(pixels: np.ndarray, codec: str = "raw", quality: int = DEFAULT_QUALITY) -> tuple[str, str]:
    """(base64 text, codec used) of a uint8 image, for a job; `quality` (1 to 100) is for the lossy codecs."""
    if codec not in CODECS:
        raise ValueError(f"unknown image codec {codec!r}; known: {', '.join(CODECS)}")
    if codec in LOSSY and _is_rgb(pixels):
        return pybase64.b64encode(_LOSSY_ENCODERS[codec](pixels, quality)).decode("ascii"), codec
    if codec in ("zstd", "zstd2") and pixels.dtype == np.uint8 and pixels.ndim >= 2:
        packed = _zstd_pack(_green_subtracted(pixels) if codec == "zstd2" and _is_rgb(pixels) else pixels)
        if len(packed) < pixels.nbytes:
            return pybase64.b64encode(packed).decode("ascii"), codec
    return encode_array(pixels), "raw"


def decode_image(data: str, codec: str, dtype: str, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of `encode_image`; raises PayloadError if the data does not unpack to dtype and shape."""
    if codec == "raw":
        return decode_array(data, dtype, shape)
    if codec not in CODECS:
        raise PayloadError(f"unknown image codec {codec!r}; known: {', '.join(CODECS)}")
    np_dtype, shape, expected = _layout(dtype, shape)
    if codec in LOSSY:
        if np_dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
            raise PayloadError(f"codec {codec} carries uint8 RGB images, not {dtype} {shape}")
        return _LOSSY_DECODERS[codec](_unbase64(data), shape)
    if np_dtype != np.uint8 or len(shape) < 2:
        raise PayloadError(f"codec {codec} carries uint8 images of 2 or more dimensions, not {dtype} {shape}")
    rows = _zstd_unpack(_unbase64(data), dtype, shape, expected)
    return _green_added(rows) if codec == "zstd2" and _is_rgb(rows) else rows


def _is_rgb(pixels: np.ndarray) -> bool:
    return pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


_contexts = threading.local()


def _zstd() -> threading.local:
    """This thread's Zstandard contexts: they are not thread-safe, and making one per job costs CPU."""
    if not hasattr(_contexts, "compressor"):
        _contexts.compressor = zstandard.ZstdCompressor(level=1)
        _contexts.decompressor = zstandard.ZstdDecompressor()
    return _contexts


def _zstd_pack(pixels: np.ndarray) -> bytes:
    """Every row minus the row above (mod 256), then Zstandard level 1."""
    rows = np.array(pixels, copy=True, order="C")
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:])
    return _zstd().compressor.compress(rows.data)


def _zstd_unpack(packed: bytes, dtype: str, shape: tuple[int, ...], expected: int) -> np.ndarray:
    """The (writable) pixels of `_zstd_pack`, which must unpack to `expected` bytes of `shape`."""
    try:
        size = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"image is not a Zstandard frame: {exc}") from None
    if size != expected:  # checked before decompressing: a forged size must not allocate gigabytes
        raise PayloadError(f"image unpacks to {size} bytes, but {dtype} {shape} needs {expected}")
    try:
        rows = _zstd().decompressor.decompress(packed, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"image is damaged: {exc}") from None
    if len(rows) != expected:
        raise PayloadError(f"image unpacked to {len(rows)} bytes, but {dtype} {shape} needs {expected}")
    return _undo_row_deltas(np.frombuffer(rows, dtype=np.uint8).reshape(shape))


def _undo_row_deltas(deltas: np.ndarray) -> np.ndarray:
    """Each row plus all the rows above it (mod 256): the inverse of the zstd codec's row deltas.

    A prefix sum in log2(rows) whole-array additions (Hillis-Steele): faster than np.cumsum along
    axis 0, which adds one row at a time.
    """
    rows = deltas.copy()
    step = 1
    while step < len(rows):
        rows[step:] += rows[:-step].copy()  # the copy: both sides overlap
        step *= 2
    return rows


def _green_subtracted(pixels: np.ndarray) -> np.ndarray:
    """Red and blue minus green (mod 256): in a photo the channels move together, so what is left is small."""
    planes = pixels.copy()
    planes[..., 0] -= pixels[..., 1]
    planes[..., 2] -= pixels[..., 1]
    return planes


def _green_added(planes: np.ndarray) -> np.ndarray:
    """Inverse of `_green_subtracted`, in place."""
    planes[..., 0] += planes[..., 1]
    planes[..., 2] += planes[..., 1]
    return planes


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB")


def _decode_jpeg(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width) != shape[:2]:  # checked before decoding: a forged header must not allocate more
            raise PayloadError(f"image is {width}x{height}, but {shape} was declared")
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as exc:
        raise PayloadError(f"image is not a valid JPEG: {exc}") from None


def _encode_webp(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image  # only for webp: the protocol (job.py) imports this module and must not load Pillow

    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "WEBP", quality=quality, method=0)  # method 0: the fastest
    return out.getvalue()


def _decode_webp(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image  # see _encode_webp

    try:
        with Image.open(io.BytesIO(data), formats=("WEBP",)) as image:
            if image.size != (shape[1], shape[0]):
                raise PayloadError(f"image is {image.width}x{image.height}, but {shape} was declared")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if isinstance(exc, PayloadError):
            raise
        raise PayloadError(f"image is not a valid WebP: {exc}") from None


def _layout(dtype: str, shape: tuple[int, ...] | list[int]) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte count) of a declared array; PayloadError if they make no sense."""
    try:
        np_dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"bad dtype or shape: {exc}") from None
    if any(n < 0 for n in shape):
        raise PayloadError(f"negative dimension in shape {shape}")
    return np_dtype, shape, int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize


def _unbase64(data: str) -> bytes:
    try:
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise PayloadError(f"image is not valid base64: {exc}") from None


_LOSSY_ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {"jpeg": _encode_jpeg, "webp": _encode_webp}
_LOSSY_DECODERS: dict[str, Callable[[bytes, tuple[int, ...]], np.ndarray]] = {
    "jpeg": _decode_jpeg,
    "webp": _decode_webp,
}
