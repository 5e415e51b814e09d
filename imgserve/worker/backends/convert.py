"""The Keras model, its preprocessing in front, as a SavedModel that ONNX Runtime and OpenVINO convert from.

The SavedModel is what Keras 3's `model.export()` writes, with one difference: its serving function takes uint8
pixels (`images`, N x H x W x 3) and applies the model's preprocessing before the model, so every backend runs the
whole path from pixels to `probabilities`. tf2onnx's `from_keras` does not work with Keras 3, hence the
SavedModel; it lives in a temporary folder only while the backends convert it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

INPUT, OUTPUT = "images", "probabilities"


def serving_function(model, preprocess: Callable | None, input_size: tuple[int, int]):
    """A traced tf.function: uint8 pixels (`images`) -> {`probabilities`} with the preprocessing inside."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *input_size, 3], tf.uint8, name=INPUT)

    def serve(images):
        pixels = tf.cast(images, tf.float32)
        return {OUTPUT: model(preprocess(pixels) if preprocess else pixels, training=False)}

    return tf.function(serve, input_signature=[spec])


@contextmanager
def saved_model(model, preprocess: Callable | None, input_size: tuple[int, int]) -> Iterator[Path]:
    """A SavedModel of serving_function, written as Keras 3's model.export() writes one (keras.export.ExportArchive,
    which names the variables so that converters find them), in a temporary folder removed on exit."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([None, *input_size, 3], tf.uint8, name=INPUT)
    archive.add_endpoint("serve", serving_function(model, preprocess, input_size), input_signature=[spec])
    with tempfile.TemporaryDirectory(prefix="imgserve-savedmodel-") as folder:
        archive.write_out(folder, verbose=False)
        yield Path(folder)
