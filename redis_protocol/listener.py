"""The result listener: one keyspace-notification subscriber per web process, waking the request
whose result arrived; polling with backoff whenever notifications are unavailable."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import logger

from .queue import JobQueue

log = logger.get(__name__)


class ResultTimeout(Exception):
    """No result arrived before the request's deadline."""


class ResultListener:
    """One keyspace-notification listener per web process, waking the request that waits.

    A thread holds one pubsub connection subscribed to this process's result keys. Waiting
    requests sleep on an Event; they also poll (with backoff) whenever notifications are
    unavailable, and now and then even when they are, in case a message was missed.
    """

    # Re-checks in notification mode, in case a message was lost: first after SAFETY_POLL s, then
    # doubling. Late enough that a request answered within seconds never spends a command on it
    # (a reconnecting listener wakes every waiter anyway, so a lost message is rare).
    SAFETY_POLL = 5.0
    MAX_SAFETY_POLL = 10.0
    POLL_START, POLL_MAX = 0.005, 0.1

    def __init__(self, queue: JobQueue, origin: str, use_notifications: bool = True) -> None:
        self.queue = queue
        self.origin = origin
        self.use_notifications = use_notifications
        self.mode = "polling"
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.use_notifications:
            log.info("result wait mode: polling (notifications turned off by NOTIFICATIONS=off)")
            self._ready.set()
            return
        self._thread = threading.Thread(target=self._run, name="result-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=3)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the first subscribe attempt settled the mode (for tests and start-up logs)."""
        return self._ready.wait(timeout)

    @contextmanager
    def expect(self, job_id: str) -> Iterator[None]:
        """Register interest in a job before enqueueing it, so no notification is missed."""
        with self._lock:
            self._events[job_id] = threading.Event()
        try:
            yield
        finally:
            with self._lock:
                self._events.pop(job_id, None)

    def wait(self, job_id: str, deadline: float) -> dict:
        """The job's result; ResultTimeout at `deadline` (time.time()); REDIS_UNAVAILABLE passes through."""
        event = self._events[job_id]
        safety, backoff = self.SAFETY_POLL, self.POLL_START
        while True:
            remaining = max(0.0, deadline - time.time())
            if self.mode == "notifications":
                woke = event.wait(min(remaining, safety))
                safety = self.SAFETY_POLL if woke else min(safety * 2, self.MAX_SAFETY_POLL)
            else:
                event.wait(min(remaining, backoff))
                backoff = min(backoff * 1.5, self.POLL_MAX)
            event.clear()
            result = self.queue.take_result(self.origin, job_id)
            if result is not None:
                return result
            if time.time() >= deadline:
                raise ResultTimeout(job_id)

    def _wake_all(self) -> None:
        with self._lock:
            for event in self._events.values():
                event.set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - not only a lost connection: MASTERDOWN, an ACL, a bad key ...
                if self.mode == "notifications":
                    log.warning("notification listener failed (%s: %s); polling until it recovers",
                                type(exc).__name__, exc)  # fmt: skip
                self.mode = "polling"
                self._ready.set()
                self._wake_all()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _listen(self) -> None:
        pubsub = self.queue.redis.pubsub()
        probe: tuple[str, float] | None = None  # (probe id, give-up time) while testing for events
        try:
            pubsub.psubscribe(self.queue.result_channel_pattern(self.origin))
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if probe and time.monotonic() > probe[1]:
                    self._polling("keyspace notifications unavailable (CONFIG not allowed and no events seen)")
                    self._stop.wait(30)  # try again later: an operator may enable them
                    return
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    # Also after redis-py reconnected and resubscribed by itself: a restarted Redis has
                    # forgotten notify-keyspace-events, so turn them on again. Where CONFIG is denied,
                    # they may still be on: write a probe key and see whether its event arrives.
                    if self.queue.enable_notifications():
                        self._notifications_on()
                    else:
                        probe = (f"probe-{uuid.uuid4().hex}", time.monotonic() + 2.0)
                        self.queue.probe_notifications(self.origin, probe[0])
                elif message["type"] == "pmessage" and message["data"] == b"set":
                    job_id = message["channel"].rsplit(b":", 1)[1].decode(errors="replace")
                    if probe and job_id == probe[0]:
                        probe = None
                        self._notifications_on()
                    elif event := self._events.get(job_id):
                        event.set()
        finally:
            pubsub.close()

    def _notifications_on(self) -> None:
        if self.mode != "notifications":
            log.info("result wait mode: keyspace notifications (polling as fallback)")
        self.mode = "notifications"
        self._ready.set()
        self._wake_all()  # anything that finished while we were not subscribed

    def _polling(self, why: str) -> None:
        if self.mode != "polling" or not self._ready.is_set():
            log.warning("%s; result wait mode: polling", why)
        self.mode = "polling"
        self._ready.set()
