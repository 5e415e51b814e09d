"""Phase 15 of `make bench` (`python -m tools.bench --backends-only` alone): the model backends side by side.

For each backend and precision (MODEL_BACKEND, MODEL_PRECISION): the raw rate of model.Classifier.predict alone at
batch 1 and at each batch size up to BATCH_SIZE (the best kept), then the whole stack at saturation with one worker
on that backend, as a ratio of that backend's own best raw rate and of TensorFlow's stack rate. Random ResNet50
weights (a fixed seed); int8 is calibrated on a generated folder (crops, flips and tints of the sample image).
Converted models go to a temporary MODEL_CACHE_DIR that the bench fills and its workers then load.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

COMBOS = (
    ("tensorflow", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)
CALIBRATION_IMAGES = 40


def calibration_folder(folder: Path, image: bytes, count: int = CALIBRATION_IMAGES) -> Path:
    """`count` JPEGs made from `image`: random crops, mirrored or not, tinted; a stand-in for the user's photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    source = Image.open(io.BytesIO(image)).convert("RGB")
    width, height = source.size
    for i in range(count):
        w, h = (int(d * rng.uniform(0.4, 1)) for d in (width, height))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = np.asarray(source.crop((x, y, x + w, y + h)), np.float32) * rng.uniform(0.7, 1.2, 3)
        crop = crop[:, ::-1] if i % 2 else crop
        Image.fromarray(crop.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def raw_rates(classifier, sizes: list[int], repeats: int) -> dict[int, float]:
    """Images/s of classifier.predict per batch size (median of `repeats` after one warm-up call)."""
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        images = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
        classifier.predict(images)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.predict(images)
            times.append(time.perf_counter() - started)
        out[size] = size / float(np.median(times))
    return out


def measure_raw(report, repeats: int, batch_size: int, cache_dir: Path, calibration: Path) -> dict:
    """Build each backend's Classifier (converting into `cache_dir`) and time it alone."""
    import keras

    from imgserve.worker.model import Classifier

    sizes = sorted({1, 8, 16, batch_size})
    results = {}
    for backend, precision in COMBOS:
        keras.utils.set_random_seed(0)
        started = time.perf_counter()
        classifier = Classifier("none", backend, precision, None, calibration, cache_dir)
        built = time.perf_counter() - started
        rates = raw_rates(classifier, sizes, repeats)
        best = max(rates, key=rates.get)
        results[f"{backend} {precision}"] = {
            "backend": backend, "precision": precision, "build_s": built, "by_batch": rates,
            "batch1": rates[1], "best": rates[best], "best_batch": best, "agreement": classifier.runner.agreement,
        }  # fmt: skip
        report.say(
            f"   {backend:>11} {precision}: batch 1 {rates[1]:6.2f} images/s, best {rates[best]:6.2f} at batch {best} "
            f"(all: {', '.join(f'{n}: {r:.2f}' for n, r in rates.items())}); built in {built:.0f} s"
        )
        del classifier
    return results


def measure_stack(report, plan, client, env: dict, counter, cache_dir: Path, calibration: Path, results: dict) -> None:
    """Saturation of the whole stack with one worker on each backend, one after the other, one web server."""
    from tools.bench import saturation
    from tools.load import CpuMeter, Web, redis_pid, running, start_worker, with_children
    from tools.queues import Queues

    queue = Queues.on(counter, env["IMAGE_QUEUE"])
    with running(Web(env).wait_ready()) as web:
        for _ in range(3):
            client.post(web.url)
        for figures in results.values():
            worker_env = dict(
                env, MODEL_BACKEND=figures["backend"], MODEL_PRECISION=figures["precision"],
                MODEL_CALIBRATION_DIR=str(calibration), MODEL_CACHE_DIR=str(cache_dir),
            )  # fmt: skip
            with running(start_worker(worker_env)) as worker:
                components = {
                    "web (gunicorn)": with_children(web.process.pid),
                    "workers": [worker.process.pid],
                    "redis": [redis_pid(counter)],
                }
                load = saturation(plan, client, web, [worker], counter, CpuMeter(components), queue)
            figures["stack"] = load.rate
            figures["ratio"] = load.rate / figures["best"]
            report.say(
                f"   {figures['backend']:>11} {figures['precision']}: stack {load.rate:6.2f} images/s "
                f"({load.errors} errors) = {figures['ratio']:.3f} of its best raw rate"
            )


def table(report, results: dict) -> None:
    """The side-by-side table, each stack rate also as a multiple of TensorFlow's."""
    base = results["tensorflow fp32"].get("stack")
    report.say("")
    report.say("   | backend | precision | raw batch 1 | raw best (batch) | stack | stack / own raw | vs TensorFlow |")
    report.say("   |---|---|---|---|---|---|---|")
    for f in results.values():
        stack = f.get("stack")
        cells = [f"{stack:.2f}", f"{f['ratio']:.3f}", f"{stack / base:.2f}x"] if stack and base else ["-"] * 3
        report.say(
            f"   | {f['backend']} | {f['precision']} | {f['batch1']:.2f} | {f['best']:.2f} ({f['best_batch']}) | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    for f in results.values():
        if f["agreement"]:
            a = f["agreement"]
            report.say(
                f"   {f['backend']} int8 vs fp32 on {a['images']} held-out calibration images: top-1 agreement "
                f"{100 * a['top1']:.0f}%, top-5 {100 * a['top5']:.0f}% (random weights: see README)"
            )


def backends(report, plan, client, env: dict, counter, image: bytes, batch_size: int) -> dict:
    """(15) Raw rate per backend and precision, then the stack's saturation on each; returns the figures."""
    report.section(
        f"15. Backends: the model alone per backend and precision (images/s), then the stack at saturation "
        f"({plan.clients} clients, one worker each); load average {os.getloadavg()[0]:.2f} at start"
    )
    with tempfile.TemporaryDirectory(prefix="imgserve-bench-backends-") as tmp:
        cache_dir, calibration = Path(tmp) / "cache", calibration_folder(Path(tmp) / "calibration", image)
        results = measure_raw(report, plan.repeats, batch_size, cache_dir, calibration)
        measure_stack(report, plan, client, env, counter, cache_dir, calibration, results)
    table(report, results)
    report.say(f"   load average {os.getloadavg()[0]:.2f} at the end")
    return results


def goals(report, results: dict) -> None:
    """Issue 24's goals: OpenVINO's stack >= 1.5x TensorFlow's in fp32 and >= 2.5x in int8; the fastest backend's
    stack >= 0.90 of its own raw rate."""
    base = results["tensorflow fp32"].get("stack")
    for key, goal in (("openvino fp32", 1.5), ("openvino int8", 2.5)):
        value = results[key].get("stack", 0) / base if base else 0.0
        report.goal(f"stack on {key} / stack on TensorFlow", value, f">= {goal}x", value >= goal, f"{value:.2f}x")
    fastest = max(results.values(), key=lambda f: f.get("stack", 0))
    ratio = fastest.get("ratio", 0.0)
    name = f"{fastest['backend']} {fastest['precision']}"
    report.goal(f"stack / own raw rate, fastest ({name})", ratio, ">= 0.90", ratio >= 0.90, f"{ratio:.3f}")
