"""Several models side by side (README "Serve your own model"): the models file refused with its reason, and
real processes serving a tiny Keras CNN saved as .keras (64x64 input, 3 labels) beside ResNet50 (random weights)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from imgserve import settings
from tools.processes import sample_image_bytes, server_env, start_web, start_worker, wait_until

TINY_LABELS = ["cat", "dog", "bird"]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tiny_keras_model(path: Path) -> None:
    """A small CNN classifier, 64x64 RGB in, 3 classes out, saved as a .keras file as a fine-tuned model would be."""
    import keras

    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(len(TINY_LABELS), activation="softmax")(x)).save(path)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('["bad name!"]\nsource = "keras:ResNet50"\n', "letters, digits"),
        ('[m]\nsource = "somewhere/model.onnx"\n', "unknown source 'somewhere/model.onnx'"),
        ('[m]\nsource = "keras:not a class"\n', "keras.applications class name"),
        ('[m]\nlabels = "missing.txt"\n', "no file"),
        ('[m]\npreprocess = "inception"\n', "preprocess 'inception' is not one of caffe, tf, torch, none"),
        ('[m]\ninput_size = "big"\n', "input_size must be a whole number"),
        ('[m]\ncolour = "red"\n', "unknown key(s) colour"),
        ('[m]\nbackend = "tensorrt"\n', "backend 'tensorrt' is not one of tensorflow, onnxruntime, openvino"),
        ('[m]\nprecision = "fp16"\n', "precision 'fp16' is not one of fp32, int8"),
        ('[m]\nbackend = "tensorflow"\nprecision = "int8"\n', "precision int8 needs backend onnxruntime"),
        ("[m\n", "cannot read it as TOML"),
        ("", "names no model"),
    ],
)
def test_a_bad_models_file_is_refused_with_its_reason(tmp_path, text, reason):
    path = write(tmp_path, "models.toml", text)
    with pytest.raises(settings.SettingsError) as refused:
        settings.load(env={"MODELS_FILE": str(path)}, dotenv=False, role=settings.WEB)
    assert "MODELS_FILE" in str(refused.value) and reason in str(refused.value)


@pytest.mark.unit
def test_no_models_file_is_todays_single_resnet50_and_default_model_must_be_in_the_file(tmp_path):
    config = settings.load(env={"MODELS_FILE": str(tmp_path / "absent.toml"), "MODEL_WEIGHTS": "none"}, dotenv=False)
    [(name, spec)] = config.models().items()
    assert (name, spec.source, spec.weights, spec.preprocess) == ("resnet50", "keras:ResNet50", "none", "caffe")
    path = write(tmp_path, "models.toml", '[resnet50]\n[other]\nsource = "keras:MobileNetV3Small"\n')
    assert settings.load(env={"MODELS_FILE": str(path)}, dotenv=False).default_model_name() == "resnet50"
    with pytest.raises(settings.SettingsError, match="DEFAULT_MODEL=third names no model .* resnet50, other"):
        settings.load(env={"MODELS_FILE": str(path), "DEFAULT_MODEL": "third"}, dotenv=False)


@pytest.mark.system
def test_labels_must_match_the_outputs_and_a_model_with_its_own_preprocessing_loads(tmp_path):
    from imgserve.models import load_models
    from imgserve.worker.model import Classifier, ModelError

    tiny_keras_model(tmp_path / "tiny.keras")
    write(tmp_path, "two.txt", "cat\ndog\n")
    models = load_models(write(tmp_path, "models.toml", """
[tiny]
source = "tiny.keras"
labels = "two.txt"

[mobile]
source = "keras:MobileNetV3Small"
weights = "none"
preprocess = "none"
input_size = 96
"""))  # fmt: skip
    with pytest.raises(ModelError, match="2 labels .* for 3 outputs"):
        Classifier(models["tiny"])
    mobile = Classifier(models["mobile"])
    assert mobile.card["input_size"] == 96 and mobile.card["labels"] == 1000 and mobile.card["preprocess"] == "none"


@pytest.mark.unit
def test_int8_in_a_table_needs_a_converted_backend_and_calibration_images(tmp_path):
    path = write(tmp_path, "models.toml", '[m]\nprecision = "int8"\n')
    with pytest.raises(settings.SettingsError, match=r'precision = "int8" in \[m\] needs MODEL_BACKEND=onnxruntime'):
        settings.load(env={"MODELS_FILE": str(path)}, dotenv=False, role=settings.WORKER)
    path.write_text('[m]\nprecision = "int8"\nbackend = "openvino"\n')
    with pytest.raises(settings.SettingsError, match=r'precision = "int8" in \[m\] needs MODEL_CALIBRATION_DIR'):
        settings.load(env={"MODELS_FILE": str(path)}, dotenv=False, role=settings.WORKER)


@pytest.mark.unit
def test_a_tables_backend_runs_its_model_with_its_preprocessing_in_the_graph(tmp_path):
    """The table's backend replaces MODEL_BACKEND's; the converted model answers as TensorFlow does."""
    from imgserve.models import load_models
    from imgserve.worker.model import Classifier

    tiny_keras_model(tmp_path / "tiny.keras")
    write(tmp_path, "tiny-labels.txt", "\n".join(TINY_LABELS) + "\n")
    text = '[tiny]\nsource = "tiny.keras"\nlabels = "tiny-labels.txt"\npreprocess = "tf"\n'
    models = load_models(write(tmp_path, "models.toml", text + 'backend = "onnxruntime"\n'))
    converted = Classifier(models["tiny"], "tensorflow", cache_dir=tmp_path / "cache")
    reference = Classifier(load_models(write(tmp_path, "models.toml", text))["tiny"], "tensorflow")
    assert converted.card["backend"] == "onnxruntime" and reference.card["backend"] == "tensorflow"
    assert converted.card["precision"] == "fp32" and converted.runner.source == "converted"
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(converted.predict(images), reference.predict(images), atol=1e-4)


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory):
    """Redis, a ResNet50 worker (random weights), a worker of the tiny .keras model and a web server, as the README's
    example serves them from one models file."""
    folder = tmp_path_factory.mktemp("own-model")
    tiny_keras_model(folder / "tiny.keras")
    write(folder, "tiny-labels.txt", "\n".join(TINY_LABELS) + "\n")
    models = write(folder, "models.toml", """
