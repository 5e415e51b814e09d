"""The result cache (RESULT_CACHE_TTL): identical requests share one answer, and one job while it runs.

Identical means the same prepared pixels (their bytes, shape and dtype), for the same model, with the same
top_k: `request_digest` hashes all of them, so a different image, model or top_k is a different key and one
model's answer is never served for another's request. Keys (keys.py): `{q}:cache:{digest}` holds a successful
result for RESULT_CACHE_TTL s; `{q}:lease:{digest}` names the request that queued a job for a digest while
that job runs, so that identical requests in other web processes wait for its result (`follow`, polling with
backoff) instead of queueing their own. Failed results are never cached: a follower that finds the lease
gone and no result queues its own job.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from imgserve import logger

from . import scripts
from .connection import REPLY_LOST, Client, retry_once
from .keys import cache_key, lease_key
from .queue import read_result

log = logger.get(__name__)

# The model every job is for until a queue serves several (the worker's identity, worker/model.py).
DEFAULT_MODEL = "resnet50"


def request_digest(pixels: np.ndarray, top_k: int, model: str = DEFAULT_MODEL) -> str:
    """What identifies an answer: BLAKE2b (128 bits) of the model, top_k, the dtype, shape and bytes of the
    prepared pixels. 32 hex digits."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([model, top_k, str(pixels.dtype), list(pixels.shape)]).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


class ResultCache:
    """A web process's side of the cache: read and write results, take, follow and release leases."""

    POLL_START, POLL_MAX = 0.005, 0.1  # a follower's backoff between reads, as the listener's polling mode

    def __init__(self, client: Client, queue: str, ttl: int) -> None:
        self.redis = client
        self.queue = queue
        self.ttl = ttl
        self._release = client.register_script(scripts.LEASE_RELEASE)

    def get(self, digest: str) -> dict | None:
        """The cached result for `digest`, or None."""
        raw = retry_once(lambda: self.redis.get(cache_key(self.queue, digest)))
        return None if raw is None else read_result(raw, digest)

    def put(self, digest: str, result: dict) -> None:
        """Keep a successful result (without its job's id) for RESULT_CACHE_TTL s; a failure is never kept."""
        if result.get("success") is not True:
            return
        value = json.dumps({k: v for k, v in result.items() if k != "id"}, separators=(",", ":"))
        retry_once(lambda: self.redis.set(cache_key(self.queue, digest), value, ex=self.ttl))

    def lease(self, digest: str, token: str, seconds: float) -> bool:
        """Take the lease on `digest` for the request `token`, for `seconds` at most; False when another holds it."""
        key, ttl_ms = lease_key(self.queue, digest), max(1, int(seconds * 1000))
        try:
            return bool(self.redis.set(key, token, nx=True, px=ttl_ms))
        except REPLY_LOST:  # SET NX is not idempotent: ask whose the lease is now
            return retry_once(lambda: self.redis.get(key)) == token.encode()

    def release(self, digest: str, token: str) -> None:
        """Give the lease up if it is still `token`'s (LEASE_RELEASE); once lost, it expires with its job."""
        retry_once(lambda: self._release(keys=[lease_key(self.queue, digest)], args=[token]))

    def follow(self, digest: str, deadline: float) -> dict | None:
        """Wait for the result of the job that holds the lease on `digest`: the cached result; None when the
        lease ends without one (that job failed or was lost) or at `deadline` (time.time())."""
        backoff = self.POLL_START
        while True:
            cached = self.get(digest)
            if cached is not None:
                return cached
            if not retry_once(lambda: self.redis.exists(lease_key(self.queue, digest))):
                return self.get(digest)  # written just before the lease was released, after the read above
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 1.5, self.POLL_MAX)
