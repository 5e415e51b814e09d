"""All three roles of one queue on one client, for the tools and tests that play every part: a benchmark
that enqueues and claims, a test that queues jobs as the web does and checks what a worker left behind.
The servers never use this: a web process holds a WebQueue and an inspector, a worker a WorkerQueue."""

from __future__ import annotations

from dataclasses import dataclass

from imgserve.protocol import QueueInspector, WebQueue, WorkerQueue
from imgserve.protocol.connection import Client
from imgserve.protocol.keys import Keys
from imgserve.settings import Settings


@dataclass(frozen=True)
class Queues:
    """The web side, the worker side and the read-only views of one queue, sharing one client."""

    web: WebQueue
    worker: WorkerQueue
    inspect: QueueInspector

    @classmethod
    def on(cls, client: Client, queue: str, **limits: int | str) -> Queues:
        """The roles of `queue` on `client`, with the limits of QueueBase (result_ttl, shards, ..., model)."""
        return cls.of(WebQueue(client, queue, **limits))

    @classmethod
    def from_settings(cls, config: Settings) -> Queues:
        """The roles of the queue that `config` describes."""
        return cls.of(WebQueue.from_settings(config))

    @classmethod
    def of(cls, web: WebQueue) -> Queues:
        return cls(web, WorkerQueue.sharing(web), QueueInspector.sharing(web))

    @property
    def name(self) -> str:
        return self.web.name

    @property
    def redis(self) -> Client:
        return self.web.redis

    @property
    def keys(self) -> Keys:
        return self.web.keys

    @property
    def shards(self) -> list[Keys]:
        return self.web.shards

    @property
    def cluster(self) -> bool:
        return self.web.cluster
