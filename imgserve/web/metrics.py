"""Prometheus metrics of the web API, served at GET /metrics.

    web_requests_total{endpoint,method,status}   requests answered (endpoint = the URL rule, e.g. /predict;
                                                  method = an HTTP method, or "other")
    web_requests_in_progress                      requests being handled right now
    web_predict_seconds                           histogram of /predict latency, all outcomes
    web_queue_depth                               jobs waiting in the Redis queue (every priority level), read
                                                  at scrape time
    web_priority_queue_depth{priority}            the same per priority level (high, normal, low), all shards
    web_dead_letters                              dead letters kept in Redis, read at scrape time
    web_shard_queue_depth{shard}                  the same two, per queue shard (QUEUE_SHARDS)
    web_shard_dead_letters{shard}
    web_shard_oldest_job_age_seconds{shard}       age of the job at the head of each shard (the next to be
                                                  claimed), from its enqueued_at, read at scrape time; 0 when empty
    web_oldest_job_age_seconds                    the largest of them: how late the queue is running
    web_result_cache_total{outcome}               single-image /predict requests with RESULT_CACHE_TTL > 0: hit
                                                  (answered from the cache), coalesced (shared an identical
                                                  request's job), miss (ran a job of its own)

Under gunicorn (several processes) set PROMETHEUS_MULTIPROC_DIR to an empty directory: every
process then writes its values there and /metrics, whichever process answers, sums them all
(`make run` does this; gunicorn.conf.py cleans up after a process that exits). Without it the
values live in this process only, which is right for `python run_web_server.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from imgserve import logger
from imgserve.protocol import REDIS_UNAVAILABLE, QueueInspector
from imgserve.protocol.priority import PRIORITIES

log = logger.get(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
# HTTP's methods (RFC 9110, and PATCH); gunicorn passes on any token, and each would be a new series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

# registry=None: the metrics are not added to the global registry; each scrape builds its own
# (see scrape_registry), so several apps in one process never register a collector twice.
REQUESTS = Counter(
    "web_requests_total",
    "HTTP requests answered, by endpoint and status",
    ["endpoint", "method", "status"],
    registry=None,
)
IN_PROGRESS = Gauge(
    "web_requests_in_progress", "HTTP requests being handled", multiprocess_mode="livesum", registry=None
)
PREDICT_SECONDS = Histogram(
    "web_predict_seconds", "Latency of POST /predict, all outcomes", buckets=LATENCY_BUCKETS, registry=None
)

RESULT_CACHE = Counter(
    "web_result_cache_total",
    "Single-image /predict requests by how the result cache answered: hit, coalesced or miss",
    ["outcome"],
    registry=None,
)
for _outcome in ("hit", "coalesced", "miss"):  # shown as 0 before the first of each
    RESULT_CACHE.labels(_outcome)


class QueueDepthCollector(Collector):
    """Reads the queue length from Redis when Prometheus scrapes; reports nothing while Redis is down."""

    def __init__(self, queue: QueueInspector) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            levels = self.queue.level_depths()
            dead_letters = self.queue.dead_letter_counts()
        except REDIS_UNAVAILABLE as exc:
            log.debug("queue depth not available for /metrics: %s", exc)
            return
        # A shard whose primary is down is left out (None): the others' figures still count.
        depths = [None if shard is None else sum(shard.values()) for shard in levels]
        yield GaugeMetricFamily("web_queue_depth", "Jobs waiting in the Redis queue", value=_total(depths))
        by_level = GaugeMetricFamily(
            "web_priority_queue_depth", "Jobs waiting at each priority level", labels=["priority"]
        )
        for level in PRIORITIES:
            by_level.add_metric([level], _total([shard and shard[level] for shard in levels]))
        yield by_level
        yield GaugeMetricFamily(
            "web_dead_letters", "Dead letters kept in Redis (at most DEAD_LETTER_MAX)", value=_total(dead_letters)
        )
        yield _per_shard("web_shard_queue_depth", "Jobs waiting in each queue shard", depths)
        yield _per_shard("web_shard_dead_letters", "Dead letters kept in each queue shard", dead_letters)
        ages = self.queue.oldest_job_ages()
        yield GaugeMetricFamily(
            "web_oldest_job_age_seconds",
            "Age of the oldest queued job, in any shard",
            value=max((age for age in ages if age is not None), default=0.0),
        )
        yield _per_shard("web_shard_oldest_job_age_seconds", "Age of the job next to be claimed, per shard", ages)


def _total(values: list[int | None]) -> int:
    return sum(value for value in values if value is not None)


def _per_shard(name: str, documentation: str, values: list[int | None]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["shard"])
    for shard, value in enumerate(values):
        if value is not None:
            family.add_metric([str(shard)], value)
    return family


def multiprocess_dir() -> str | None:
    """The multiprocess directory, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def scrape_registry(queue: QueueInspector) -> CollectorRegistry:
    """A registry with everything /metrics shows: all processes' values in multiprocess mode."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        for metric in (REQUESTS, IN_PROGRESS, PREDICT_SECONDS, RESULT_CACHE):
            registry.register(metric)
    registry.register(QueueDepthCollector(queue))
    return registry


def init_app(app: Flask, queue: QueueInspector) -> None:
    """Count every request of `app` and serve GET /metrics."""
    app.before_request(_before)
    app.after_request(_after)
    app.teardown_request(_teardown)
    app.add_url_rule("/metrics", "metrics", lambda: _metrics_response(queue))


def _before() -> None:
    g.metrics_started = time.perf_counter()
    IN_PROGRESS.inc()


def _after(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is None:  # a before_request hook registered earlier answered first: ours never ran
        return response
    # The URL rule, not the path, so unknown paths cannot create a label value each.
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
    if endpoint == "/predict":
        PREDICT_SECONDS.observe(time.perf_counter() - started)
    return response


def _teardown(_exc: BaseException | None) -> None:
    # Here, not in _after: teardown runs even when an exception skipped the after_request hooks.
    if g.pop("metrics_started", None) is not None:
        IN_PROGRESS.dec()


def _metrics_response(queue: QueueInspector) -> Response:
    return Response(generate_latest(scrape_registry(queue)), content_type=CONTENT_TYPE_LATEST)
