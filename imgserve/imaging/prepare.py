"""Preparing an upload: decoding it within a memory budget into the model's 224x224 RGB input."""

from __future__ import annotations

import io
import itertools
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgserve.imaging import IMAGE_SIZE
from imgserve.settings import DEFAULT_ACCEPTED_FORMATS

# Pillow allocates a decoded image in blocks (16 MiB by default), which glibc keeps in the allocating
# thread's arena once freed: a web process of 64 threads that decoded large uploads would keep hundreds
# of MB it no longer used. In one block up to 256 MiB, a large image gets memory of its own (glibc maps
# anything over 32 MiB separately) and returns it to the system when it is freed.
PILLOW_BLOCK_SIZE = 256 * 1024 * 1024
if "PILLOW_BLOCK_SIZE" not in os.environ:  # Pillow's own setting wins
    Image.core.set_block_size(PILLOW_BLOCK_SIZE)


_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SUPPORTED_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"} | _ALPHA_MODES | _SIXTEEN_BIT_MODES


class ImageError(ValueError):
    """An upload that cannot be turned into a model input; the message is for the person who sent it."""


# Copies of a body a request holds at its peak: the body as read, its parts as parsed, an image's bytes as
# handed to Pillow (tools/upload_bursts.py measures the process's memory under bursts of large bodies).
UPLOAD_COPIES = 3


class DecodeBusy(Exception):
    """The web process's decode budget stayed full for as long as an upload may wait (DECODE_WAIT)."""


class DecodeBudget:
    """Bytes the uploads of one web process may hold at once (DECODE_BUDGET_BYTES): their bodies while read
    and parsed, and their decoded pixels.

    A request reserves its body's cost (UPLOAD_COPIES times its length) before the body is read, and an
    image what its decoding will cost before any pixel is decoded; each gives it back when done. One that
    cannot get its share within `wait` seconds gets DecodeBusy (a 503).
    """

    def __init__(self, capacity: int, wait: float) -> None:
        self.capacity = capacity
        self.wait = wait
        self.in_use = 0
        self._changed = threading.Condition()
        self._mine = threading.local()  # what this thread holds already (a request's body, while it decodes)
        self._tickets = itertools.count()
        self._holders: set[int] = set()  # the ticket of each thread's outermost hold, in the order granted

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        """Reserve `cost` bytes for the block; DecodeBusy if they are not free within `wait` seconds.

        Holds nest: a thread holding its upload's body may then hold its image's decoding. Alone, a hold may
        always go (the per-image limit is checked against the budget at start-up); so may the nested hold of
        the oldest holder, or two requests each holding a body would refuse each other's decoding."""
        mine, ticket = getattr(self._mine, "held", 0), getattr(self._mine, "ticket", None)
        with self._changed:
            if not self._changed.wait_for(lambda: self._fits(cost, mine, ticket), timeout=self.wait):
                raise DecodeBusy(f"{self.in_use:,} of {self.capacity:,} bytes (DECODE_BUDGET_BYTES) are in use")
            self.in_use += cost
            if ticket is None:
                self._mine.ticket = next(self._tickets)
                self._holders.add(self._mine.ticket)
        self._mine.held = mine + cost
        try:
            yield
        finally:
            self._mine.held = mine
            with self._changed:
                self.in_use -= cost
                if ticket is None:
                    self._holders.discard(self._mine.ticket)
                    self._mine.ticket = None
                self._changed.notify_all()

    def _fits(self, cost: int, mine: int, ticket: int | None) -> bool:
        oldest = ticket is not None and ticket == min(self._holders)
        return self.in_use == mine or self.in_use + cost <= self.capacity or oldest


