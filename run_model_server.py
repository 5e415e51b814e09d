"""The model worker: takes batches of jobs off the Redis queue, runs ResNet50, writes results.

    python run_model_server.py [--batch-size N] [--batch-wait-ms MS] [--weights imagenet|none|PATH] ...

Settings come from the environment / `.env` (see settings.py); flags override them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import uuid

import numpy as np
from prometheus_client import Counter, Histogram, start_http_server

import logger
import settings as settings_module
from redis_protocol import REDIS_UNAVAILABLE, DeadLetter, Job, JobError, JobQueue

# Outcomes: done (result published), expired (deadline passed before inference, dropped), failed (inference
# raised; the job goes back to the queue), requeued (returned to the queue after a failure, or from a dead
# worker by this worker's reaper), dead_lettered (bad job, or out of attempts).
JOB_OUTCOMES = ("done", "expired", "failed", "requeued", "dead_lettered")
JOBS = Counter("worker_jobs_total", "Jobs handled by this worker, by outcome", ["outcome"])
for _outcome in JOB_OUTCOMES:
    JOBS.labels(_outcome)  # every outcome is exported from the start, at 0
BATCH_SIZE = Histogram("worker_batch_size", "Jobs per claimed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # big CPU batches take > 10 s
INFERENCE = Histogram("worker_inference_seconds", "Model time per batch", buckets=INFERENCE_BUCKETS)

log = logger.get("worker")


class Worker:
    """Claim, predict, publish, acknowledge; plus a heartbeat thread that also runs the reaper."""

    def __init__(self, settings: settings_module.Settings, queue: JobQueue, classifier) -> None:
        self.settings = settings
        self.queue = queue
        self.classifier = classifier
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self._finished = threading.Event()  # the heartbeat outlives `stopping` until the last batch is done
        self._resume = False  # the last claim failed: the next one takes back what is in the slot

    def run(self) -> None:
        """Serve until `stop()`; survives Redis outages by retrying with backoff."""
        self._retry(lambda: self.queue.register(self.id, self.settings.heartbeat_ttl), "register")
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker %s waiting for jobs on %r", self.id, self.queue.keys.queue)
        while not self.stopping.is_set():
            batch = self._retry(self._claim, "claim a batch")
            if batch:
                self.process(batch)
        self._finished.set()
        self._retry(lambda: self.queue.unregister(self.id), "unregister", give_up_after=10)
        log.info("worker %s stopped", self.id)

    def stop(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: finishing the current batch, then exiting")
        self.stopping.set()

    def _claim(self) -> list[bytes]:
        """Claim a batch; after a failed claim, start with what that claim may have moved into the slot."""
        wait = self.settings.batch_wait_ms / 1000
        try:
            batch = self.queue.claim_batch(self.id, self.settings.batch_size, wait, block=1.0, resume=self._resume)
        except REDIS_UNAVAILABLE:
            self._resume = True
            raise
        self._resume = False
        return batch

    def process(self, raws: list[bytes]) -> None:
        """Run one claimed batch through the model, then publish every outcome and acknowledge the batch."""
        BATCH_SIZE.observe(len(raws))
        jobs, pixels, dead = [], [], []
        now = time.time()
        for raw in raws:
            try:
                job, image = self._read(raw)
            except JobError as exc:
                dead.append(DeadLetter(raw, str(exc), self.settings.max_job_bytes))
                continue
            if job.deadline < now:
                JOBS.labels("expired").inc()
                log.info("dropped expired job %s (%.1f s past its deadline)", job.id, now - job.deadline)
                continue
            jobs.append(job)
            pixels.append(image)
        results = self._predict(jobs, pixels) if jobs else []
        if results is None:
            return
        if self._retry(lambda: self.queue.finish_batch(self.id, results, dead), "publish results") is None:
            return  # stopping during an outage: the batch stays claimed and unregister() requeues it
        JOBS.labels("done").inc(len(results))
        JOBS.labels("dead_lettered").inc(len(dead))
        for letter in dead:
            log.warning("dead-lettered a job: %s", letter.reason)
        log.debug("batch done: %d jobs: %s", len(results), " ".join(job.id for job, _ in results))

    def _read(self, raw: bytes) -> tuple[Job, np.ndarray]:
        """A queued element as a job and its pixels; JobError for anything that is not a valid job.

        Queued elements are untrusted: an error this code did not foresee must cost one dead letter,
        never the worker.
        """
        try:
            job = Job.from_json(raw, self.settings.max_job_bytes)
            return job, job.pixels()
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.exception("unexpected error reading a job")
            raise JobError(f"unreadable job ({type(exc).__name__})") from None

    def _predict(self, jobs: list[Job], pixels: list[np.ndarray]) -> list[tuple[Job, dict]] | None:
        started = time.perf_counter()
        try:
            top5 = self.classifier.classify(np.stack(pixels))
        except Exception:
            log.exception("inference failed for a batch of %d; returning it to the queue", len(jobs))
            JOBS.labels("failed").inc(len(jobs))
            released = self._retry(lambda: self.queue.release(self.id, "inference failed"), "requeue a failed batch")
            if released:
                count_released(*released)
            return None
        seconds = time.perf_counter() - started
        INFERENCE.observe(seconds)
        log.info("predicted a batch of %d in %.0f ms", len(jobs), seconds * 1000)
        return [(job, {"success": True, "predictions": preds}) for job, preds in zip(jobs, top5, strict=True)]

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ttl / 3
        next_reap = 0.0
        while not self._finished.wait(0 if next_reap == 0 else interval):
            try:
                self.queue.heartbeat(self.id, self.settings.heartbeat_ttl)
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.settings.reap_interval
                    workers, requeued, dead_lettered = self.queue.reap()
                    count_released(requeued, dead_lettered)
                    if workers:
                        log.warning(
                            "reaped %d dead worker(s): %d job(s) requeued, %d dead-lettered",
                            workers,
                            requeued,
                            dead_lettered,
                        )
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any error, or a live worker gets reaped
                log.warning("heartbeat or reaper failed (%s: %s); retrying", type(exc).__name__, exc)

    def _retry(self, action, what: str, give_up_after: float | None = None):
        """Run `action` until Redis answers; give up after `give_up_after` s (None: only when stopping)."""
        delay, started = 0.1, time.monotonic()
        while True:
            try:
                return action()
            except REDIS_UNAVAILABLE as exc:
                elapsed = time.monotonic() - started
                if give_up_after is not None and elapsed > give_up_after:
                    log.error("could not %s for %.0f s (%s); giving up", what, elapsed, exc)
                    return None
                if give_up_after is None and self.stopping.is_set():
                    return None
                log.warning("Redis unavailable, cannot %s (%s); retrying in %.1f s", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def count_released(requeued: int, dead_lettered: int) -> None:
    """Count jobs this worker moved out of a processing list: back to the queue or to the dead letters."""
    JOBS.labels("requeued").inc(requeued)
    JOBS.labels("dead_lettered").inc(dead_lettered)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="overrides REDIS_URL")
    parser.add_argument("--queue", dest="image_queue", help="overrides IMAGE_QUEUE")
    parser.add_argument("--batch-size", help="overrides BATCH_SIZE")
    parser.add_argument("--batch-wait-ms", help="overrides BATCH_WAIT_MS")
    parser.add_argument("--weights", dest="model_weights", help="overrides MODEL_WEIGHTS: imagenet, none or a path")
    parser.add_argument("--metrics-port", help="overrides METRICS_PORT (0 turns the metrics endpoint off)")
    parser.add_argument("--log-level", help="overrides LOG_LEVEL")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = settings_module.load(**vars(args))
    except settings_module.SettingsError as exc:
        print(f"run_model_server.py: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.setup("model", config.log_level)
    from model import Classifier, WeightsError

    try:
        classifier = Classifier(config.model_weights)
    except WeightsError as exc:
        log.error("%s", exc)
        return 3
    log.info(
        "model ResNet50 on %s, weights %s, batch size %d, batch wait %g ms, Redis %s",
        classifier.device,
        config.model_weights,
        config.batch_size,
        config.batch_wait_ms,
        config.redis_url_safe,
    )
    if config.metrics_port:
        try:
            start_http_server(config.metrics_port, addr=config.web_host)
            log.info("metrics on http://%s:%d/metrics", config.web_host, config.metrics_port)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s); this worker serves no metrics", config.metrics_port, exc)
    queue = JobQueue.from_settings(config)
    worker = Worker(config, queue, classifier)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
