"""A model worker with a stand-in model: the real Worker, queue and job path; only the model is replaced.

    python -m tools.standin [--seconds-per-image S] [--stats FILE]

With S = 0 (the default) the stand-in answers at once: what is measured is the serving path alone. With
S > 0 it sleeps S per image of each batch, as a GPU would compute, with the GIL free. Either way it answers
top-5 lists in the real format, so the worker does all its own work. Settings come from the environment,
as for run_model_server.py; results are meaningless.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from imgserve import logger, settings
from imgserve.protocol import WorkerQueue
from imgserve.worker.model import TOP_K, keras_labels, top_k


class StandInModel:
    """Stands in for model.Classifier: sleeps `seconds_per_image` per image, then answers top-5 lists
    computed from all-zero probabilities; counts its images and its busy time."""

    device = "stand-in"
    identity = {"model": "stand-in", "weights": "none"}

    def __init__(self, seconds_per_image: float = 0.0) -> None:
        self.seconds_per_image = seconds_per_image
        self.labels = keras_labels()
        self.busy = 0.0
        self.images = 0

    def classify(self, images: np.ndarray, k: int = TOP_K) -> list[list[dict]]:
        started = time.perf_counter()
        if self.seconds_per_image:
            time.sleep(self.seconds_per_image * len(images))
        self.busy += time.perf_counter() - started
        self.images += len(images)
        return top_k(np.zeros((len(images), 1000), np.float32), self.labels, k)


def main(argv: list[str] | None = None) -> int:
    from imgserve.worker.cli import serve_metrics
    from imgserve.worker.pipeline import Worker

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-image", type=float, default=0.0)
    parser.add_argument("--stats", type=Path, help="on exit, write the stand-in's busy seconds and images here")
    args = parser.parse_args(argv)
    config = settings.load(role=settings.WORKER)
    logger.setup("model-standin", config.log_level)
    logger.get("standin").warning("stand-in model (%g s per image): results are meaningless", args.seconds_per_image)
    model = StandInModel(args.seconds_per_image)
    serve_metrics(config)  # the worker's own metrics, as run_model_server.py serves them (METRICS_PORT)
    worker = Worker(config, WorkerQueue.from_settings(config), model)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
    if args.stats:
        args.stats.write_text(json.dumps({"busy_s": model.busy, "images": model.images}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
