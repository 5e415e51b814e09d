"""The result listener: keyspace-notification subscribers per web process, waking the request whose
result arrived; polling with backoff wherever notifications are unavailable.

Keyspace events are published only on the server that holds the key. On a plain Redis that is the one
server; in a Redis Cluster each web process listens on every primary that holds a shard, follows the
cluster's slot map (a failover, a resharding), and a request waits by polling when its shard's node
cannot be listened to.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from imgserve import logger

from .backoff import Backoff
from .connection import node_client
from .keys import Keys
from .notifications import channel_pattern, enable_notifications, write_probe
from .web_queue import WebQueue

log = logger.get(__name__)

Address = tuple[str, int]


class ResultTimeout(Exception):
    """No result arrived before the request's deadline."""


class NodeListener:
    """One pubsub connection to one server, subscribed to this web process's result keys there.

    `mode` is "notifications" while events arrive, else "polling". Where CONFIG is denied, a probe key
    (written by `probe`) tells whether the server publishes the events anyway.
    """

    def __init__(
        self,
        client: redis.Redis,
        pattern: str,
        probe: Callable[[str], None],
        on_set: Callable[[str], None],
        wake_all: Callable[[], None],
    ) -> None:
        self.client = client
        self.pattern = pattern
        self.probe = probe
        self.on_set = on_set
        self.wake_all = wake_all
        self.mode = "polling"
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        """Listen until `stopping` is set, reconnecting with backoff."""
        backoff = Backoff(0.1, 5.0)
        while not self.stopping.is_set():
            try:
                self._listen()
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - not only a lost connection: MASTERDOWN, an ACL, a bad key ...
                if self.mode == "notifications":
                    log.warning("notification listener failed (%s: %s); polling until it recovers",
                                type(exc).__name__, exc)  # fmt: skip
                self.mode = "polling"
                self.ready.set()
                self.wake_all()
                self.stopping.wait(backoff.next())

    def _listen(self) -> None:
        pubsub = self.client.pubsub()
        probe: tuple[str, float] | None = None  # (probe id, give-up time) while testing for events
        try:
            pubsub.psubscribe(self.pattern)
            while not self.stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if probe and time.monotonic() > probe[1]:
                    self._polling("keyspace notifications unavailable (CONFIG not allowed and no events seen)")
                    self.stopping.wait(30)  # try again later: an operator may enable them
                    return
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    # Also after redis-py reconnected and resubscribed by itself: a restarted Redis has
                    # forgotten notify-keyspace-events, so turn them on again. Where CONFIG is denied,
                    # they may still be on: write a probe key and see whether its event arrives.
                    if enable_notifications(self.client):
                        self._notifications_on()
                    else:
                        probe = (f"probe-{uuid.uuid4().hex}", time.monotonic() + 2.0)
                        self.probe(probe[0])
                elif message["type"] == "pmessage" and message["data"] == b"set":
                    job_id = message["channel"].rsplit(b":", 1)[1].decode(errors="replace")
                    if probe and job_id == probe[0]:
                        probe = None
                        self._notifications_on()
                    else:
                        self.on_set(job_id)
        finally:
            pubsub.close()

    def _notifications_on(self) -> None:
        if self.mode != "notifications":
            log.info("result wait mode: keyspace notifications (polling as fallback)")
        self.mode = "notifications"
        self.ready.set()
        self.wake_all()  # anything that finished while we were not subscribed

    def _polling(self, why: str) -> None:
        if self.mode != "polling" or not self.ready.is_set():
            log.warning("%s; result wait mode: polling", why)
        self.mode = "polling"
        self.ready.set()


