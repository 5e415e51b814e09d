import io
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from imgserve.imaging.prepare import DecodeBudget, DecodeBusy, ImageError, decode_cost, prepare_image

pytestmark = pytest.mark.unit


def image_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def check_prepared(array: np.ndarray) -> None:
    assert array.shape == (224, 224, 3)
    assert array.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "LA", "1"])
def test_prepare_image_converts_modes(mode):
    base = Image.new("RGB", (300, 200), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    check_prepared(prepare_image(image_bytes(base, fmt)))


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    array = prepare_image(image_bytes(image))
    assert (array == 255).all()


def test_sixteen_bit_image_is_scaled_to_eight_bits():
    wide = np.full((100, 120), 65535, dtype=np.uint16)
    wide[:, :60] = 0
    sixteen = Image.fromarray(wide)
    assert sixteen.mode.startswith("I;16")
    array = prepare_image(image_bytes(sixteen))
    check_prepared(array)
    assert array[:, :100].max() == 0 and array[:, 130:].min() == 255


def test_exif_rotation_is_applied():
    # A 200x100 image, left half black, right half white, tagged "rotate 90 CW to display".
    image = Image.new("RGB", (200, 100), "white")
    image.paste((0, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    array = prepare_image(image_bytes(image, "JPEG", exif=exif.tobytes()))
    # After rotating 90 degrees clockwise, the black half is at the top.
    assert array[:100].mean() < 40 and array[124:].mean() > 215


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
    ],
)
def test_bad_uploads_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        prepare_image(data)


def test_truncated_image_raises_image_error():
    data = image_bytes(Image.effect_noise((400, 400), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageError, match="damaged or truncated"):
        prepare_image(data[: len(data) // 2])


def test_too_many_pixels_is_refused_before_decoding():
    data = image_bytes(Image.new("L", (2000, 2000)))
    with pytest.raises(ImageError, match="4,000,000 pixels"):
        prepare_image(data, max_pixels=1_000_000)


def test_unsupported_mode_is_refused():
    data = image_bytes(Image.new("F", (10, 10)), "TIFF")
    with pytest.raises(ImageError, match="mode F"):
        prepare_image(data)


# ---- decoding within memory limits (decode amplification) ----------------------------------------


def old_prepare(data: bytes) -> np.ndarray:
    """The preparation of an RGB image before large images were reduced first: all at full size."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (224, 224))
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))


def photo(width: int, height: int) -> Image.Image:
    """Smooth colour gradients: what resizing a photo looks like, at any size, made quickly."""
    return Image.merge(
        "RGB",
        [
            Image.linear_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
            Image.radial_gradient("L").resize((width, height)),
        ],
    )


def test_a_48_megapixel_phone_jpeg_is_decoded_at_an_eighth_of_its_size():
    data = image_bytes(photo(8000, 6000), "JPEG", quality=80)
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", (224, 224))
    assert opened.size == (1000, 750)
    assert decode_cost(opened) < 40_000_000, "a few MB, not the 192 MB of full-size pixels"
    check_prepared(prepare_image(data))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_a_4096_square_png_succeeds_with_the_default_limits(mode):
    image = photo(4096, 4096).convert("RGBA" if mode == "RGBA" else "RGB")
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 0
    elif mode in ("L", "I;16"):
        image = image.convert("L")
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    assert decode_cost(Image.open(io.BytesIO(image_bytes(image)))) <= 150_000_000
    check_prepared(prepare_image(image_bytes(image)))


def test_an_image_too_costly_to_decode_is_refused_naming_the_limit():
    data = image_bytes(Image.new("RGB", (6300, 6300), (10, 120, 200)))  # a solid colour: about 130 KB of PNG
    assert len(data) < 200_000
    with pytest.raises(ImageError, match=r"would take [\d,]+ bytes of memory.*MAX_DECODE_BYTES") as refused:
        prepare_image(data)
    assert "150,000,000" in str(refused.value)
    check_prepared(prepare_image(data, max_decode_bytes=200_000_000, budget=DecodeBudget(200_000_000, 1)))


def test_a_large_image_reduced_first_looks_as_it_did_when_converted_at_full_size():
    data = image_bytes(photo(3000, 2000))
    difference = np.abs(prepare_image(data).astype(int) - old_prepare(data).astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 8


def test_a_small_image_is_prepared_exactly_as_before():
    data = image_bytes(photo(800, 480), "JPEG")
    assert np.array_equal(prepare_image(data), old_prepare(data))


def test_a_large_rotated_transparent_sixteen_bit_or_palette_image_keeps_its_meaning():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = Image.new("RGB", (2400, 1200), "white")
    rotated.paste((0, 0, 0), (0, 0, 1200, 1200))
    array = prepare_image(image_bytes(rotated, "JPEG", exif=exif.tobytes()))
    assert array[:100].mean() < 40 and array[124:].mean() > 215
    transparent = Image.new("P", (2000, 2000), 0)
    transparent.info["transparency"] = 0
    assert (prepare_image(image_bytes(transparent)) == 255).all()
    wide = np.full((2000, 2000), 65535, dtype=np.uint16)
    wide[:, :1000] = 0
    array = prepare_image(image_bytes(Image.fromarray(wide)))
    assert array[:, :100].max() == 0 and array[:, 130:].min() == 255


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_an_orientation_exif_does_not_define_turns_nothing(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = image_bytes(photo(300, 200), "JPEG", exif=exif.tobytes())
    assert np.array_equal(prepare_image(data), prepare_image(image_bytes(photo(300, 200), "JPEG")))


def test_the_decode_budget_lets_uploads_through_as_long_as_they_fit():
    budget = DecodeBudget(capacity=100, wait=0.2)
    held, release = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: _hold_until(budget, 60, held, release))
    other.start()
    held.wait(5)
    with budget.hold(40):
        assert budget.in_use == 100
    started = time.monotonic()
    with pytest.raises(DecodeBusy):
        with budget.hold(41):
            pass
    assert time.monotonic() - started >= 0.2
    release.set()
    other.join()
    assert budget.in_use == 0
    with budget.hold(150):  # alone, even an image larger than the budget may go
        assert budget.in_use == 150


def test_holds_nest_within_a_thread_a_body_and_then_its_decoding():
    budget = DecodeBudget(capacity=100, wait=0.2)
    with budget.hold(60):  # the request's body
        with budget.hold(90):  # its image: alone but for its own body, it may go
            assert budget.in_use == 150
        with budget.hold(30):
            assert budget.in_use == 90
    assert budget.in_use == 0


def test_two_requests_holding_bodies_do_not_refuse_each_others_decoding():
    """Both bodies fit, neither decode fits beside the other body: the older request decodes (a bounded
    overshoot of one image), the younger waits for it instead of both timing out."""
    budget = DecodeBudget(capacity=100, wait=2)
    held, release, decoded = threading.Event(), threading.Event(), []

    def older() -> None:
        with budget.hold(45):  # its body
            held.set()
            release.wait(5)
            with budget.hold(30):  # its image: 45 + 45 + 30 > 100, and it is the oldest holder
                decoded.append("older")

    first = threading.Thread(target=older)
    first.start()
    held.wait(5)
    with budget.hold(45):  # the younger request's body
        release.set()
        first.join(5)
        with budget.hold(30):  # decodes once the older one is done
            decoded.append("younger")
    assert decoded == ["older", "younger"] and budget.in_use == 0


def _hold_until(budget: DecodeBudget, cost: int, held: threading.Event, release: threading.Event) -> None:
    with budget.hold(cost):
        held.set()
        release.wait(30)


def test_an_upload_waiting_for_the_budget_goes_when_another_finishes():
    budget = DecodeBudget(capacity=100, wait=5)
    entered = threading.Event()
    holder = threading.Thread(target=lambda: budget_hold_briefly(budget, entered))
    holder.start()
    entered.wait(5)
    with budget.hold(80):
        assert budget.in_use == 80, "it waited until the first upload gave its share back"
    holder.join()


def budget_hold_briefly(budget: DecodeBudget, entered: threading.Event) -> None:
    with budget.hold(80):
        entered.set()
        time.sleep(0.2)


def test_a_large_jpeg_2000_decodes_at_a_reduced_resolution_level():
    data = image_bytes(photo(4000, 3000), "JPEG2000", irreversible=True)
    full_size = 4000 * 3000 * 4
    with pytest.raises(ImageError, match="MAX_DECODE_BYTES"):  # a PNG of that size is refused ...
        prepare_image(image_bytes(photo(4000, 3000)), max_decode_bytes=full_size // 4)
    check_prepared(prepare_image(data, max_decode_bytes=full_size // 4, formats=("JPEG2000",)))  # ... at 1/8


def test_a_progressive_jpeg_counts_every_coefficient_libjpeg_holds():
    """libjpeg keeps all DCT coefficients of a progressive JPEG in memory, whatever scale it decodes at."""
    image = photo(4000, 3000)
    baseline = Image.open(io.BytesIO(image_bytes(image, "JPEG", quality=85)))
    progressive = Image.open(io.BytesIO(image_bytes(image, "JPEG", quality=85, progressive=True)))
    for opened in (baseline, progressive):
        opened.draft("RGB", (224, 224))
    # 4:2:0: the luma at full size and two chroma planes at a quarter, two bytes a coefficient
    assert decode_cost(progressive) - decode_cost(baseline) == 2 * 12_000_000 * 3 // 2


# ---- the doors an upload could open: formats, damaged metadata, conversions at full size -------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_the_accepted_formats_are_prepared(fmt):
    check_prepared(prepare_image(image_bytes(photo(300, 200), fmt)))


@pytest.mark.parametrize("fmt", ["EPS", "JPEG2000", "TGA", "PPM", "ICO", "SGI", "PCX", "QOI", "DDS"])
def test_other_formats_pillow_reads_are_refused_naming_the_accepted_ones(fmt):
    data = image_bytes(Image.new("RGB", (40, 30), "red"), fmt)
    with pytest.raises(ImageError, match=r"not an image in an accepted format \(JPEG, PNG, GIF, WEBP, BMP, TIFF\)"):
        prepare_image(data)
    if fmt != "EPS":  # (Pillow would hand an EPS to Ghostscript, where one is installed)
        check_prepared(prepare_image(data, formats=(fmt,)))  # refused for its format, not as damaged


# Orientation 6 kept, another tag damaged: ImageOps.exif_transpose raises struct.error and TypeError on these.
DAMAGED_EXIF = [
    "4578696600004d4d002a000000080003014300020000000600000032011200030000000100060000900300020000000b000000"
    "38000000004d616b657200323032303a30313a30310000",
    "4578696600004d4d002a000000080003011f00020000000600000032011200030000000100060000900300020000000b000000"
    "38000000004d616b657200323032303a30313a3031",
]


@pytest.mark.parametrize("exif", DAMAGED_EXIF, ids=["struct-error", "type-error"])
def test_damaged_exif_beside_the_orientation_still_turns_the_image(exif):
    image = Image.new("RGB", (200, 100), "white")
    image.paste((0, 0, 0), (0, 0, 100, 100))
    data = image_bytes(image, "JPEG", exif=bytes.fromhex(exif))
    with pytest.raises((struct.error, TypeError)):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    array = prepare_image(data)
    assert array[:100].mean() < 40 and array[124:].mean() > 215  # turned, as its orientation says


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer"), TypeError("bad"), IndexError("x")])
def test_any_error_a_decoder_raises_is_an_image_error(monkeypatch, error):
    def fail(_image):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)  # the load every format plugin inherits
    with pytest.raises(ImageError, match="damaged or truncated"):
        prepare_image(image_bytes(photo(300, 200)))


def sixteen_bit(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.asarray(photo(width, height).convert("L")).astype(np.uint16) * 257)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "P"])
def test_a_large_image_is_converted_only_once_reduced(monkeypatch, mode):
    """Alpha compositing and 16-bit scaling (numpy int64) run on the reduced image, not at full size."""
    from imgserve.imaging import prepare as helpers

    if mode == "I;16":
        image = sixteen_bit(2000, 1600)
    else:
        image = photo(2000, 1600).convert("RGBA").convert(mode)
        if mode == "P":
            image.info["transparency"] = 0
    converted: list[tuple[int, int]] = []
    to_rgb = helpers._to_rgb
    monkeypatch.setattr(helpers, "_to_rgb", lambda im, peak: converted.append(im.size) or to_rgb(im, peak))
    check_prepared(prepare_image(image_bytes(image)))
    assert converted == [(2000 // 3, 1600 // 3)]  # reduced 3 times: still at least twice the model's input
