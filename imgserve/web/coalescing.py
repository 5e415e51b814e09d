"""The result cache's step in /predict (RESULT_CACHE_TTL > 0): answer from the cache, or share the job of an
identical request in flight, or run the request's own job and cache its answer.

Within one web process the first of several identical requests leads and the others wait on its Flight (an
Event); across web processes the leader holds the digest's lease in Redis and the others follow it
(protocol/cache.py). Every request keeps its own deadline: a follower whose leader fails, or whose lease
ends without a result, runs its own job in the time it has left; past its deadline it gets its 504.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from imgserve import logger
from imgserve.protocol import REDIS_UNAVAILABLE, ResultTimeout
from imgserve.protocol.cache import ResultCache
from imgserve.web.metrics import RESULT_CACHE

log = logger.get("web")


class Flight:
    """One request this process runs for a digest; identical requests wait for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: dict | None = None

    def wait(self, deadline: float) -> dict | None:
        """The leader's result; None if it has none (it failed or was refused) or at `deadline`."""
        self.done.wait(max(0.0, deadline - time.time()))
        return self.result


class InFlight:
    """The digests this web process is answering now, each with its Flight."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def join(self, digest: str) -> tuple[Flight, bool]:
        """The flight for `digest`, and True when the caller is its leader (it must call `land`)."""
        with self._lock:
            flight = self._flights.get(digest)
            if flight is not None:
                return flight, False
            flight = self._flights[digest] = Flight()
            return flight, True

    def land(self, digest: str, flight: Flight, result: dict | None) -> None:
        """The leader is done: hand its result (None when it has none) to the flight's followers."""
        with self._lock:
            self._flights.pop(digest, None)
        flight.result = result
        flight.done.set()


def cached_answer(
    cache: ResultCache, in_flight: InFlight, digest: str, deadline: float, run: Callable[[], dict]
) -> dict:
    """The answer for `digest`: from the cache, another request's job, or `run()` (which queues this request's
    job and waits for it). ResultTimeout when `deadline` passes while following another request."""
    hit = cache.get(digest)
    if hit is not None:
        RESULT_CACHE.labels("hit").inc()
        return hit
    flight, leader = in_flight.join(digest)
    if not leader:
        shared = flight.wait(deadline)
        if shared is not None and shared.get("success"):
            RESULT_CACHE.labels("coalesced").inc()
            return shared
        return _own_job(deadline, run)
    result = None
    try:
        result = _lead(cache, digest, deadline, run)
    finally:
        in_flight.land(digest, flight, result)
    return result


def _lead(cache: ResultCache, digest: str, deadline: float, run: Callable[[], dict]) -> dict:
    """This process's request for `digest`: follow another process's job if one holds the lease, else run."""
    token = uuid.uuid4().hex
    if not cache.lease(digest, token, deadline - time.time()):
        followed = cache.follow(digest, deadline)
        if followed is not None and followed.get("success"):
            RESULT_CACHE.labels("coalesced").inc()
            return followed
        return _own_job(deadline, run)
    try:
        # A request that missed the cache just before an identical one's result was written takes the lease
        # that one released: the result is there now.
        if (hit := cache.get(digest)) is not None:
            RESULT_CACHE.labels("hit").inc()
            return hit
        result = _own_job(deadline, run)
        _keep(cache, digest, result)
        return result
    finally:
        _release(cache, digest, token)


def _own_job(deadline: float, run: Callable[[], dict]) -> dict:
    if time.time() >= deadline:
        raise ResultTimeout(None)
    RESULT_CACHE.labels("miss").inc()
    return run()


def _keep(cache: ResultCache, digest: str, result: dict) -> None:
    """Cache a successful result; a failure to write it costs identical requests a job each, not this answer."""
    try:
        cache.put(digest, result)
    except REDIS_UNAVAILABLE as exc:
        log.warning("could not cache the result for %s: %s", digest, exc)


def _release(cache: ResultCache, digest: str, token: str) -> None:
    """Give the lease up; a failure only keeps other processes' identical requests waiting until it expires."""
    try:
        cache.release(digest, token)
    except REDIS_UNAVAILABLE as exc:
        log.warning("could not release the cache lease on %s: %s", digest, exc)
