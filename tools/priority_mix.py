"""A mixed-priority load against a real stand-in worker process: latency per level, and each level's share of
the jobs claimed, with PRIORITY_WEIGHTS 8,4,1 (the default) beside 1,1,1 (no level preferred), side by side.

    python -m tools.priority_mix [--seconds 8] [--backlog 400]

For each weighting: a fresh Redis and one worker (tools.standin, BATCH_SIZE 8, SECONDS_PER_IMAGE per image, so
a batch of 8 takes 8 times that); `--backlog` low jobs queued first, then for `--seconds` a producer queues a
high job every HIGH_GAP and a normal one every NORMAL_GAP while a collector reads the results (MGET of the
outstanding result keys). Latency is enqueue to result seen; jobs still waiting at the end are not counted in
it. Queue-level (no HTTP): `make bench`'s other phases measure the web path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np

from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol import Job, QueueInspector, WebQueue, connect
from imgserve.protocol.priority import PRIORITIES
from tools.processes import PROJECT, server_env

SECONDS_PER_IMAGE = 0.005
BATCH = 8
HIGH_GAP, NORMAL_GAP = 0.01, 0.02  # 100 + 50 jobs/s: 3/4 of the worker (200 jobs/s); low fills the rest
ORIGIN = "0000000000aa"
PIXELS = np.zeros((224, 224, 3), np.uint8)


def measure(weights: str, seconds: float, backlog: int) -> dict:
    """One weighting's run: per level, jobs answered, p50/p95 latency (ms); the levels' shares of the answers."""
    with LocalRedis() as server:
        env = server_env(server.url, "mix", BATCH_SIZE=BATCH, PRIORITY_WEIGHTS=weights, PREFETCH_BATCHES=0)
        web = WebQueue(connect(server.url), "mix")
        worker = subprocess.Popen(
            [sys.executable, "-m", "tools.standin", "--seconds-per-image", str(SECONDS_PER_IMAGE)],
            cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_registered(QueueInspector(connect(server.url), "mix"))
            return drive(web, seconds, backlog)
        finally:
            worker.terminate()
            worker.wait(30)


def wait_registered(inspector: QueueInspector, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not inspector.live_worker_models():
        if time.monotonic() > deadline:
            raise RuntimeError("the stand-in worker did not register")
        time.sleep(0.1)


def drive(web: WebQueue, seconds: float, backlog: int) -> dict:
    outstanding: dict[str, tuple[str, float]] = {}  # result key -> (level, enqueued at)
    latencies: dict[str, list[float]] = {level: [] for level in PRIORITIES}
    lock, stop = threading.Lock(), threading.Event()

    def queue(level: str) -> None:
        job = Job.new(PIXELS, ORIGIN, 600, codec="zstd", priority=level)
        with lock:
            outstanding[web.shards[0].result(ORIGIN, job.id)] = (level, time.monotonic())
        assert web.enqueue(job, 100_000)

    for _ in range(backlog):
        queue("low")
    collector = threading.Thread(target=collect, args=(web, outstanding, latencies, lock, stop))
    collector.start()
    started, sent = time.monotonic(), Counter()
    while (elapsed := time.monotonic() - started) < seconds:
        for level, gap in (("high", HIGH_GAP), ("normal", NORMAL_GAP)):
            if sent[level] <= elapsed / gap:
                queue(level)
                sent[level] += 1
        time.sleep(0.005)
    stop.set()
    collector.join()
    return summary(latencies)


def collect(web: WebQueue, outstanding: dict, latencies: dict, lock: threading.Lock, stop: threading.Event) -> None:
    """Until `stop`, every 10 ms: the latency of each outstanding job whose result is there (one MGET)."""
    while not stop.wait(0.01):
        with lock:
            keys = list(outstanding)
        if not keys:
            continue
        now = time.monotonic()
        for key, value in zip(keys, web.redis.mget(keys), strict=True):
            if value is not None:
                with lock:
                    level, queued = outstanding.pop(key)
                latencies[level].append(now - queued)


def summary(latencies: dict[str, list[float]]) -> dict:
    """Per level: jobs answered, their share of all answered, p50 and p95 latency (ms)."""
    answered = sum(len(v) for v in latencies.values())
    return {
        level: {
            "answered": len(values),
            "share": len(values) / answered if answered else 0.0,
            "p50_ms": float(np.percentile(values, 50)) * 1000 if values else None,
            "p95_ms": float(np.percentile(values, 95)) * 1000 if values else None,
        }
        for level, values in latencies.items()
    }


def report(results: dict[str, dict]) -> list[str]:
    batch_ms = SECONDS_PER_IMAGE * BATCH * 1000
    lines = [f"batch of {BATCH}: {batch_ms:.0f} ms of stand-in model time; high every {HIGH_GAP * 1000:.0f} ms, "
             f"normal every {NORMAL_GAP * 1000:.0f} ms, against a low backlog"]  # fmt: skip
    lines.append(f"{'PRIORITY_WEIGHTS':<18}{'level':<8}{'answered':>9}{'share':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for weights, levels in results.items():
        for level, r in levels.items():
            p50 = f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-"
            p95 = f"{r['p95_ms']:.0f}" if r["p95_ms"] is not None else "-"
            lines.append(f"{weights:<18}{level:<8}{r['answered']:>9}{r['share']:>8.2f}{p50:>9}{p95:>9}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of mixed load per weighting")
    parser.add_argument("--backlog", type=int, default=3000, help="low jobs queued before the load starts")
    args = parser.parse_args(argv)
    results = {weights: measure(weights, args.seconds, args.backlog) for weights in ("8,4,1", "1,1,1")}
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
