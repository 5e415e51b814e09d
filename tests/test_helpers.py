import base64
import io

import numpy as np
import pytest
from PIL import Image

from helpers import ImageError, PayloadError, decode_array, decode_image, encode_array, encode_image, prepare_image


def image_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def test_round_trip_keeps_values_dtype_and_shape():
    array = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    text = encode_array(array)
    back = decode_array(text, "uint8", (224, 224, 3))
    assert back.dtype == np.uint8 and back.shape == (224, 224, 3)
    assert np.array_equal(back, array)
    assert len(text) == 200_704  # 150,528 raw bytes in base64


def test_round_trip_float32():
    array = np.random.default_rng(2).random((2, 5)).astype(np.float32)
    assert np.array_equal(decode_array(encode_array(array), "float32", [2, 5]), array)


@pytest.mark.parametrize(
    "dtype, shape",
    [("float32", (224, 224, 3)), ("uint8", (224, 224, 4)), ("uint8", (10,)), ("uint16", (224, 224, 3))],
)
def test_mismatched_dtype_or_shape_is_rejected(dtype, shape):
    text = encode_array(np.zeros((224, 224, 3), np.uint8))
    with pytest.raises(PayloadError):
        decode_array(text, dtype, shape)


@pytest.mark.parametrize("text", ["not base64!!", "YWJj\n===", ""])
def test_bad_base64_is_rejected(text):
    with pytest.raises(PayloadError):
        decode_array(text, "uint8", (224, 224, 3))


def test_unknown_dtype_is_rejected():
    with pytest.raises(PayloadError):
        decode_array("AAAA", "notatype", (3,))


def photo_like() -> np.ndarray:
    """Smooth gradients plus a little noise: compresses as photos do, unlike pure noise."""
    y, x = np.mgrid[0:224, 0:224]
    noise = np.random.default_rng(3).integers(0, 4, (224, 224, 3))
    return (np.stack([x, y, (x + y) // 2], axis=-1) + noise).astype(np.uint8)


def test_zstd_codec_is_lossless_and_smaller_for_a_photo_like_image():
    array = photo_like()
    text, codec = encode_image(array, "zstd")
    assert codec == "zstd" and len(text) < 200_704 * 0.9
    assert np.array_equal(decode_image(text, codec, "uint8", (224, 224, 3)), array)


def test_zstd_codec_falls_back_to_raw_for_noise():
    noise = np.random.default_rng(4).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    text, codec = encode_image(noise, "zstd")
    assert codec == "raw" and len(text) == 200_704
    assert np.array_equal(decode_image(text, codec, "uint8", (224, 224, 3)), noise)


def test_raw_codec_is_encode_array():
    array = photo_like()
    assert encode_image(array, "raw") == (encode_array(array), "raw")
    with pytest.raises(ValueError, match="unknown image codec"):
        encode_image(array, "png")


@pytest.mark.parametrize(
    "codec, text, dtype, shape, reason",
    [
        ("png", "AAAA", "uint8", (224, 224, 3), "unknown image codec"),
        ("zstd", "@@", "uint8", (224, 224, 3), "not valid base64"),
        ("zstd", "bm90IHpzdGQ=", "uint8", (224, 224, 3), "not a Zstandard frame"),
        ("zstd", encode_image(photo_like(), "zstd")[0], "uint8", (224, 224, 4), "unpacks to 150528 bytes"),
        ("zstd", encode_image(photo_like(), "zstd")[0], "float32", (224, 224, 3), "uint8 images"),
    ],
)
def test_bad_zstd_images_are_rejected(codec, text, dtype, shape, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_image(text, codec, dtype, shape)


def test_a_truncated_zstd_image_is_rejected():
    packed = base64.b64decode(encode_image(photo_like(), "zstd")[0])
    with pytest.raises(PayloadError, match="damaged"):
        decode_image(base64.b64encode(packed[: len(packed) // 2]).decode(), "zstd", "uint8", (224, 224, 3))


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
