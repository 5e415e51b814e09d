"""A soak: many requests through the stack as `make run` starts it, watching memory and what Redis keeps.

    python -m tools.soak [--requests 20000] [--concurrency 16] [--warm-up 0.1] [--json FILE]

Starts a throwaway Redis and serve.py against it (a worker with random weights, gunicorn, nginx where
installed), then posts the sample photo `--requests` times from `--concurrency` threads: first the warm-up
(`--warm-up` of them), then the rest. After each part, once the taken results' TTL has passed, it measures the
resident memory (RSS, from /proc) of nginx, gunicorn and the worker, each with its child processes, and
Redis's used memory, and lists the keys left in Redis; it also samples them every few seconds meanwhile. It
passes (exit 0) with no failed request, nothing grown more than 10% from after the warm-up to the end, and no
key left but the worker's own.
Takes about 10 minutes here (`make soak`); not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol.web_queue import TAKEN_RESULT_TTL_MS
from tools.processes import Stack, sample_image_bytes, server_env
from tools.queues import Queues

GROWTH_LIMIT = 0.10
SAMPLE_EVERY = 5.0  # seconds


class Sampler(threading.Thread):
    """Memory of the stack's processes and of Redis every SAMPLE_EVERY s, each sample with the requests done."""

    def __init__(self, stack: Stack, admin: redis.Redis, done: Counter) -> None:
        super().__init__(daemon=True)
        self.stack, self.admin, self.done = stack, admin, done
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY):
            self.take()

    def take(self) -> None:
        sample = {name: sum(rss_mb(pid) for pid in pids) for name, pids in self.stack.pids().items()}
        sample["redis"] = self.admin.info("memory")["used_memory"] / 2**20
        sample["requests"] = sum(self.done.values())
        self.samples.append(sample)


def rss_mb(pid: int) -> float:
    """A process's resident memory in MiB (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def growth(base: dict[str, float], end: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """Per process: (MiB after the warm-up, MiB at the end, growth)."""
    names = [name for name in end if name != "requests"]
    return {
        name: (base.get(name, 0.0), end[name], end[name] / base[name] - 1 if base.get(name) else 0.0) for name in names
    }


def drive(url: str, count: int, concurrency: int, done: Counter) -> list[float]:
    """POST the sample photo `count` times from `concurrency` threads; latencies of the successes (s)."""
    image = sample_image_bytes()
    local = threading.local()
    latencies: list[float] = []

    def one(_: int) -> None:
        if not hasattr(local, "session"):  # one keep-alive connection per thread
            local.session = requests.Session()
        session = local.session
        started = time.perf_counter()
        try:
            response = session.post(url + "/predict", files={"image": ("photo.jpg", image, "image/jpeg")}, timeout=120)
            outcome = str(response.status_code)
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        if outcome == "200":
            latencies.append(time.perf_counter() - started)
        done[outcome] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return latencies


def quiet(sampler: Sampler, queue: Queues) -> tuple[dict[str, float], list[str]]:
    """Once the taken results have expired: a sample, and the queue's keys left in Redis but the live
    worker's own two (the workers set and its heartbeat)."""
    time.sleep(TAKEN_RESULT_TTL_MS / 1000 + 1)
    sampler.take()
    admin = queue.redis
    keys = sorted(k.decode() for k in admin.scan_iter(match=f"{queue.keys.queue}*", count=1000))
    own = {queue.keys.workers} | {queue.keys.heartbeat(w.decode()) for w in admin.smembers(queue.keys.workers)}
    return sampler.samples[-1], [k for k in keys if k not in own]


def report(args, done: Counter, latencies: list[float], seconds: float, grown: dict, left: list[str]) -> bool:
    """Print the summary; whether the soak passed."""
    ok = done["200"] == args.requests and not left and all(g <= GROWTH_LIMIT for _, _, g in grown.values())
    ms = sorted(1000 * s for s in latencies) or [0.0]
    p99 = ms[int(0.99 * (len(ms) - 1))]
    rate = args.requests / seconds
    print(f"requests: {args.requests} in {seconds:.0f} s ({rate:.1f}/s) from {args.concurrency} threads")
    print(f"answers: {dict(done)}; errors: {args.requests - done['200']}")
    print(f"latency: p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms")
    print(
        f"memory after the warm-up ({args.warm_up:.0%} of the requests) and at the end, MiB (RSS; Redis: used_memory):"
    )
    for name, (start, end, change) in grown.items():
        print(f"  {name:22s} {start:8.1f} -> {end:8.1f}  {change:+.1%}")
    print(f"keys left after the results' TTL: {left or 'none but the worker set and its heartbeat'}")
    print("PASS" if ok else "FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warm-up", type=float, default=0.1, help="share of the requests before memory counts")
    parser.add_argument("--json", type=Path, help="write the samples and the summary here")
    args = parser.parse_args(argv)
    warm_up = int(args.warm_up * args.requests)
    with LocalRedis() as server, redis.Redis(port=server.port) as admin:
        queue = Queues.on(admin, "soak")
        stack = Stack(server_env(server.url, queue.keys.queue, LOG_LEVEL="WARNING", PROXY="auto")).wait_ready()
        done: Counter = Counter()
        sampler = Sampler(stack, admin, done)
        try:
            sampler.start()
            started = time.monotonic()
            latencies = drive(stack.url, warm_up, args.concurrency, done)
            base, _ = quiet(sampler, queue)
            latencies += drive(stack.url, args.requests - warm_up, args.concurrency, done)
            seconds = time.monotonic() - started
            end, left = quiet(sampler, queue)
            sampler.stop.set()
            print(f"processes: { {name: len(pids) for name, pids in stack.pids().items()} }")
        finally:
            stack.stop()
    ok = report(args, done, latencies, seconds, growth(base, end), left)
    if args.json:
        args.json.write_text(json.dumps({"samples": sampler.samples, "answers": dict(done), "left": left}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
