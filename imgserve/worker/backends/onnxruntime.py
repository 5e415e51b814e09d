"""ONNX Runtime on the CPU: the SavedModel converted by tf2onnx, int8 by onnxruntime.quantization (static, QDQ)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgserve.worker.backends.convert import INPUT

FILE = "model.onnx"
OPSET = 17


def convert(saved_model: Path, into: Path) -> None:
    """`into`/model.onnx from the SavedModel's serving signature."""
    import tensorflow as tf
    import tf2onnx

    loaded = tf.saved_model.load(str(saved_model))  # held: the signature refers to its variables
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1][INPUT]
    function = tf.function(lambda images: signature(images=images))
    tf2onnx.convert.from_function(
        function, input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name=INPUT)], opset=OPSET,
        output_path=str(into / FILE),
    )  # fmt: skip


def load(entry: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """A run function over an InferenceSession of `entry`/model.onnx with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: one per core
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(entry / FILE), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.asarray(images, np.uint8)})[0]

    run(np.zeros((1, *session.get_inputs()[0].shape[1:3], 3), np.uint8))  # first call allocates
    return run


def quantize(fp32: Path, images: np.ndarray, into: Path) -> None:
    """`into`/model.onnx: static int8 (QDQ, per-channel signed weights, unsigned activations) calibrated on
    `images`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(images, max(1, len(images) // 8)))

        def get_next(self) -> dict | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: batch}

    quantize_static(
        str(fp32 / FILE), str(into / FILE), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
