"""OpenVINO on the CPU: the SavedModel converted by openvino.convert_model and saved in fp32
(compress_to_fp16=False), computed in fp32 (INFERENCE_PRECISION_HINT, else a CPU with bf16 computes in bf16);
int8 by NNCF post-training quantization."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

FILE = "model.xml"  # and model.bin beside it


def convert(saved_model: Path, into: Path) -> None:
    """`into`/model.xml and model.bin from the SavedModel, weights kept in fp32."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(saved_model)), str(into / FILE), compress_to_fp16=False)


def load(entry: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """A run function over `entry`/model.xml compiled for the CPU, one inference at a time on `threads` threads."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(str(entry / FILE)), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: np.asarray(images, np.uint8)})
        return request.get_output_tensor(0).data.copy()

    shape = compiled.inputs[0].get_partial_shape()
    run(np.zeros((1, shape[1].get_length(), shape[2].get_length(), 3), np.uint8))  # first call allocates
    return run


def quantize(fp32: Path, images: np.ndarray, into: Path) -> None:
    """`into`/model.xml: NNCF's default post-training int8 quantization calibrated on `images`, one at a time."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32 / FILE))
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    quantized = nncf.quantize(model, dataset, subset_size=len(images))
    ov.save_model(quantized, str(into / FILE), compress_to_fp16=False)
