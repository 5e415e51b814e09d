"""In-process stand-ins that the fault, cluster and recovery tests share: a model that labels each image by
the number written into its pixels (so a test can tell each job ran once and got its own answer), the
project's own Worker on a thread, and jobs malformed in every way the worker must dead-letter."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np

from imgserve import settings
from imgserve.protocol import Job, WorkerQueue
from imgserve.worker.pipeline import Worker


class NumberedModel:
    """Labels an image `image-N`, N read from its first two pixels; counts what it ran."""

    def __init__(self) -> None:
        self.seen: Counter[int] = Counter()
        self.failures = 0  # batches to fail before working

    def classify(self, images: np.ndarray, k: int = 5) -> list[list[dict]]:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected inference failure")
        numbers = [int(image[0, 0, 0]) * 256 + int(image[0, 0, 1]) for image in images]
        self.seen.update(numbers)
        return [[{"label": f"image-{n}", "probability": 1.0}] for n in numbers]


def numbered_job(n: int, timeout: float = 60) -> Job:
    pixels = np.zeros((224, 224, 3), np.uint8)
    pixels[0, 0, :2] = divmod(n, 256)
    return Job.new(pixels, "00000000000f", timeout, codec="zstd")


def worker_config(redis_url: str, queue: str, **extra: object) -> settings.Settings:
    env = dict(REDIS_URL=redis_url, IMAGE_QUEUE=queue, BATCH_SIZE="4", HEARTBEAT_TTL="5", REAP_INTERVAL="1")
    return settings.load(env={**env, **{k.upper(): str(v) for k, v in extra.items()}}, dotenv=False)


class RunningWorker:
    """A Worker on its own thread, for the duration of a `with` block."""

    def __init__(self, config: settings.Settings, model: NumberedModel) -> None:
        self.queue = WorkerQueue.from_settings(config)
        self.worker = Worker(config, self.queue, model)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> RunningWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker stopped"


def good_wire(**changes: object) -> dict:
    wire = json.loads(numbered_job(0).to_json())
    wire.update(changes)
    return wire


MALFORMED = {
    "infinite attempts": json.dumps(good_wire(attempts=1e999)).replace("Infinity", "1e999"),
    "NaN deadline": json.dumps(good_wire(deadline=float("nan"))),
    "deadline as text": json.dumps(good_wire(deadline="soon")),
    "attempts as a fraction": json.dumps(good_wire(attempts=1.5)),
    "shape as text": json.dumps(good_wire(shape="224x224x3")),
    "id as a number": json.dumps(good_wire(id=5)),
    "image as a list": json.dumps(good_wire(image=[1, 2])),
    "a list, not an object": "[1, 2, 3]",
    "nesting too deep": "[" * 100_000 + "]" * 100_000,
    "larger than MAX_JOB_BYTES": json.dumps(good_wire(padding="x" * 300_000)),
}
