"""The Redis protocol: every key name, every Lua script, every queue operation.

The web server and the model worker call this module and never spell a Redis key.

Keys, all under the prefix IMAGE_QUEUE (default `image_queue`, written `{q}` below):

    {q}                         LIST    pending jobs (JSON). The web server LPUSHes; workers take
                                        from the right, so the list is FIFO and its right end is the head.
    {q}:processing:{worker}     LIST    jobs one worker has claimed and not yet acknowledged.
    {q}:heartbeat:{worker}      STRING  "alive"; TTL HEARTBEAT_TTL, renewed by the worker.
    {q}:workers                 SET     ids of workers that may own a processing list.
    {q}:dead                    LIST    dead letters: {"reason", "worker", "at", "job"}.
    {q}:result:{origin}:{id}    STRING  result JSON for job `id` sent by web process `origin`;
                                        TTL RESULT_TTL; the web server takes it with GETDEL.

A job is in the queue, in one worker's processing list or in the dead-letter list. Every move
between the queue and a processing list is one atomic server-side step (BLMOVE or a Lua script),
and a batch leaves its processing list only after its results and dead letters are written, so a
crash at any point loses nothing: the reaper returns the processing list of a worker whose
heartbeat expired to the head of the queue. (A crash between writing a dead letter and that DEL
leaves the job in both lists; it is delivered again and dead-lettered a second time.)
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

import logger
from helpers import IMAGE_DTYPE, IMAGE_SHAPE, PayloadError, decode_image, encode_image

log = logger.get(__name__)

# Redis cannot be reached, or refuses writes for now (maxmemory reached; a replica after a failover).
RedisUnavailable = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
NOTIFY_FLAGS = "K$"  # keyspace events for string commands: enough to see SET on a result key


def connect(url: str) -> redis.Redis:
    """A client that fails fast when Redis is down (1 s connect timeout, one quick retry)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        decode_responses=False,
    )