def prepare_image(
    data: bytes,
    max_pixels: int = 100_000_000,
    max_decode_bytes: int = 150_000_000,
    budget: DecodeBudget | None = None,
    formats: tuple[str, ...] = DEFAULT_ACCEPTED_FORMATS,
    size: tuple[int, int] = IMAGE_SIZE,
) -> np.ndarray:
    """Decode an uploaded file into a (height, width, 3) uint8 RGB array of `size` (width, height): the model's
    input, (224, 224) for ResNet50.

    Reads the header first: refuses files in none of `formats` (Pillow's format names), images over
    `max_pixels`, and images whose decoding would hold more than `max_decode_bytes` (decode_cost) even
    at the smallest scale their format decodes at; then decodes within `budget`. A large image is reduced
    in its own mode before it is converted (to RGB, 8 bits, transparency flattened onto white) and turned
    by its EXIF orientation.
    """
    if not data:
        raise ImageError("the uploaded file is empty")
    with _as_image_error(max_pixels, formats):
        image = _open(data, max_pixels, formats)
        cost = decode_cost(image)
        if cost > max_decode_bytes:
            width, height = _header_size(image)
            raise ImageError(
                f"decoding this {width}x{height} {image.format} image ({image.mode}) would take "
                f"{cost:,} bytes of memory; the limit is {max_decode_bytes:,} (MAX_DECODE_BYTES): "
                f"send it smaller, or as a JPEG, which decodes at a reduced scale"
            )
        with budget.hold(cost) if budget else nullcontext():
            image.load()
            orientation = _orientation(image)
            peak = _sixteen_bit_peak(image)
            image = _to_rgb(_reduce(image), peak)
            if orientation in _TRANSPOSE:
                image = image.transpose(_TRANSPOSE[orientation])
            image = image.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)


