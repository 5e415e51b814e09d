import base64

import numpy as np
import pytest

from imgserve import settings
from imgserve.imaging.codecs import CODECS, LOSSY, PayloadError, decode_array, decode_image, encode_array, encode_image

pytestmark = pytest.mark.unit

SHAPE = (224, 224, 3)


def test_round_trip_keeps_values_dtype_and_shape():
    array = np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)
    text = encode_array(array)
    back = decode_array(text, "uint8", SHAPE)
    assert back.dtype == np.uint8 and back.shape == SHAPE
    assert np.array_equal(back, array)
    assert len(text) == 200_704  # 150,528 raw bytes in base64


def test_round_trip_float32():
    array = np.random.default_rng(2).random((2, 5)).astype(np.float32)
    assert np.array_equal(decode_array(encode_array(array), "float32", [2, 5]), array)


@pytest.mark.parametrize(
    "dtype, shape",
    [("float32", SHAPE), ("uint8", (224, 224, 4)), ("uint8", (10,)), ("uint16", SHAPE)],
)
def test_mismatched_dtype_or_shape_is_rejected(dtype, shape):
    text = encode_array(np.zeros(SHAPE, np.uint8))
    with pytest.raises(PayloadError):
        decode_array(text, dtype, shape)


@pytest.mark.parametrize("text", ["not base64!!", "YWJj\n===", ""])
def test_bad_base64_is_rejected(text):
    with pytest.raises(PayloadError):
        decode_array(text, "uint8", SHAPE)


def test_unknown_dtype_is_rejected():
    with pytest.raises(PayloadError):
        decode_array("AAAA", "notatype", (3,))


