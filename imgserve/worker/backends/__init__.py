"""Inference backends: one Keras model run by TensorFlow, ONNX Runtime or OpenVINO, in fp32 or int8.

    runner = build_runner(make_model, name="resnet50", fingerprint="file:0123abcd4567", backend="openvino",
                          preprocess=preprocess_input, cache_dir=Path("~/.cache/imgserve"))
    probabilities = runner(images)  # uint8 (N, H, W, 3) in, float32 (N, classes) out

A Runner takes PIXELS, not preprocessed floats: the model's preprocessing is traced into the graph every backend
runs (convert.serving_module), so all backends receive what the worker decodes and no backend needs TensorFlow's
preprocessing at inference time. int8 quantization is calibrated on the same uint8 pixels.

`make_model` is a Keras model or a function returning one; it is called only when needed: by the tensorflow
backend, or to convert when the cache has no usable copy. ONNX Runtime and OpenVINO files are cached under
`cache_dir` keyed by model name, weights fingerprint, backend, precision and input size (int8 also by the
calibration images): a later start loads the cache and never builds the Keras model (cache.py). Only the chosen
backend's runtime is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgserve import logger
from imgserve.models import BACKENDS, PRECISIONS
from imgserve.worker.backends import cache

log = logger.get(__name__)


class BackendError(RuntimeError):
    """A backend cannot be built as asked; the message names the setting to change."""


def _same(images: np.ndarray) -> np.ndarray:
    return images


@dataclass
class Runner:
    """A compiled model: `runner(images)` maps uint8 (N, H, W, 3) pixels to float32 probabilities (N, classes)."""

    backend: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]
    prepare: Callable[[np.ndarray], object] = _same  # the worker's feeder thread calls it (a GPU copy for TF)
    threads: int | None = None  # intra-op threads; None: every core
    source: str = "memory"  # "converted" (built now), "cache" (loaded from cache_dir) or "memory" (TensorFlow)
    path: Path | None = None  # the cache entry, for converted backends
    agreement: dict | None = None  # int8: top-1/top-5 agreement with fp32 on held-out calibration images
    model: object | None = None  # the Keras model, when it was built
    info: dict = field(default_factory=dict)

    def __call__(self, images) -> np.ndarray:
        return self.run(images)


def check(backend: str, precision: str, calibration_dir: Path | None) -> None:
    """Refuse combinations that cannot be built, naming the settings (MODEL_BACKEND, MODEL_PRECISION, ...)."""
    if backend not in BACKENDS:
        raise BackendError(f"MODEL_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise BackendError(f"MODEL_PRECISION must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and backend == "tensorflow":
        raise BackendError("MODEL_PRECISION=int8 needs MODEL_BACKEND=onnxruntime or openvino (TensorFlow runs fp32)")
    if precision == "int8" and calibration_dir is None:
        raise BackendError(
            "MODEL_PRECISION=int8 needs MODEL_CALIBRATION_DIR: a folder of your own images (a few hundred, like "
            "the uploads you serve) to calibrate the quantization on"
        )


def build_runner(
    make_model: object | Callable[[], object],
    *,
    name: str,
    fingerprint: str,
    backend: str = "tensorflow",
    precision: str = "fp32",
    threads: int | None = None,
    cache_dir: Path | None = None,
    calibration_dir: Path | None = None,
    preprocess: Callable | None = None,
    input_size: tuple[int, int] = (224, 224),
) -> Runner:
    """The runner for `backend` at `precision` (see the module docstring).

    `fingerprint` names the weights (model.weights_identity); `preprocess` is a TensorFlow-traceable function of a
    float32 pixel batch (None: the model takes pixels as they are); `threads` caps intra-op threads."""
    check(backend, precision, calibration_dir)
    model = _lazy(make_model)
    if backend == "tensorflow":
        from imgserve.worker.backends import tensorflow

        return tensorflow.build(model(), preprocess, input_size, threads)
    runtime = importlib.import_module(f"imgserve.worker.backends.{backend}")
    key = cache.Key(name, fingerprint, backend, "fp32", input_size)
    where = cache_dir or cache.default_dir()

    def convert(into: Path) -> dict:
        from imgserve.worker.backends import convert as conversion

        with conversion.saved_model(model(), preprocess, input_size) as saved:
            runtime.convert(saved, into)
        return {}

    fp32 = _cached(runtime, where, key, convert, threads, backend, "fp32")
    if precision == "fp32":
        fp32.model = model.built
        return fp32
    from imgserve.worker.backends import quantize

    return quantize.int8_runner(runtime, fp32, where, key, calibration_dir, threads)


def _cached(runtime, where: Path, key: cache.Key, build: Callable[[Path], dict], threads, backend, precision) -> Runner:
    run, path, source, info = cache.load_or_build(where, key, build, lambda path: runtime.load(path, threads))
    return Runner(backend, precision, run, threads=threads, source=source, path=path, info=info)


class _lazy:
    """`make_model` built at most once, on first call."""

    def __init__(self, make_model: object | Callable[[], object]) -> None:
        self._make = make_model
        self.built = None if callable(make_model) and not hasattr(make_model, "layers") else make_model

    def __call__(self) -> object:
        if self.built is None:
            self.built = self._make()
        return self.built
