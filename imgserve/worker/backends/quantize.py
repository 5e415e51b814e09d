"""int8: post-training quantization calibrated on the user's images, and its agreement with fp32.

The images of MODEL_CALIBRATION_DIR are prepared as uploads are (imaging.prepare.prepare_image), at the model's
input size. Every fifth is held out; the others (at most MAX_CALIBRATION) calibrate. On the held-out images the
int8 model is compared with the fp32 one: top-1 agreement is the share of images whose most probable class is the
same; top-5 agreement is the mean share of fp32's five classes found among int8's five. The figures go into the
cache's manifest, so they are logged at every start, and are on the Runner (`agreement`) for the bench.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from imgserve import logger
from imgserve.worker.backends import BackendError, Runner, cache

log = logger.get(__name__)

MAX_CALIBRATION = 300
HOLD_OUT_EVERY = 5


def calibration_images(folder: Path, size: tuple[int, int] = (224, 224)) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration, held-out, digest): the folder's images as uint8 (N, H, W, 3) batches of `size` (height,
    width); files that are not images are skipped. Raises BackendError naming MODEL_CALIBRATION_DIR when fewer
    than two are usable."""
    from imgserve.imaging.prepare import prepare_image

    if not folder.is_dir():
        raise BackendError(f"MODEL_CALIBRATION_DIR={folder} is not a folder")
    sha, images = hashlib.sha256(), []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            images.append(prepare_image(data, size=(size[1], size[0])))  # prepare_image takes (width, height)
        except Exception as exc:  # not an image, or one uploads would refuse: not a calibration image either
            log.debug("calibration: skipped %s (%s)", path.name, exc)
            continue
        sha.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
    if len(images) < 2:
        raise BackendError(f"MODEL_CALIBRATION_DIR={folder} holds {len(images)} usable image(s); it needs at least 2")
    held = np.arange(len(images)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    held[-1] = held[-1] or not held.any()
    stack = np.stack(images)
    return stack[~held][:MAX_CALIBRATION], stack[held], sha.hexdigest()[:12]


def agreement(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """Top-1 and top-5 agreement of two probability batches, and their largest difference."""
    top1 = float(np.mean(fp32.argmax(1) == int8.argmax(1)))
    five_a, five_b = np.argsort(-fp32, 1)[:, :5], np.argsort(-int8, 1)[:, :5]
    top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(five_a, five_b, strict=True)]))
    return {"images": len(fp32), "top1": top1, "top5": top5, "max_abs_diff": float(np.abs(fp32 - int8).max())}


def int8_runner(runtime, fp32: Runner, where: Path, key: cache.Key, folder: Path, threads: int | None) -> Runner:
    """The int8 Runner: cached, else quantized from `fp32`'s files and measured against `fp32`."""
    calibration, held_out, calibration_digest = calibration_images(folder, key.input_size)

    def build(into: Path) -> dict:
        log.info("quantizing to int8 on %d calibration images from %s", len(calibration), folder)
        runtime.quantize(fp32.path, calibration, into)
        int8 = runtime.load(into, threads)
        return {"agreement": agreement(fp32(held_out), int8(held_out))}

    key8 = replace(key, precision="int8", calibration=calibration_digest)
    run, path, source, info = cache.load_or_build(where, key8, build, lambda entry: runtime.load(entry, threads))
    runner = Runner(fp32.backend, "int8", run, threads=threads, source=source, path=path, info=info)
    runner.agreement = info.get("agreement")
    if runner.agreement:
        a = runner.agreement
        log.info(
            "int8 %s agrees with fp32 on %d held-out images of %s: top-1 %.1f%%, top-5 %.1f%%",
            fp32.backend, a["images"], folder, 100 * a["top1"], 100 * a["top5"],
        )  # fmt: skip
    return runner