def photo_like() -> np.ndarray:
    """Smooth gradients plus a little noise: compresses as photos do, unlike pure noise."""
    y, x = np.mgrid[0:224, 0:224]
    noise = np.random.default_rng(3).integers(0, 4, SHAPE)
    return (np.stack([x, y, (x + y) // 2], axis=-1) + noise).astype(np.uint8)


def test_zstd_codec_is_lossless_and_smaller_for_a_photo_like_image():
    array = photo_like()
    text, codec = encode_image(array, "zstd")
    assert codec == "zstd" and len(text) < 200_704 * 0.9
    assert np.array_equal(decode_image(text, codec, "uint8", SHAPE), array)


def test_zstd_codec_falls_back_to_raw_for_noise():
    noise = np.random.default_rng(4).integers(0, 256, SHAPE, dtype=np.uint8)
    text, codec = encode_image(noise, "zstd")
    assert codec == "raw" and len(text) == 200_704
    assert np.array_equal(decode_image(text, codec, "uint8", SHAPE), noise)


def test_raw_codec_is_encode_array():
    array = photo_like()
    assert encode_image(array, "raw") == (encode_array(array), "raw")
    with pytest.raises(ValueError, match="unknown image codec"):
        encode_image(array, "png")


@pytest.mark.parametrize(
    "codec, text, dtype, shape, reason",
    [
        ("png", "AAAA", "uint8", SHAPE, "unknown image codec"),
        ("zstd", "@@", "uint8", SHAPE, "not valid base64"),
        ("zstd", "bm90IHpzdGQ=", "uint8", SHAPE, "not a Zstandard frame"),
        ("zstd", encode_image(photo_like(), "zstd")[0], "uint8", (224, 224, 4), "unpacks to 150528 bytes"),
        ("zstd", encode_image(photo_like(), "zstd")[0], "float32", SHAPE, "uint8 images"),
    ],
)
def test_bad_zstd_images_are_rejected(codec, text, dtype, shape, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_image(text, codec, dtype, shape)


def test_a_truncated_zstd_image_is_rejected():
    packed = base64.b64decode(encode_image(photo_like(), "zstd")[0])
    with pytest.raises(PayloadError, match="damaged"):
        decode_image(base64.b64encode(packed[: len(packed) // 2]).decode(), "zstd", "uint8", SHAPE)


def correlated_photo() -> np.ndarray:
    """A photo-like image whose channels move together, as a real photo's do: one textured light, seen
    through three slightly different gains, plus a little noise of each channel's own."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:224, 0:224]
    light = 60 + (x + 2 * y) / 4 + 40 * np.sin(x / 7) * np.cos(y / 11) + rng.normal(0, 6, (224, 224))
    channels = [gain * light + rng.normal(0, 1, (224, 224)) for gain in (1.1, 1.0, 0.8)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


def test_zstd2_is_lossless_and_smaller_than_zstd_when_the_channels_move_together():
    array = correlated_photo()
    text, codec = encode_image(array, "zstd2")
    assert codec == "zstd2" and len(text) < 0.9 * len(encode_image(array, "zstd")[0])
    back = decode_image(text, codec, "uint8", SHAPE)
    assert np.array_equal(back, array) and back.flags.writeable


def test_zstd2_of_a_grey_image_is_zstd_of_its_single_channel_shape():
    grey = correlated_photo()[..., 1]
    text, codec = encode_image(grey, "zstd2")
    assert codec == "zstd2" and np.array_equal(decode_image(text, codec, "uint8", (224, 224)), grey)


@pytest.mark.parametrize("codec, min_psnr, max_chars", [("jpeg", 35, 40_000), ("webp", 35, 40_000)])
def test_lossy_codecs_are_small_and_close(codec, min_psnr, max_chars):
    array = correlated_photo()
    text, used = encode_image(array, codec, quality=90)
    back = decode_image(text, used, "uint8", SHAPE)
    error = np.mean((back.astype(float) - array) ** 2)
    assert used == codec and len(text) < max_chars
    assert back.shape == SHAPE and back.dtype == np.uint8
    assert 10 * np.log10(255**2 / error) > min_psnr


def test_a_lower_quality_is_smaller():
    array = correlated_photo()
    assert len(encode_image(array, "jpeg", quality=50)[0]) < len(encode_image(array, "jpeg", quality=95)[0])


@pytest.mark.parametrize("codec", LOSSY)
def test_a_lossy_image_of_another_size_than_declared_is_rejected(codec):
    text, _ = encode_image(correlated_photo()[:100], codec)
    with pytest.raises(PayloadError, match="declared"):
        decode_image(text, codec, "uint8", SHAPE)


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("data", [b"not an image", b"\xff\xd8\xff\xe0garbage", b"RIFF\x00\x00\x00\x00WEBPVP8 "])
def test_a_damaged_lossy_image_is_rejected(codec, data):
    with pytest.raises(PayloadError):
        decode_image(base64.b64encode(data).decode(), codec, "uint8", SHAPE)


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_carry_only_uint8_rgb(codec):
    text, _ = encode_image(correlated_photo(), codec)
    with pytest.raises(PayloadError, match="uint8 RGB"):
        decode_image(text, codec, "float32", SHAPE)


def test_the_job_codec_setting_offers_every_codec():
    for codec in CODECS:
        assert settings.load(env={"JOB_CODEC": codec}, dotenv=False).job_codec == codec
    with pytest.raises(settings.SettingsError, match="JOB_CODEC"):
        settings.load(env={"JOB_CODEC": "png"}, dotenv=False)
    with pytest.raises(settings.SettingsError, match="JOB_QUALITY"):
        settings.load(env={"JOB_QUALITY": "101"}, dotenv=False)


def test_threads_packing_and_unpacking_at_once_each_get_their_own_image_back():
    from concurrent.futures import ThreadPoolExecutor

    images = [np.roll(correlated_photo(), shift, axis=1) for shift in range(8)]

    def round_trips(image: np.ndarray) -> bool:
        return all(
            np.array_equal(decode_image(*encode_image(image, "zstd2"), "uint8", SHAPE), image) for _ in range(20)
        )

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trips, images))