class ResultListener:
    """Keyspace-notification listeners for one web process, waking the request that waits.

    Waiting requests sleep on an Event; they also poll (with backoff) whenever notifications from their
    shard's server are unavailable, and now and then even when they are, in case a message was missed.
    """

    # Re-checks in notification mode, in case a message was lost: first after SAFETY_POLL s, then
    # doubling. Late enough that a request answered within seconds never spends a command on it
    # (a reconnecting listener wakes every waiter anyway, so a lost message is rare).
    SAFETY_POLL = 5.0
    MAX_SAFETY_POLL = 10.0
    POLL_START, POLL_MAX = 0.005, 0.1
    # In a cluster: how often the slot map is read, to follow failovers and reshardings.
    TOPOLOGY_REFRESH = 2.0

    def __init__(self, queue: WebQueue, origin: str, use_notifications: bool = True) -> None:
        self.queue = queue
        self.origin = origin
        self.use_notifications = use_notifications
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._nodes: dict[Address, NodeListener] = {}  # the servers listened to
        self._shard_nodes: dict[int, Address] = {}  # where each shard's keys are, as last read

    @property
    def mode(self) -> str:
        """ "notifications" when every shard's server notifies, "polling" when none does, else "partial"."""
        modes = {self.mode_for(shard) for shard in self._shard_nodes} or {"polling"}
        return modes.pop() if len(modes) == 1 else "partial"

    def mode_for(self, shard: int) -> str:
        """How a request waiting on a result in `shard` learns of it."""
        node = self._nodes.get(self._shard_nodes.get(shard, ("", 0)))
        return node.mode if node else "polling"

    def start(self) -> None:
        if not self.use_notifications:
            log.info("result wait mode: polling (notifications turned off by NOTIFICATIONS=off)")
            self._ready.set()
            return
        run = self._follow_cluster if self.queue.cluster else self._listen_to_one
        self._thread = threading.Thread(target=run, name="result-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for node in list(self._nodes.values()):  # the cluster thread may be changing the dict
            node.stopping.set()
        if self._thread:
            self._thread.join(timeout=3)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the first subscribe attempts settled the mode (for tests and start-up logs)."""
        deadline = time.monotonic() + timeout
        if not self._ready.wait(timeout):
            return False
        return all(node.ready.wait(max(0.0, deadline - time.monotonic())) for node in list(self._nodes.values()))

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

    def wait(self, job_id: str, deadline: float, shard: int = 0) -> dict:
        """The result of a job queued in `shard`; ResultTimeout at `deadline` (time.time()); REDIS_UNAVAILABLE
        passes through."""
        event = self._events[job_id]
        safety, backoff = self.SAFETY_POLL, self.POLL_START
        while True:
            remaining = max(0.0, deadline - time.time())
            if self.mode_for(shard) == "notifications":
                woke = event.wait(min(remaining, safety))
                safety = self.SAFETY_POLL if woke else min(safety * 2, self.MAX_SAFETY_POLL)
            else:
                event.wait(min(remaining, backoff))
                backoff = min(backoff * 1.5, self.POLL_MAX)
            event.clear()
            result = self.queue.take_result(self.origin, job_id, shard)
            if result is not None:
                return result
            if time.time() >= deadline:
                raise ResultTimeout(job_id)

    def _wake(self, job_id: str) -> None:
        if event := self._events.get(job_id):
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for event in self._events.values():
                event.set()

    def _node_listener(self, client: redis.Redis, shard: Keys) -> NodeListener:
        """A listener for one server; its probe key goes to `shard`, one of the shards on that server."""
        return NodeListener(
            client,
            channel_pattern(self.queue, self.origin),
            lambda probe_id: write_probe(self.queue, self.origin, probe_id, shard.shard),
            self._wake,
            self._wake_all,
        )

    def _listen_to_one(self) -> None:
        """A plain Redis: one server holds every shard; listen on this thread."""
        node = self._node_listener(self.queue.redis, self.queue.keys)
        node.stopping = self._stop
        self._nodes[("", 0)] = node
        self._shard_nodes = dict.fromkeys(range(len(self.queue.shards)), ("", 0))
        self._ready.set()
        node.run()

    def _follow_cluster(self) -> None:
        """A cluster: keep one listener thread on each primary holding a shard, following the slot map."""
        while not self._stop.is_set():
            try:
                self._update_nodes(self._read_shard_nodes())
            except Exception as exc:  # noqa: BLE001 - no node answered; keep what we have, try again
                log.warning("cannot read the cluster's slot map (%s: %s); trying again", type(exc).__name__, exc)
            self._ready.set()
            self._stop.wait(self.TOPOLOGY_REFRESH)
        for node in self._nodes.values():
            node.stopping.set()

    def _read_shard_nodes(self) -> dict[int, Address]:
        """The primary that serves each shard's slot now (CLUSTER SLOTS, from any node that answers)."""
        ranges = self.queue.redis.cluster_slots()
        owners: dict[int, Address] = {}
        for keys in self.queue.shards:
            slot = self.queue.redis.keyslot(keys.queue)
            for (first, last), info in ranges.items():
                if first <= slot <= last:
                    owners[keys.shard] = (info["primary"][0], int(info["primary"][1]))
        return owners

    def _update_nodes(self, owners: dict[int, Address]) -> None:
        """Start listeners on servers that now hold shards; stop those on servers that hold none anymore."""
        wanted = set(owners.values())
        for address in set(self._nodes) - wanted:
            self._nodes.pop(address).stopping.set()
        for address in wanted - set(self._nodes):
            shard = next(s for s, a in owners.items() if a == address)
            client = node_client(self.queue.redis, *address)
            node = self._node_listener(client, self.queue.shards[shard])
            threading.Thread(target=node.run, name=f"result-listener-{address[1]}", daemon=True).start()
            self._nodes[address] = node
        if owners != self._shard_nodes:
            self._shard_nodes = owners
            self._wake_all()  # a result written while its shard moved may have been announced nowhere
