"""The model backends (imgserve/worker/backends): ONNX Runtime and OpenVINO answer as TensorFlow does in fp32,
convert once and load their cache after, rebuild a corrupted cache, and quantize to int8 on a calibration folder.

A tiny CNN (fixed seed) exercises conversion, caching and int8; ResNet50 (random weights, fixed seed, through
model.Classifier as the worker builds it) answers the castle on each backend with TensorFlow's top-5.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgserve import settings
from imgserve.worker.backends import BackendError, build_runner, check
from tools.processes import sample_image_bytes

CONVERTED = ("onnxruntime", "openvino")


def tiny_model():
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(20, activation="softmax")(x))


class Counted:
    """tiny_model, counting its calls: a build from the cache must not need the Keras model."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return tiny_model()


def runner(make, backend: str, cache_dir, precision: str = "fp32", calibration_dir=None):
    from keras.applications.resnet50 import preprocess_input

    return build_runner(
        make, name="tiny", fingerprint="none", backend=backend, precision=precision, threads=2,
        cache_dir=cache_dir, calibration_dir=calibration_dir, preprocess=preprocess_input,
    )  # fmt: skip


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


@pytest.mark.unit
def test_int8_is_refused_without_a_calibration_folder():
    env = {"MODEL_BACKEND": "openvino", "MODEL_PRECISION": "int8"}
    with pytest.raises(settings.SettingsError, match="MODEL_CALIBRATION_DIR"):
        settings.load(env, dotenv=False, role=settings.WORKER)
    with pytest.raises(settings.SettingsError, match="MODEL_BACKEND=onnxruntime or openvino"):
        settings.load(dict(env, MODEL_BACKEND="tensorflow"), dotenv=False, role=settings.WORKER)
    with pytest.raises(BackendError, match="MODEL_CALIBRATION_DIR"):
        check("onnxruntime", "int8", None)


@pytest.mark.unit
def test_backend_settings_are_read(tmp_path):
    env = {"MODEL_BACKEND": "OpenVINO", "MODEL_PRECISION": "int8", "MODEL_CALIBRATION_DIR": str(tmp_path)}
    config = settings.load(dict(env, MODEL_THREADS="2"), dotenv=False, role=settings.WORKER)
    assert (config.model_backend, config.model_precision, config.model_threads) == ("openvino", "int8", 2)
    assert config.model_calibration_dir == tmp_path
    assert settings.load({}, dotenv=False, role=settings.WORKER).model_threads is None
    with pytest.raises(settings.SettingsError, match="MODEL_CALIBRATION_DIR"):
        settings.load(dict(env, MODEL_CALIBRATION_DIR=str(tmp_path / "missing")), dotenv=False, role=settings.WORKER)


@pytest.mark.system
@pytest.mark.parametrize("backend", CONVERTED)
def test_converts_once_then_loads_the_cache(backend, tmp_path):
    images = pixels(4)
    expected = runner(tiny_model(), "tensorflow", tmp_path)(images)
    make = Counted()
    first = runner(make, backend, tmp_path)
    assert first.source == "converted" and make.calls == 1
    again = runner(make, backend, tmp_path)
    assert again.source == "cache" and make.calls == 1 and again.path == first.path
    for built in (first, again):
        got = built(images)
        assert np.abs(got - expected).max() < 1e-5
        assert (np.argsort(-got, 1)[:, :5] == np.argsort(-expected, 1)[:, :5]).all()


@pytest.mark.system
@pytest.mark.parametrize("backend", CONVERTED)
def test_a_corrupted_cache_is_rebuilt(backend, tmp_path, caplog):
    images = pixels(2)
    expected = runner(tiny_model(), backend, tmp_path)(images)
    entry = next(p for p in tmp_path.iterdir() if p.is_dir())
    weights = max((p for p in entry.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rebuilt = runner(Counted(), backend, tmp_path)
    assert rebuilt.source == "converted"
    assert "unusable" in caplog.text
    np.testing.assert_allclose(rebuilt(images), expected, atol=1e-6)
    (entry / "manifest.json").write_text("{not json")
    assert runner(Counted(), backend, tmp_path).source == "converted"


def calibration_folder(path, count: int = 15):
    """Generated photos-like images (smooth gradients, noise), as PNG and JPEG, and one file that is not an image."""
    path.mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        base = np.linspace(0, 255, 160 * 200 * 3).reshape(160, 200, 3) * rng.uniform(0.3, 1, 3)
        image = (base + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(path / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    (path / "notes.txt").write_text("not an image")
    return path


@pytest.mark.system
@pytest.mark.parametrize("backend", CONVERTED)
def test_int8_is_calibrated_and_its_agreement_measured(backend, tmp_path):
    folder = calibration_folder(tmp_path / "calibration")
    make = Counted()
    int8 = runner(make, backend, tmp_path / "cache", "int8", folder)
    assert int8.precision == "int8" and int8.source == "converted"
    agreement = int8.agreement
    assert agreement["images"] == 3  # every fifth of 15 images held out
    assert 0.5 <= agreement["top1"] <= 1 and 0.5 <= agreement["top5"] <= 1
    fp32 = runner(make, backend, tmp_path / "cache")
    assert fp32.source == "cache"
    images = pixels(3, seed=5)
    assert np.abs(int8(images) - fp32(images)).max() < 0.05
    again = runner(make, backend, tmp_path / "cache", "int8", folder)
    assert again.source == "cache" and again.agreement == agreement and make.calls == 1


@pytest.mark.system
@pytest.mark.parametrize("backend", CONVERTED)
def test_resnet50_answers_the_castle_as_tensorflow_does(backend, tmp_path):
    import keras

    from imgserve.imaging.prepare import prepare_image
    from imgserve.worker.model import Classifier

    castle = prepare_image(sample_image_bytes())[None]
    keras.utils.set_random_seed(0)
    reference = Classifier("none").predict(castle)
    keras.utils.set_random_seed(0)
    classifier = Classifier("none", backend, threads=2, cache_dir=tmp_path)
    assert classifier.identity == {"model": "resnet50", "weights": "none", "backend": backend, "precision": "fp32"}
    got = classifier.predict(classifier.prepare(castle))
    diff = float(np.abs(got - reference).max())
    print(f"{backend}: max abs probability difference from TensorFlow {diff:.2e}")
    assert diff < 1e-3
    assert [p["label"] for p in classifier.classify(castle)[0]] == [
        p["label"] for p in top5_of(reference, classifier.labels)
    ]


def top5_of(probabilities: np.ndarray, labels: np.ndarray) -> list[dict]:
    from imgserve.worker.model import top_k

    return top_k(probabilities, labels)[0]