# Bytes per pixel as Pillow stores a decoded image: one for 1, L and P; two for 16-bit; four for the rest
# (RGB too: Pillow keeps RGB in 32-bit pixels).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1} | dict.fromkeys(_SIXTEEN_BIT_MODES - {"I"}, 2)
# Bytes per pixel that reducing a large image adds at full size: modes converted first (a palette cannot be
# averaged, so it becomes RGB with its transparency flattened; 1-bit becomes L), and modes with alpha, which
# Pillow averages premultiplied, in a full-size copy.
_REDUCE_EXTRA = {"1": 1, "P": 4, "PA": 8, "LA": 4, "RGBA": 4}
# Bytes per pixel, at most, that converting and resizing a reduced image holds (16-bit: numpy in int64).
_REDUCED_WORK = 40
_REDUCED_SIDE = 2 * IMAGE_SIZE[0]  # reduce large images to no less than this, then resize to IMAGE_SIZE
_TRANSPOSE = {  # EXIF orientation -> the transpose that undoes it, as ImageOps.exif_transpose does
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_cost(image: Image.Image) -> int:
    """Bytes that decoding and preparing an opened (not yet loaded) image holds at its peak, from its
    header: the decoded pixels at the scale it will decode at, any full-size conversion, the reduced copy."""
    width, height = _decoded_size(image)
    factor = _reduce_factor((width, height))
    stored = _STORED_BYTES.get(image.mode, 4) + (_REDUCE_EXTRA.get(image.mode, 0) if factor > 1 else 0)
    reduced = (width // factor) * (height // factor) * _REDUCED_WORK
    return width * height * stored + reduced + _progressive_jpeg_coefficients(image)


def _header_size(image: Image.Image) -> tuple[int, int]:
    """The size the image's header declares (a JPEG's `size` is its draft's once draft() ran)."""
    scale = image.decoderconfig[0] if image.format in ("JPEG", "MPO") and image.decoderconfig else 1
    return image.width * scale, image.height * scale


def _progressive_jpeg_coefficients(image: Image.Image) -> int:
    """Bytes libjpeg holds for a progressive JPEG: every DCT coefficient of the full-size image (two bytes
    each, per component at its sampling), whatever scale it decodes at; 0 for anything else."""
    if image.format not in ("JPEG", "MPO") or not image.info.get("progressive"):
        return 0
    width, height = _header_size(image)
    pixels = width * height
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    return sum(2 * pixels * h * v // (h_max * v_max) for _, h, v, *_ in layers)


def _reduce_factor(size: tuple[int, int]) -> int:
    return max(1, min(size) // _REDUCED_SIDE)


@contextmanager
def _as_image_error(max_pixels: int, formats: tuple[str, ...]) -> Iterator[None]:
    """Every way Pillow refuses a file, as an ImageError for its sender."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"the uploaded file is not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"the image has too many pixels; the limit is {max_pixels:,}") from None
    # Beyond the documented OSError and friends, Pillow's plugins let struct.error, TypeError, IndexError
    # and KeyError out of damaged headers and metadata: the file's fault too, not the server's.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, TypeError, IndexError, KeyError) as exc:
        raise ImageError(f"the image is damaged or truncated ({exc})") from None


def _open(data: bytes, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    """The image with only its header read, set to decode at the smallest scale its format allows."""
    image = Image.open(io.BytesIO(data), formats=formats)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    if image.mode not in _SUPPORTED_MODES:
        raise ImageError(f"images in mode {image.mode} are not supported; send an RGB or grayscale image")
    # JPEG decodes at 1/2, 1/4 or 1/8 scale (in the DCT), no smaller than asked; JPEG 2000 at any of its
    # resolution levels. The other formats Pillow reads have no reduced decode.
    image.draft("RGB", IMAGE_SIZE)
    if image.format == "JPEG2000":
        image.reduce = _jpeg2000_reduction(image.size, _jpeg2000_levels(data))
    return image


def _jpeg2000_reduction(size: tuple[int, int], levels: int) -> int:
    """How many resolution levels to skip so that the image still decodes to at least IMAGE_SIZE."""
    reduce = 0
    while reduce < levels and min(size) >> (reduce + 1) >= max(IMAGE_SIZE):
        reduce += 1
    return reduce


def _jpeg2000_levels(data: bytes) -> int:
    """Decomposition levels of a JPEG 2000 codestream (its COD marker), 0 when they cannot be read."""
    cod = data.find(b"\xff\x52", 0, 4096)  # marker, length (2), Scod (1), SGcod (4), then the levels
    return data[cod + 9] if 0 <= cod and cod + 9 < len(data) else 0


def _decoded_size(image: Image.Image) -> tuple[int, int]:
    """The size an opened image will have once loaded (a JPEG's draft is already in `size`)."""
    reduce = getattr(image, "reduce", None)  # an int only on a JPEG 2000 image, set by _open
    if isinstance(reduce, int) and reduce:
        return (-(-image.width >> reduce), -(-image.height >> reduce))
    return image.size


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation (2 to 8) when the image has a valid one; ImageError when its EXIF cannot be read."""
    try:
        orientation = image.getexif().get(0x0112)
    except Exception as exc:  # noqa: BLE001 - Pillow raises struct.error, TypeError ... on damaged EXIF
        raise ImageError(f"the image's EXIF data is damaged ({type(exc).__name__})") from None
    return orientation if isinstance(orientation, int) and orientation in _TRANSPOSE else None


def _sixteen_bit_peak(image: Image.Image) -> int | None:
    """For a 16-bit image, the value that maps to white: 65535, or 255 for 32-bit "I" data that stays
    below 256; None for other modes."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return None
    return 65535 if image.mode != "I" or image.getextrema()[1] > 255 else 255


def _reduce(image: Image.Image) -> Image.Image:
    """A large image averaged down in boxes, in its own mode, to no less than twice the model's input."""
    factor = _reduce_factor(image.size)
    if factor < 2:
        return image
    if image.mode == "P":
        image = _flattened_palette(image).convert("RGB")
    elif image.mode in ("1", "PA"):
        image = image.convert("L" if image.mode == "1" else "RGBA")
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BOX)


def _flattened_palette(image: Image.Image) -> Image.Image:
    """A palette image with its transparency composited onto white, one palette entry at a time.

    Exact, since a pixel's colour depends only on its index, and it needs no full-size RGBA copy.
    """
    transparency = image.info.pop("transparency", None)
    if transparency is None:
        return image
    colours = image.getpalette("RGB") or []
    alphas = [255] * (len(colours) // 3)
    if isinstance(transparency, int) and transparency < len(alphas):
        alphas[transparency] = 0
    elif isinstance(transparency, bytes):
        alphas[: len(transparency)] = transparency[: len(alphas)]
    flat = [(c * a + 255 * (255 - a) + 127) // 255 for i, c in enumerate(colours) for a in (alphas[i // 3],)]
    image.putpalette(flat, "RGB")
    return image


def _to_rgb(image: Image.Image, peak: int | None) -> Image.Image:
    if peak is not None:
        wide = np.asarray(image, dtype=np.int64)
        eight = (np.clip(wide, 0, peak) * 255 // peak).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
