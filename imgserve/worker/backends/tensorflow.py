"""TensorFlow: the Keras model behind a traced function (pixels in, preprocessing inside), on a GPU if one is
visible."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imgserve import logger
from imgserve.worker.backends import Runner
from imgserve.worker.backends.convert import OUTPUT, serving_function

log = logger.get(__name__)


def set_threads(threads: int | None) -> None:
    """Cap TensorFlow's intra-op threads (None: every core). Only effective before TensorFlow's first op."""
    if threads is None:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # TensorFlow already ran an op in this process: its pools are fixed
        log.warning("MODEL_THREADS=%d not applied to TensorFlow: it was already initialized", threads)


def build(model, preprocess: Callable | None, input_size: tuple[int, int], threads: int | None) -> Runner:
    """A Runner whose prepare() copies a batch to the model's device (so a GPU's copy overlaps compute)."""
    import tensorflow as tf

    set_threads(threads)
    device = "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
    infer = serving_function(model, preprocess, input_size)

    def prepare(images: np.ndarray):
        with tf.device(device):
            return tf.identity(images)

    def run(images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            images = prepare(images)
        return infer(images)[OUTPUT].numpy()

    run(np.zeros((1, *input_size, 3), np.uint8))  # trace once now, not on the first request
    return Runner("tensorflow", "fp32", run, prepare=prepare, threads=threads, model=model)