[resnet50]
source = "keras:ResNet50"
weights = "none"

[tiny]
source = "tiny.keras"
labels = "tiny-labels.txt"
preprocess = "tf"
""")  # fmt: skip
    env = server_env(redis_server.url, f"models-{uuid.uuid4().hex[:6]}", MODELS_FILE=models)
    workers = {name: start_worker(env, "--model", name) for name in ("resnet50", "tiny")}
    web = start_web(env).wait_ready()
    yield env, workers, web, folder
    web.stop()
    for worker in workers.values():
        worker.stop()


def predict(url: str, **params: object) -> requests.Response:
    files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
    return requests.post(f"{url}/predict", files=files, params=params, timeout=60)


@pytest.mark.system
def test_a_keras_file_with_its_labels_is_served_beside_resnet50(served):
    env, workers, web, _ = served
    listed = {m["name"]: m for m in requests.get(f"{web.url}/models", timeout=10).json()["models"]}
    assert list(listed) == ["resnet50", "tiny"]
    assert listed["tiny"]["workers"] == 1 and listed["tiny"]["card"]["input_size"] == 64
    assert listed["tiny"]["card"]["labels"] == 3 and listed["tiny"]["card"]["source"] == "tiny.keras"
    assert listed["resnet50"]["card"]["input_size"] == 224 and listed["resnet50"]["card"]["labels"] == 1000
    tiny = predict(web.url, model="tiny", top_k=3).json()
    assert tiny["model"] == "tiny" and sorted(p["label"] for p in tiny["predictions"]) == sorted(TINY_LABELS)
    default = predict(web.url).json()
    assert default["model"] == "resnet50" and len(default["predictions"]) == 5
    refused = predict(web.url, model="tiny", top_k=4)
    assert refused.status_code == 400 and "from 1 to 3" in refused.json()["error"]
    unknown = predict(web.url, model="nope")
    assert unknown.status_code == 404 and "resnet50, tiny" in unknown.json()["error"]


@pytest.mark.system
def test_a_worker_never_runs_another_models_jobs(served):
    _, workers, web, _ = served
    ids = {}
    for model in ("tiny", "resnet50", "tiny", "resnet50"):
        files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
        answer = requests.post(f"{web.url}/jobs", files=files, params={"model": model}, timeout=30)
        assert answer.status_code == 202 and answer.json()["model"] == model
        ids[answer.json()["id"]] = model

    def done() -> dict:
        statuses = {i: requests.get(f"{web.url}/jobs/{i}", timeout=10).json() for i in ids}
        return statuses if all(s["status"] == "done" for s in statuses.values()) else {}

    statuses = wait_until(done, 60, "the submitted jobs to be done")
    assert {i: s["model"] for i, s in statuses.items()} == ids
    assert "tiny" not in workers["resnet50"].log and "model tiny" in workers["tiny"].log


@pytest.mark.system
def test_a_model_removed_from_the_file_disappears_when_its_workers_stop(served):
    env, workers, web, folder = served
    only_resnet = write(folder, "resnet-only.toml", '[resnet50]\nweights = "none"\n')
    other = start_web({**env, "MODELS_FILE": str(only_resnet)}).wait_ready()
    try:
        names = lambda url: [m["name"] for m in requests.get(f"{url}/models", timeout=10).json()["models"]]  # noqa: E731
        assert names(other.url) == ["resnet50", "tiny"]  # its worker registered it: no web restart needed
        assert predict(other.url, model="tiny").json()["model"] == "tiny"
        workers["tiny"].stop()
        wait_until(lambda: names(other.url) == ["resnet50"], 30, "tiny to leave /models")
        # The first web's file still names it: known, with no worker (its /models reads the cards afresh) ...
        tiny = requests.get(f"{web.url}/models", timeout=10).json()["models"][1]
        assert tiny["name"] == "tiny" and tiny["workers"] == 0 and tiny["card"] is None
        refused = predict(web.url, model="tiny")  # ... and only a worker can tell its input size: a 503
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] and "no worker serves model tiny" in refused.json()["error"]
        assert predict(other.url, model="tiny").status_code == 404
    finally:
        other.stop()
