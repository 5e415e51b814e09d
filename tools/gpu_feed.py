"""Can one worker feed a GPU? The real Worker drains a prefilled queue with a stand-in model that sleeps for
a GPU's time per batch (the GIL is free, as during a real kernel).

    python -m tools.gpu_feed [--jobs 3000] [--ms-per-batch 7.1] [--per 32] [--batch-size 32] [--codec zstd]

Prints jobs/s, the ratio to the stand-in's own rate, the fraction of the time the stand-in was busy,
worker CPU per job (everything but the model) and Redis CPU per job. Defaults: an H100 running ResNet50
fp32 at 7.1 ms per batch of 32 (4,507 images/s); `--ms-per-batch 21.1 --per 256 --batch-size 256` is
the bf16 H100.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis

from imgserve.imaging.prepare import prepare_image
from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol import Job, connect
from tools.queues import Queues

PROJECT = Path(__file__).resolve().parent.parent
CASTLE = PROJECT.parent / "shared" / "images" / "castle_image.jpg"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Feed:
    jobs: int
    seconds: float
    jobs_per_s: float
    standin_rate: float
    ratio: float
    busy_fraction: float
    worker_cpu_ms_per_job: float
    redis_cpu_ms_per_job: float
    batch_size: int
    codec: str
    job_bytes: int


def castle_pixels() -> np.ndarray:
    """The castle photo prepared as the web server prepares it; a generated photo-like image without it."""
    if CASTLE.exists():
        return prepare_image(CASTLE.read_bytes())
    y, x = np.mgrid[0:224, 0:224]
    noise = np.random.default_rng(0).integers(0, 8, (224, 224, 3))
    return (np.stack([x, y, (x + y) // 2], axis=-1) + noise).astype(np.uint8)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(jobs: int, seconds_per_image: float, batch_size: int, codec: str, timeout: float = 300) -> Feed:
    """One drain of `jobs` prefilled castle jobs by one stand-in worker, on a Redis of its own."""
    pixels = castle_pixels()
    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        client = connect(server.url)
        queue = Queues.on(client, "gpufeed")
        staging = queue.keys.queue + ":staging"  # filled first, then renamed onto the queue in one step
        raws = [Job.new(pixels, "00000000bec0", 3600, codec).to_json() for _ in range(jobs)]
        for start in range(0, jobs, 500):
            client.lpush(staging, *raws[start : start + 500])
        env = dict(
            os.environ,
            REDIS_URL=server.url,
            IMAGE_QUEUE="gpufeed",
            BATCH_SIZE=str(batch_size),
            METRICS_PORT="0",
            LOG_LEVEL="ERROR",
        )
        stats = f"{tmp}/stats.json"
        args = [sys.executable, "-m", "tools.standin", "--seconds-per-image", repr(seconds_per_image), "--stats", stats]
        worker = subprocess.Popen(args, cwd=PROJECT, env=env)
        try:
            _wait(lambda: client.scard(queue.keys.workers) == 1, 60, "the worker to register")
            time.sleep(0.5)  # until it blocks on the empty queue
            cpu0, redis0, t0 = process_cpu(worker.pid), redis_cpu(client), time.perf_counter()
            client.rename(staging, queue.keys.queue)
            [worker_id] = [w.decode() for w in client.smembers(queue.keys.workers)]
            drained = [queue.keys.queue, *queue.keys.processing_lists(worker_id)]
            _wait(lambda: client.exists(*drained) == 0, timeout, "the queue to drain", interval=0.005)
            seconds = time.perf_counter() - t0
            cpu1, redis1 = process_cpu(worker.pid), redis_cpu(client)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        stats = json.loads(Path(stats).read_text())
        results = sum(1 for _ in client.scan_iter(match=queue.keys.result_prefix + "*", count=1000))
        if results != jobs:
            raise RuntimeError(f"{results} results for {jobs} jobs")
    standin_rate = 1 / seconds_per_image
    return Feed(
        jobs=jobs,
        seconds=seconds,
        jobs_per_s=jobs / seconds,
        standin_rate=standin_rate,
        ratio=jobs / seconds / standin_rate,
        busy_fraction=stats["busy_s"] / seconds,
        worker_cpu_ms_per_job=(cpu1 - cpu0) / jobs * 1000,
        redis_cpu_ms_per_job=(redis1 - redis0) / jobs * 1000,
        batch_size=batch_size,
        codec=codec,
        job_bytes=len(raws[0]),
    )


def _wait(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def describe(feed: Feed) -> str:
    return (
        f"{feed.jobs} jobs ({feed.codec}, {feed.job_bytes:,} bytes each), BATCH_SIZE={feed.batch_size}: "
        f"{feed.jobs_per_s:,.0f} jobs/s = {feed.ratio:.2f} of the stand-in's {feed.standin_rate:,.0f} images/s; "
        f"stand-in busy {feed.busy_fraction:.0%}; worker CPU {feed.worker_cpu_ms_per_job:.3f} ms/job; "
        f"Redis CPU {feed.redis_cpu_ms_per_job:.3f} ms/job"
    )


def step_costs(repeats: int = 300) -> dict[str, float]:
    """Milliseconds per castle job of each per-job step, the old way beside the new one, in this process."""
    import base64
    import timeit

    import zstandard

    from imgserve.imaging.codecs import _undo_row_deltas

    pixels = castle_pixels()
    zstd_raw = Job.new(pixels, "00000000bec0", 60, "zstd").to_json()
    raw_raw = Job.new(pixels, "00000000bec0", 60, "raw").to_json()
    image = Job.from_json(zstd_raw).image
    packed = base64.b64decode(image)
    deltas = np.frombuffer(zstandard.ZstdDecompressor().decompress(packed), np.uint8).reshape(224, 224, 3)

    def ms(call) -> float:
        return min(timeit.repeat(call, number=repeats, repeat=3)) / repeats * 1000

    return {
        "base64 decode, zstd image: stdlib": ms(lambda: base64.b64decode(image, validate=True)),
        "base64 decode, zstd image: pybase64": ms(lambda: __import__("pybase64").b64decode(image, validate=True)),
        "row deltas undone: np.cumsum": ms(lambda: np.cumsum(deltas, axis=0, dtype=np.uint8)),
        "row deltas undone: log-step prefix sum": ms(lambda: _undo_row_deltas(deltas)),
        "parse zstd job: json.loads": ms(lambda: json.loads(zstd_raw)),
        "parse zstd job: Job.from_json (image last)": ms(lambda: Job.from_json(zstd_raw)),
        "zstd decompress": ms(lambda: zstandard.ZstdDecompressor().decompress(packed)),
        "whole decode, zstd job: Job.from_json + pixels": ms(lambda: Job.from_json(zstd_raw).pixels()),
        "whole decode, raw job: Job.from_json + pixels": ms(lambda: Job.from_json(raw_raw).pixels()),
    }


def claim_costs(jobs: int = 2000, batch: int = 32) -> dict[str, float]:
    """Redis CPU ms per job to claim castle jobs: the old CLAIM Lua script (LRANGE, LTRIM, RPUSH, return)
    beside BLMOVE + LLEN and pipelined LMOVEs (WorkerQueue.claim_batch), on a Redis of its own."""
    lua_claim = """
    local jobs = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
    if #jobs == 0 then return jobs end
    redis.call('LTRIM', KEYS[1], 0, -#jobs - 1)
    redis.call('RPUSH', KEYS[2], unpack(jobs))
    return jobs
    """
    pixels = castle_pixels()
    raws = [Job.new(pixels, "00000000bec0", 3600, "zstd").to_json() for _ in range(jobs)]
    out = {}
    with LocalRedis() as server:
        client = connect(server.url)
        queue = Queues.on(client, "claims")
        script = client.register_script(lua_claim)
        plist = queue.keys.processing("w", 0)

        def lua() -> int:
            first = client.blmove(queue.keys.queue, plist, 1, "RIGHT", "RIGHT")
            return 0 if first is None else 1 + len(script(keys=[queue.keys.queue, plist], args=[batch - 1]))

        def lmove() -> int:
            return len(queue.worker.claim_batch("w", batch, 0, 1))

        for name, claim in (("old: BLMOVE + CLAIM Lua script", lua), ("new: BLMOVE + LLEN, LMOVE pipeline", lmove)):
            for start in range(0, jobs, 500):
                client.lpush(queue.keys.queue, *raws[start : start + 500])
            before, moved = redis_cpu(client), 0
            while queue.inspect.depth():
                moved += claim()
                client.delete(plist)
            out[name] = (redis_cpu(client) - before) / moved * 1000
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--ms-per-batch", type=float, default=7.1, help="the stand-in's time per --per images")
    parser.add_argument("--per", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--codec", default="zstd")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--steps", action="store_true", help="also print each per-job step's cost, old beside new")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps:
        for name, ms in (step_costs() | claim_costs()).items():
            print(f"{name:55s} {ms:.4f} ms/job")
    per_image = args.ms_per_batch / 1000 / args.per
    for _ in range(args.repeat):
        feed = measure(args.jobs, per_image, args.batch_size, args.codec)
        print(json.dumps(asdict(feed)) if args.json else describe(feed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
