"""The model worker's pipeline: takes batches of jobs off the Redis queue, runs the model, writes results.

cli.py starts it (`python run_model_server.py`); this module is the Worker and its metrics.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from queue import Empty, Queue

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from imgserve import logger, settings
from imgserve.imaging import IMAGE_SHAPE
from imgserve.protocol import REDIS_UNAVAILABLE, SLOTS, SUBMITTED, Claimer, DeadLetter, Job, JobError, WorkerQueue
from imgserve.protocol.backoff import Backoff, retry
from imgserve.protocol.priority import PRIORITIES

# Outcomes: done (result published), expired (deadline passed before inference, dropped), cancelled (a
# submitted job its client cancelled before a worker took it, skipped), failed (inference raised; the job goes
# back to the queue), requeued (returned to the queue after a failure, or from a dead worker by this worker's
# reaper), dead_lettered (bad job, or out of attempts).
JOB_OUTCOMES = ("done", "expired", "cancelled", "failed", "requeued", "dead_lettered")
JOBS = Counter("worker_jobs_total", "Jobs handled by this worker, by outcome", ["outcome"])
for _outcome in JOB_OUTCOMES:
    JOBS.labels(_outcome)  # every outcome is exported from the start, at 0
SHARD_JOBS = Counter("worker_shard_jobs_total", "Jobs claimed by this worker, by queue shard", ["shard"])
PRIORITY_JOBS = Counter("worker_priority_jobs_total", "Readable jobs claimed by this worker, by priority", ["priority"])
for _level in PRIORITIES:
    PRIORITY_JOBS.labels(_level)
BATCH_SIZE = Histogram("worker_batch_size", "Jobs per claimed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # big CPU batches take > 10 s
INFERENCE = Histogram("worker_inference_seconds", "Model time per batch", buckets=INFERENCE_BUCKETS)
# For scaling (README "Scaling workers"), by model and queue shard. Queue wait: enqueue (the web's clock) to
# claim (this worker's), per job. In flight: claimed, not yet published. The queue:compute ratio: the mean queue
# wait of a batch's jobs over that batch's model time; above 1, jobs wait longer than they take to run.
LABELS = ["model", "shard"]
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
QUEUE_WAIT = Histogram("worker_queue_wait_seconds", "Enqueue to claim, per job", LABELS, buckets=WAIT_BUCKETS)
IN_FLIGHT = Gauge("worker_jobs_in_flight", "Jobs claimed by this worker and not yet published", LABELS)
QUEUE_COMPUTE = Gauge("worker_queue_compute_ratio", "Mean queue wait of the last batch's jobs / its model time", LABELS)

GIL_SWITCH_INTERVAL = 0.0005  # seconds; see Worker.run
# Heartbeats per HEARTBEAT_TTL: a worker is reaped only after missing this many in a row (Redis unreachable,
# the process frozen or starved of CPU for the whole TTL), never for one late beat.
HEARTBEAT_BEATS = 4

log = logger.get("worker")


@dataclass
class Batch:
    """One claimed batch on its way through the worker: decoded, run through the model, published."""

    slot: int  # the batch slot (processing list) that holds its jobs in Redis until it is acknowledged
    shard: int = 0  # the queue shard it was claimed from, where that processing list and its results live
    jobs: list[Job] = field(default_factory=list)  # the jobs to run
    images: object = None  # their pixels, stacked, or what the classifier's prepare() made of them
    dead: list[DeadLetter] = field(default_factory=list)
    results: list[tuple[Job, dict]] | None = None  # None after a failed inference
    waited: float = 0.0  # the mean queue wait of its jobs (s): enqueue to claim


class Worker:
    """Three stages on three threads, so that the model never waits for Redis: the feeder claims and
    decodes batch k+1 while the model runs batch k and the publisher writes batch k-1's results.

    Every batch lives in its own batch slot (processing list) in Redis from its claim to its
    acknowledgement, so a crash at any moment loses nothing: the reaper returns every slot of a dead
    worker. Two more threads send the heartbeat and run the reaper. The worker serves the shards WORKER_SHARDS
    names (all by default): it claims from them in turn (redis_protocol.claim) and heartbeats and reaps in each.
    """

    def __init__(self, config: settings.Settings, queue: WorkerQueue, classifier) -> None:
        self.config = config
        self.queue = queue
        self.classifier = classifier
        # Which model answers, in every result and heartbeat: {"model": ..., "weights": ...}
        self.model = dict(getattr(classifier, "identity", {"model": "unknown", "weights": "unknown"}))
        # What its heartbeat announces: the model's card (the identity and how to feed it), and the jobs it takes.
        self.card = dict(getattr(classifier, "card", self.model))
        self.input_shape = tuple(getattr(classifier, "input_shape", IMAGE_SHAPE))
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self._finished = threading.Event()  # the heartbeat outlives `stopping` until the last batch is done
        self.shards = list(config.worker_shards or range(config.queue_shards))
        self.claimer = Claimer(
            queue, self.id, self.shards, config.batch_size, config.batch_wait_ms / 1000, config.priority_weights
        )
        self.failed = False  # a stage died of an error no retry could mend; run() then raises
        self._free_slots: Queue[int] = Queue()
        for slot in range(SLOTS):
            self._free_slots.put(slot)
        self._ready: Queue[Batch | None] = Queue()  # decoded, for the model
        self.prefetch = prefetch_batches(config, classifier)
        # Claimed batches not yet through the model: the one it runs and at most PREFETCH_BATCHES more,
        # so a busy worker does not sit on jobs another worker could run.
        self._room = threading.Semaphore(self.prefetch + 1)
        self._done: Queue[Batch | None] = Queue()  # through the model, for the publisher

    def run(self) -> None:
        """Serve until `stop()`; survives Redis outages by retrying with backoff."""
        # The model's thread must get the GIL back as soon as its kernel returns: with Python's default
        # 5 ms switch interval, a feeder or publisher holding the GIL keeps a GPU-speed model waiting
        # after every batch.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self._retry(self._register, "register")
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="reaper", daemon=True).start()
        publisher = threading.Thread(target=self._publish_loop, name="publisher")
        publisher.start()
        threading.Thread(target=self._feed, name="feeder", daemon=True).start()
        log.info(
            "worker %s waiting for jobs on %r, shard(s) %s of %d (prefetch %d)",
            self.id,
            self.queue.name,
            ",".join(map(str, self.shards)),
            len(self.queue.shards),
            self.prefetch,
        )
        try:
            self._model_loop()
        finally:
            self._done.put(None)
            publisher.join()
            self._finished.set()
            for shard in self.shards:  # one at a time: a shard that cannot be reached keeps none of the others
                self._retry(lambda shard=shard: self.queue.unregister(self.id, [shard]), "unregister", give_up_after=10)
        if self.failed:
            raise RuntimeError("the worker stopped after an unexpected error (logged above)")
        log.info("worker %s stopped", self.id)

    def stop(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: finishing the batches in hand, then exiting")
        self.stopping.set()

    # ---- the three stages -----------------------------------------------------------------

    def _feed(self) -> None:
        """Claim and decode batches into free slots until stopping; then tell the model loop."""
        try:
            slot = self._next_slot()
            while slot is not None and not self.stopping.is_set():
                if not self._room.acquire(timeout=1.0):
                    continue
                shard, raws = self._retry(functools.partial(self.claimer.claim, slot), "claim a batch") or (0, [])
                if not raws:
                    self._room.release()
                    continue
                self._ready.put(self._decode(slot, raws, shard))
                slot = self._next_slot()
        except Exception:
            log.exception("the feeder failed; stopping")
            self.failed = True
            self.stopping.set()
        finally:
            self._ready.put(None)

    def _next_slot(self) -> int | None:
        """A free batch slot; None once stopping (a slot held after a failure may never come back)."""
        while not self.stopping.is_set():
            try:
                return self._free_slots.get(timeout=1.0)
            except Empty:
                continue
        return None

    def _model_loop(self) -> None:
        while (batch := self._ready.get()) is not None:
            batch = self._infer(batch)
            self._room.release()
            self._done.put(batch)

    def _publish_loop(self) -> None:
        while (batch := self._done.get()) is not None:
            try:
                self._publish(batch)
            except Exception:  # noqa: BLE001 - its jobs go back to the queue; the publisher goes on
                log.exception("publishing a batch failed; returning its jobs to the queue")
                if not self._release_unpublished(batch):
                    continue  # the slot still holds jobs: it must never be claimed into (see the method)
            self._free_slots.put(batch.slot)

    # ---- what each stage does -------------------------------------------------------------

    def _decode(self, slot: int, raws: list[bytes], shard: int = 0) -> Batch:
        """Parse and decode a claimed batch: runnable jobs and their images, dead letters; expired and
        cancelled jobs dropped."""
        BATCH_SIZE.observe(len(raws))
        SHARD_JOBS.labels(str(shard)).inc(len(raws))
        batch, pixels, now = Batch(slot, shard), [], time.time()
        for raw in raws:
            try:
                job, image = self._read(raw)
            except JobError as exc:
                batch.dead.append(DeadLetter(raw, str(exc), self.config.max_job_bytes))
                continue
            PRIORITY_JOBS.labels(job.priority).inc()
            if job.deadline < now:
                JOBS.labels("expired").inc()
                log.info(
                    "dropped expired job %s (%.1f s past its deadline)", logger.untrusted(job.id), now - job.deadline
                )
                continue
            batch.jobs.append(job)
            pixels.append(image)
        pixels = self._drop_cancelled(batch, pixels)
        self._count_claimed(batch, now)
        if pixels:
            prepare = getattr(self.classifier, "prepare", None)  # e.g. the copy to a GPU, off the model's thread
            batch.images = prepare(np.stack(pixels)) if prepare else np.stack(pixels)
        return batch

    def _count_claimed(self, batch: Batch, now: float) -> None:
        """Observe the queue wait of the batch's runnable jobs, and count them in flight."""
        labels = (self.model.get("model", "unknown"), str(batch.shard))
        waits = [max(0.0, now - job.enqueued_at) for job in batch.jobs]
        for wait in waits:
            QUEUE_WAIT.labels(*labels).observe(wait)
        batch.waited = sum(waits) / len(waits) if waits else 0.0
        IN_FLIGHT.labels(*labels).inc(len(batch.jobs))

    def _drop_cancelled(self, batch: Batch, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Take submitted jobs (POST /jobs) out of the batch when their client cancelled them; mark the rest
        running. Costs a round trip only for a batch with submitted jobs."""
        if not any(job.origin == SUBMITTED for job in batch.jobs):
            return pixels
        take = lambda: self.queue.take_tickets(batch.jobs, batch.shard)  # noqa: E731
        cancelled = self._retry(take, "mark submitted jobs running") or set()
        if not cancelled:
            return pixels
        JOBS.labels("cancelled").inc(len(cancelled))
        log.info("skipped %d cancelled job(s)", len(cancelled))
        kept = [(job, image) for job, image in zip(batch.jobs, pixels, strict=True) if job.id not in cancelled]
        batch.jobs = [job for job, _ in kept]
        return [image for _, image in kept]

    def _read(self, raw: bytes) -> tuple[Job, np.ndarray]:
        """A queued element as a job and its pixels; JobError for anything that is not a valid job.

        Queued elements are untrusted: an error this code did not foresee must cost one dead letter,
        never the worker.
        """
        try:
            job = Job.from_json(raw, self.config.max_job_bytes)
            return job, job.pixels(self.input_shape)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.exception("unexpected error reading a job")
            raise JobError(f"unreadable job ({type(exc).__name__})") from None

    def _infer(self, batch: Batch) -> Batch:
        """Run the batch's jobs through the model; `results` stays None if inference failed."""
        if not batch.jobs:
            batch.results = []
            return batch
        started = time.perf_counter()
        try:
            ranked = self.classifier.classify(batch.images, max(job.top_k for job in batch.jobs))
        except Exception:
            log.exception("inference failed for a batch of %d; returning it to the queue", len(batch.jobs))
            JOBS.labels("failed").inc(len(batch.jobs))
            return batch
        seconds = time.perf_counter() - started
        INFERENCE.observe(seconds)
        QUEUE_COMPUTE.labels(self.model.get("model", "unknown"), str(batch.shard)).set(
            batch.waited / max(seconds, 1e-6)
        )
        log.info("predicted a batch of %d in %.0f ms", len(batch.jobs), seconds * 1000)
        batch.results = [
            (job, {"success": True, "predictions": preds[: job.top_k], **self.model})
            for job, preds in zip(batch.jobs, ranked, strict=True)
        ]
        return batch

    def _publish(self, batch: Batch) -> None:
        """Write the batch's results and dead letters, then acknowledge it; or requeue it if inference failed.
        Its jobs are no longer in flight afterwards, whatever happened."""
        try:
            self._write(batch)
        finally:
            IN_FLIGHT.labels(self.model.get("model", "unknown"), str(batch.shard)).dec(len(batch.jobs))

    def _write(self, batch: Batch) -> None:
        if batch.results is None:
            released = self._retry(
                lambda: self.queue.release(self.id, "inference failed", slot=batch.slot, shard=batch.shard),
                "requeue a failed batch",
            )
            if released:
                count_released(*released)
            return
        finish = lambda: self.queue.finish_batch(self.id, batch.results, batch.dead, batch.slot, batch.shard)  # noqa: E731
        unwritable = self._retry(finish, "publish results")
        if unwritable is None:
            return  # stopping during an outage: the batch stays claimed and unregister() requeues it
        JOBS.labels("done").inc(len(batch.results) - len(unwritable))
        JOBS.labels("dead_lettered").inc(len(batch.dead) + len(unwritable))
        for letter in [*batch.dead, *unwritable]:
            log.warning("dead-lettered a job: %s", logger.untrusted(letter.reason))
        ids = " ".join(logger.untrusted(job.id) for job, _ in batch.results)
        log.debug("batch done: %d jobs: %s", len(batch.results), ids)

    def _release_unpublished(self, batch: Batch) -> bool:
        """Return a batch that could not be published to the queue, counting an attempt (so that a job that
        always breaks publishing ends in the dead letters); False if even that failed.

        Acknowledging a later batch deletes its whole slot, so a slot that still holds jobs is kept out of
        use: its jobs return when the worker stops (unregister) or dies (the reaper)."""
        release = lambda: self.queue.release(self.id, "publishing its batch failed", slot=batch.slot, shard=batch.shard)  # noqa: E731
        try:
            released = self._retry(release, "requeue a batch that could not be published")
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("cannot requeue batch slot %d of shard %d either; it stays claimed", batch.slot, batch.shard)
            return False
        if released is None:
            return False  # stopping during an outage: unregister releases it
        count_released(*released)
        return True

    def _register(self) -> None:
        """Heartbeat in every shard served; raises if none could be reached (a shard that could not is joined
        by a later heartbeat, and claimed from only then, so the reaper always knows whose jobs it holds)."""
        errors = [error for shard in self.shards if (error := self._beat(shard))]
        if len(errors) == len(self.shards):
            raise errors[0]

    def _beat(self, shard: int) -> Exception | None:
        """Heartbeat in one shard; the error if it could not be reached."""
        try:
            self.queue.heartbeat(self.id, self.config.heartbeat_ttl, [shard], self.card)
        except REDIS_UNAVAILABLE as exc:
            log.warning("heartbeat in shard %d failed (%s: %s); retrying", shard, type(exc).__name__, exc)
            return exc
        self.claimer.registered.add(shard)
        return None

    def _heartbeat_loop(self) -> None:
        """Renew the heartbeat in every shard HEARTBEAT_BEATS times per HEARTBEAT_TTL until the last batch is done.

        A thread of its own, apart from the reaper, so that nothing but Redis itself can delay a beat: the
        model's kernels release the GIL, and the switch interval (see run) hands it over within a millisecond.
        """
        interval = self.config.heartbeat_ttl / HEARTBEAT_BEATS
        while not self._finished.wait(interval):
            for shard in self.shards:
                try:
                    self._beat(shard)
                except Exception as exc:  # noqa: BLE001 - this thread must outlive any error, or a live worker gets reaped
                    log.warning("heartbeat failed (%s: %s); retrying", type(exc).__name__, exc)

    def _reap_loop(self) -> None:
        """Every REAP_INTERVAL, in every shard served, return the jobs of workers whose heartbeat expired."""
        while not self._finished.wait(self.config.reap_interval):
            for shard in self.shards:
                try:
                    self._reap(shard)
                except REDIS_UNAVAILABLE:
                    pass  # the heartbeat thread logs the shard's outage; the next round tries again
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("reaper failed in shard %d (%s: %s); retrying", shard, type(exc).__name__, exc)

    def _reap(self, shard: int) -> None:
        workers, requeued, dead_lettered = self.queue.reap([shard])
        count_released(requeued, dead_lettered)
        if workers:
            log.warning(
                "reaped %d dead worker(s) in shard %d: %d job(s) requeued, %d dead-lettered",
                workers,
                shard,
                requeued,
                dead_lettered,
            )

    def _retry(self, action, what: str, give_up_after: float | None = None):
        """Run `action` until Redis answers; give up after `give_up_after` s (None: only when stopping)."""
        started = time.monotonic()

        def warn(exc: Exception, delay: float) -> None:
            log.warning("Redis unavailable, cannot %s (%s); retrying in %.1f s", what, exc, delay)

        stop = self.stopping.is_set if give_up_after is None else None
        try:
            return retry(action, REDIS_UNAVAILABLE, Backoff(0.1, 5.0), warn, give_up_after, stop)
        except REDIS_UNAVAILABLE as exc:
            if give_up_after is not None:
                log.error("could not %s for %.0f s (%s); giving up", what, time.monotonic() - started, exc)
            return None


def prefetch_batches(config: settings.Settings, classifier) -> int:
    """PREFETCH_BATCHES, or for `auto`: 1 where the model runs off the CPU (a GPU, or a stand-in for one),
    0 on the CPU, where decoding the next batch would take cores from the model, and a batch claimed
    while the model runs holds only the jobs that happened to be waiting then, not a full batch."""
    if config.prefetch_batches is not None:
        return config.prefetch_batches
    return 0 if getattr(classifier, "device", "") == "CPU" else 1


def count_released(requeued: int, dead_lettered: int) -> None:
    """Count jobs this worker moved out of a processing list: back to the queue or to the dead letters."""
    JOBS.labels("requeued").inc(requeued)
    JOBS.labels("dead_lettered").inc(dead_lettered)