class Keys:
    """Every key name of the protocol, declared once."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.workers = f"{queue}:workers"
        self.dead = f"{queue}:dead"
        self.processing_prefix = f"{queue}:processing:"
        self.heartbeat_prefix = f"{queue}:heartbeat:"
        self.result_prefix = f"{queue}:result:"

    def processing(self, worker: str) -> str:
        return self.processing_prefix + worker

    def heartbeat(self, worker: str) -> str:
        return self.heartbeat_prefix + worker

    def result(self, origin: str, job_id: str) -> str:
        return f"{self.result_prefix}{origin}:{job_id}"

    def result_channel_pattern(self, db: int, origin: str) -> str:
        return f"__keyspace@{db}__:{self.result_prefix}{origin}:*"


class JobError(ValueError):
    """A queued job that cannot be processed; the message is the dead-letter reason."""


@dataclass
class Job:
    """One image to classify, as it travels on the queue (JSON, never pickle)."""

    id: str
    origin: str
    image: str
    shape: list[int]
    dtype: str
    enqueued_at: float
    deadline: float
    attempts: int = 0
    codec: str = "raw"  # how `image` packs the pixels: helpers.encode_image
    # True when `image` is base64 text made by Job.new: it needs no JSON escaping, so to_json can
    # splice it in instead of having json.dumps scan 200 KB (0.45 ms of the web's time per request).
    _image_is_base64: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def new(cls, pixels: np.ndarray, origin: str, timeout: float, codec: str = "raw") -> Job:
        """A job for `pixels`, packed with `codec` (JOB_CODEC), due `timeout` seconds from now."""
        image, codec = encode_image(pixels, codec)
        now = time.time()
        job = cls(
            id=uuid.uuid4().hex,
            origin=origin,
            image=image,
            shape=list(pixels.shape),
            dtype=str(pixels.dtype),
            enqueued_at=now,
            deadline=now + timeout,
            codec=codec,
        )
        job._image_is_base64 = True
        return job

    def to_json(self) -> bytes:
        """The job as queued: compact JSON, UTF-8."""
        wire = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if not self._image_is_base64:
            return json.dumps(wire, separators=(",", ":")).encode()
        del wire["image"]
        head = json.dumps(wire, separators=(",", ":"))
        return b"".join((head[:-1].encode(), b',"image":"', self.image.encode("ascii"), b'"}'))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        """Parse a queued job; raises JobError naming what is wrong."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
            raise JobError(f"job is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise JobError("job is not a JSON object")
        missing = [name for name in ("id", "origin", "image", "shape", "dtype", "deadline") if name not in data]
        if missing:
            raise JobError(f"job lacks field(s): {', '.join(missing)}")
        try:
            return cls(
                id=str(data["id"]),
                origin=str(data["origin"]),
                image=data["image"],
                shape=list(data["shape"]),
                dtype=str(data["dtype"]),
                enqueued_at=float(data.get("enqueued_at", 0.0)),
                deadline=float(data["deadline"]),
                attempts=int(data.get("attempts", 0)),
                codec=str(data.get("codec", "raw")),
            )
        except (TypeError, ValueError) as exc:
            raise JobError(f"job has a field of the wrong type: {exc}") from None

    def pixels(self) -> np.ndarray:
        """The decoded (224, 224, 3) uint8 image; raises JobError if it is anything else."""
        if self.dtype != IMAGE_DTYPE or tuple(self.shape) != IMAGE_SHAPE:
            raise JobError(f"image must be {IMAGE_DTYPE} {IMAGE_SHAPE}, got {self.dtype} {tuple(self.shape)}")
        try:
            return decode_image(self.image, self.codec, self.dtype, self.shape)
        except PayloadError as exc:
            raise JobError(str(exc)) from None


def error_result(message: str, status: int = 500) -> dict:
    """The result a client receives when its job failed."""
    return {"success": False, "error": message, "status": status}


@dataclass
class DeadLetter:
    """A job the worker gives up on, with the reason."""

    raw: bytes | str
    reason: str

    @property
    def reply_to(self) -> tuple[str, str] | None:
        """(origin, id) when the job names them readably, so that its client can be told at once."""
        try:
            data = json.loads(self.raw)
        except (ValueError, RecursionError):
            return None
        if isinstance(data, dict) and isinstance(data.get("origin"), str) and isinstance(data.get("id"), str):
            return data["origin"], data["id"]
        return None


# Moves a processing list back to the head of the queue. A job whose delivery count reaches
# max_attempts goes to the dead-letter list instead, and its client gets an error result.
_RELEASE = """
local function release(plist, queue, dead, result_prefix, max_attempts, ttl, now, worker, count_attempt, why)
  local jobs = redis.call('LRANGE', plist, 0, -1)
  local requeued, buried = 0, 0
  for i = 1, #jobs do
    local raw = jobs[i]
    local ok, job = pcall(cjson.decode, raw)
    if ok and type(job) == 'table' then
      if count_attempt == 1 then job.attempts = (tonumber(job.attempts) or 0) + 1 end
      if (tonumber(job.attempts) or 0) >= max_attempts then
        local reason = why .. '; delivered ' .. job.attempts .. ' times (MAX_ATTEMPTS=' .. max_attempts .. ')'
        redis.call('LPUSH', dead, cjson.encode({reason = reason, worker = worker, at = now, job = raw}))
        if type(job.id) == 'string' and type(job.origin) == 'string' then
          local msg = cjson.encode({success = false, status = 500, error = 'job failed: ' .. reason})
          -- the key as Keys.result spells it (test_job_is_dead_lettered_after_max_attempts... reads it back)
          redis.call('SET', result_prefix .. job.origin .. ':' .. job.id, msg, 'EX', ttl)
        end
        buried = buried + 1
      else
        redis.call('RPUSH', queue, cjson.encode(job))
        requeued = requeued + 1
      end
    else
      local reason = 'undecodable job in a released processing list'
      redis.call('LPUSH', dead, cjson.encode({reason = reason, worker = worker, at = now, job = raw}))
      buried = buried + 1
    end
  end
  redis.call('DEL', plist)
  return {requeued, buried}
end
"""

# KEYS: workers, queue, dead. ARGV: heartbeat prefix, processing prefix, result prefix,
# max_attempts, result ttl, now.
_REAP = (
    _RELEASE
    + """
local requeued, buried, workers, alive = 0, 0, 0, 0
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. worker) == 0 then
    local r = release(ARGV[2] .. worker, KEYS[2], KEYS[3], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
                      tonumber(ARGV[6]), worker, 1, 'worker ' .. worker .. ' stopped sending heartbeats')
    requeued, buried, workers = requeued + r[1], buried + r[2], workers + 1
    redis.call('SREM', KEYS[1], worker)
  else
    alive = alive + 1
  end
end
return {workers, requeued, buried, alive}
"""
)

# KEYS: processing list, queue, dead. ARGV: result prefix, max_attempts, ttl, now, worker,
# count_attempt (0 or 1), reason.
_RELEASE_ONE = (
    _RELEASE
    + """
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
               ARGV[5], tonumber(ARGV[6]), ARGV[7])
"""
)

# KEYS: queue, processing list. ARGV: n. Moves up to n jobs from the head of the queue.
_CLAIM = """
local jobs = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #jobs == 0 then return jobs end
redis.call('LTRIM', KEYS[1], 0, -#jobs - 1)
redis.call('RPUSH', KEYS[2], unpack(jobs))
return jobs
"""


class JobQueue:
    """Queue operations for both sides. Thread-safe (redis-py pools its connections)."""

    BLOCKED_AFTER = 0.005  # s; a BLMOVE that answers from a non-empty queue on one machine takes under 1 ms

    def __init__(self, client: redis.Redis, queue: str, result_ttl: int = 3600, max_attempts: int = 3) -> None:
        self.redis = client
        self.keys = Keys(queue)
        self.result_ttl = result_ttl
        self.max_attempts = max_attempts
        self._claim = client.register_script(_CLAIM)
        self.workers_alive: int | None = None  # as the last reap() counted them
        self._reap = client.register_script(_REAP)
        self._release = client.register_script(_RELEASE_ONE)

    # ---- web side -------------------------------------------------------------------------

    def enqueue(self, job: Job, max_queue: int) -> bool:
        """Push a job; False (and nothing queued) when the queue already held `max_queue` jobs."""
        raw = job.to_json()
        depth = self.redis.lpush(self.keys.queue, raw)
        if depth <= max_queue:
            return True
        # Over the limit: take it back. If a worker claimed it meanwhile, it is accepted after all.
        return self.redis.lrem(self.keys.queue, 1, raw) == 0

    def take_result(self, origin: str, job_id: str) -> dict | None:
        """Fetch and delete a job's result in one step; None if it is not there yet."""
        raw = self.redis.getdel(self.keys.result(origin, job_id))
        return None if raw is None else json.loads(raw)

    def depth(self) -> int:
        """Number of jobs waiting in the queue."""
        return int(self.redis.llen(self.keys.queue))

    def peek(self) -> bytes | None:
        """The job at the queue's head exactly as stored, without claiming it; None if the queue is empty."""
        return self.redis.lindex(self.keys.queue, -1)

    def live_workers(self) -> int:
        """Number of registered workers whose heartbeat has not expired."""
        workers = [w.decode() for w in self.redis.smembers(self.keys.workers)]
        if not workers:
            return 0
        return int(self.redis.exists(*(self.keys.heartbeat(w) for w in workers)))

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The newest dead letters, parsed."""
        return [json.loads(raw) for raw in self.redis.lrange(self.keys.dead, 0, limit - 1)]

    def enable_notifications(self) -> bool:
        """Make sure keyspace events for SET are on, adding only the flags we need.

        Returns False when they are off and CONFIG is not allowed (managed Redis): then the
        caller polls.
        """
        try:
            current = self.notification_flags()
        except redis.ResponseError:
            return False
        flags = set(current)
        if "K" in flags and ("$" in flags or "A" in flags):
            return True
        try:
            self.redis.config_set("notify-keyspace-events", "".join(sorted(flags | set(NOTIFY_FLAGS))))
        except redis.ResponseError:
            return False
        return True

    def notification_flags(self) -> str:
        """The server's notify-keyspace-events flags (raises ResponseError where CONFIG is denied)."""
        value = next(iter(self.redis.config_get("notify-keyspace-events").values()), "")
        return value.decode() if isinstance(value, bytes) else value

    def probe_notifications(self, origin: str, probe_id: str) -> None:
        """Write a short-lived key under `origin`'s result pattern, to see whether its event arrives."""
        self.redis.set(self.keys.result(origin, probe_id), b"probe", px=5000)

    def result_channel_pattern(self, origin: str) -> str:
        db = int(self.redis.connection_pool.connection_kwargs.get("db", 0))
        return self.keys.result_channel_pattern(db, origin)

    # ---- worker side ----------------------------------------------------------------------

    def register(self, worker: str, heartbeat_ttl: float) -> None:
        """Announce a worker: heartbeat first, so the reaper never sees it registered but dead."""
        self.heartbeat(worker, heartbeat_ttl)
        self.redis.sadd(self.keys.workers, worker)

    def heartbeat(self, worker: str, ttl: float) -> None:
        """Renew the heartbeat, then (re)join the worker set, in one round trip.

        Rejoining matters: a worker reaped while paused or cut off from Redis, or forgotten by a
        restarted Redis, would otherwise never be reaped again, and a later crash would lose its jobs.
        """
        with self.redis.pipeline(transaction=False) as pipe:  # in this order, so no MULTI needed
            pipe.set(self.keys.heartbeat(worker), b"alive", px=int(ttl * 1000))
            pipe.sadd(self.keys.workers, worker)
            pipe.execute()

    def unregister(self, worker: str) -> None:
        """Clean exit: return anything still claimed to the queue (no attempt counted), then leave."""
        self.release(worker, "worker shut down", count_attempt=False)
        self.redis.delete(self.keys.heartbeat(worker))
        self.redis.srem(self.keys.workers, worker)

    def claim_batch(self, worker: str, size: int, wait: float, block: float) -> list[bytes]:
        """Move up to `size` jobs from the queue's head to this worker's processing list.

        Blocks up to `block` seconds for the first job and, unless it came alone to a lone idle
        worker, takes every job already waiting; if the batch is not full, sleeps until `wait`
        seconds after the first job and takes what arrived meanwhile. Every move is atomic, so
        concurrent workers never share a job.
        """
        plist = self.keys.processing(worker)
        asked, asked_wall = time.monotonic(), time.time()
        first = self.redis.blmove(self.keys.queue, plist, block, "RIGHT", "LEFT")
        if first is None:
            return []
        arrived = time.monotonic()
        until = arrived + wait
        batch = [first]
        # A job that came alone to an empty queue need not look for company, which would cost a round
        # trip and two commands per request at low load. It came alone when all of these agree: BLMOVE
        # had to wait; the job it returned, the oldest, was queued after this worker asked (the web
        # server's clock); and this worker is the only one. Each guards the others: a slow link makes
        # any BLMOVE slow, skewed clocks misdate jobs, and with other workers the queue empties because
        # they took the jobs, not for want of work (looking again found more: commit 31b7d06).
        alone = self.workers_alive == 1 and arrived - asked > self.BLOCKED_AFTER and _enqueued_after(first, asked_wall)
        if size > 1 and not alone:
            batch += self._claim(keys=[self.keys.queue, plist], args=[size - 1])
        remaining = until - time.monotonic()
        if len(batch) < size and remaining > 0:
            # The wait is client-side: Redis times a blocking command out only on its clock tick
            # (100 ms at the default hz 10), and Redis 6 blocks forever on a timeout under 1 ms.
            time.sleep(remaining)
            batch += self._claim(keys=[self.keys.queue, plist], args=[size - len(batch)])
        return batch

    def finish_batch(self, worker: str, results: list[tuple[Job, dict]], dead: list[DeadLetter]) -> int:
        """Write dead letters and results (with TTL) in one round trip; then acknowledge the batch.

        The acknowledgement (DEL of the processing list) is sent only once every write succeeded: when
        Redis refuses one (maxmemory), the error is raised and the batch stays claimed, to be published
        again or requeued. If the worker dies in between, the reaper requeues the batch and it is answered
        again (at least once; a client keeps whichever answer it reads first). Returns the number of
        result keys written.
        """
        now = time.time()
        letters = [json.dumps({"reason": d.reason, "worker": worker, "at": now, "job": _text(d.raw)}) for d in dead]
        answered = [(self.keys.result(job.origin, job.id), payload) for job, payload in results]
        for letter in dead:
            if reply_to := letter.reply_to:
                answered.append((self.keys.result(*reply_to), error_result(f"bad job: {letter.reason}", 400)))
        with self.redis.pipeline(transaction=False) as pipe:
            for text in letters:
                pipe.lpush(self.keys.dead, text)
            for key, payload in answered:
                pipe.set(key, json.dumps(payload), ex=self.result_ttl)
            pipe.execute()  # raises the first error; a pipeline runs every command, hence the DEL apart
        self.redis.delete(self.keys.processing(worker))
        return len(answered)

    def release(self, worker: str, reason: str, count_attempt: bool = True) -> tuple[int, int]:
        """Return this worker's claimed jobs to the queue's head; (requeued, dead-lettered)."""
        requeued, buried = self._release(
            keys=[self.keys.processing(worker), self.keys.queue, self.keys.dead],
            args=[
                self.keys.result_prefix,
                self.max_attempts,
                self.result_ttl,
                time.time(),
                worker,
                int(count_attempt),
                reason,
            ],
        )
        return int(requeued), int(buried)

    def reap(self) -> tuple[int, int, int]:
        """Release the jobs of every worker whose heartbeat expired; (workers, requeued, dead-lettered).

        Also counts the live workers (`workers_alive`), for claim_batch."""
        workers, requeued, buried, alive = self._reap(
            keys=[self.keys.workers, self.keys.queue, self.keys.dead],
            args=[
                self.keys.heartbeat_prefix,
                self.keys.processing_prefix,
                self.keys.result_prefix,
                self.max_attempts,
                self.result_ttl,
                time.time(),
            ],
        )
        self.workers_alive = int(alive)
        return int(workers), int(requeued), int(buried)


_ENQUEUED_AT = re.compile(rb'"enqueued_at":\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)')


def _enqueued_after(raw: bytes, moment: float) -> bool:
    """Whether a queued job says it was enqueued after `moment` (Unix time, the web server's clock).

    Reads only the JSON's head, where Job.to_json puts the field; False when it is not there.
    """
    match = _ENQUEUED_AT.search(raw, 0, 512)
    return match is not None and float(match.group(1)) > moment


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


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
        """The job's result; ResultTimeout at `deadline` (time.time()); RedisUnavailable passes through."""
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
