"""Load for the benchmarks: the stack as they start it, closed-loop HTTP clients, Redis's own command mixes,
and the meters that read what each process spent (INFO commandstats, /proc).

tools/bench.py and tools/front_door.py both drive load through these: front_door imports nothing from bench, which
runs front_door as its phase 12.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import redis
import requests

from imgserve.launch.local_redis import free_port
from imgserve.protocol import Claimer, Job, connect
from tools.processes import PROJECT, Child, WebServer, Worker
from tools.queues import Queues
from tools.standin import StandInModel

# Commands the benchmark itself sends; left out of every per-request count.
OWN_COMMANDS = {"info", "lindex", "echo", "monitor"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BATCH_FOR_MIX = 32  # jobs per batch in the Redis-alone mix
CLUSTER_SHARDS = 3  # shards, and primaries, in the cluster mix


# ---- meters --------------------------------------------------------------------------------------


def command_counts(client: redis.Redis) -> Counter:
    """Calls per command since the server started (INFO commandstats; in-script calls included)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def serving_commands(before: Counter, after: Counter) -> Counter:
    delta = after - before
    for name in OWN_COMMANDS:
        delta.pop(name, None)
    return delta


def _proc_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    try:
        fields = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def with_children(pid: int) -> list[int]:
    """The process and its direct children (gunicorn master and its workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_proc_stat(int(entry.name))[1]) == pid:
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return pids


def machine_times() -> tuple[float, float]:
    """(busy, steal): CPU seconds all cores have spent busy, and lost to other virtual machines, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = values[3] + values[4], values[7]  # idle + iowait; steal
    return (sum(values[:7]) - idle) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuMeter:
    """CPU used by each component of the stack, and by everything else on the machine, over a window."""

    def __init__(self, components: dict[str, list[int]]) -> None:
        self.components = components

    def snapshot(self) -> dict[str, float]:
        shot = {name: sum(process_cpu(p) for p in pids) for name, pids in self.components.items()}
        shot["machine"], shot["steal"] = machine_times()
        return shot

    @staticmethod
    def describe(before: dict[str, float], after: dict[str, float], seconds: float, requests_done: int) -> dict:
        used = {name: after[name] - before[name] for name in before}
        busy, steal = used.pop("machine"), used.pop("steal")
        used["other processes"] = max(0.0, busy - sum(used.values()))
        cores = os.cpu_count() or 1
        return {
            name: {
                "cores": round(v / seconds, 2),
                "ms_per_request": round(1000 * v / requests_done, 2) if requests_done else None,
            }
            for name, v in used.items()
        } | {
            "machine_cores": cores,
            "idle_cores": round(max(0.0, cores - (busy + steal) / seconds), 2),
            "steal_cores": round(steal / seconds, 2),
        }


def redis_pid(client: redis.Redis) -> int:
    """The Redis server's process id, for its CPU time in /proc."""
    return int(client.info("server")["process_id"])


# ---- the stack -----------------------------------------------------------------------------------


class Web(WebServer):
    """gunicorn serving run_web_server, exactly as `make run` starts it, on a free port."""

    def __init__(self, env: dict[str, str], processes: int = 1, threads: int = 64) -> None:
        super().__init__(dict(env, WEB_THREADS=str(threads)), gunicorn=True, processes=processes)

    def wait_ready(self, timeout: float = 60) -> Web:
        self.wait_for_http(self.url + "/healthz", timeout)
        return self


class WorkerProcess(Worker):
    """A model worker (or the stand-in with no model) serving its Prometheus metrics on a free port."""

    def __init__(self, env: dict[str, str], null: bool = False) -> None:
        self.metrics_port = free_port()
        self.null = null
        super().__init__(dict(env, METRICS_PORT=str(self.metrics_port), WEB_HOST="127.0.0.1"))

    def _start(self, args: list[str], **output: object) -> subprocess.Popen:
        if self.null:
            return subprocess.Popen([sys.executable, "-m", "tools.standin"], cwd=PROJECT, env=self.env, **output)
        return super()._start(args, **output)

    def inference(self) -> tuple[float, int]:
        """(seconds, batches) the worker has spent in classifier.classify so far (worker_inference_seconds)."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        totals = dict(re.findall(r"^worker_inference_seconds_(sum|count) (\S+)$", text, re.MULTILINE))
        return float(totals["sum"]), int(float(totals["count"]))


def start_worker(env: dict[str, str], null: bool = False) -> WorkerProcess:
    """A worker process, returned once it has registered (the real one has loaded and traced the model)."""
    child = WorkerProcess(env, null)
    try:
        return child.wait_registered(180)
    except RuntimeError:
        child.stop()
        raise


@contextmanager
def running(child: Child) -> Iterator[Child]:
    """Stop the child at the end of the block, however it ends, and delete its log file."""
    try:
        yield child
    finally:
        child.stop()
        Path(child.log_file.name).unlink(missing_ok=True)


class Client:
    """Posts the sample image as a multipart upload, as `requests` clients do; one Session per thread."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self._local = threading.local()

    def post(self, url: str) -> tuple[float, float, int]:
        """(finished at, seconds taken, HTTP status) of one /predict request."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        files = {"image": ("castle_image.jpg", self.image, "image/jpeg")}  # a new multipart boundary each time
        started = time.perf_counter()
        response = session.post(url + "/predict", files=files, timeout=120)
        finished = time.perf_counter()
        if response.status_code == 200:
            response.json()
        return finished, finished - started, response.status_code


@dataclass
class Load:
    """What a closed-loop load run measured inside its window."""

    done: int
    errors: int
    seconds: float
    latencies: list[float]
    commands: Counter
    cpu: dict
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.seconds


def closed_loop(
    client: Client,
    url: str,
    threads: int,
    warmup: float,
    window: float,
    counter: redis.Redis,
    meter: CpuMeter,
    during: Callable[[], dict] | None = None,
) -> Load:
    """`threads` clients each send a request as soon as the last one returned; measure `window` s after `warmup` s."""
    stop = threading.Event()
    finished: list[tuple[float, float, int]] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                finished.append(client.post(url))
            except requests.RequestException:
                finished.append((time.perf_counter(), 0.0, 0))

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    time.sleep(warmup)
    start, commands, cpu = time.perf_counter(), command_counts(counter), meter.snapshot()
    extra = during() if during else {}
    time.sleep(max(0.0, window - (time.perf_counter() - start)))
    end, commands_after, cpu_after = time.perf_counter(), command_counts(counter), meter.snapshot()
    stop.set()
    for thread in pool:
        thread.join(180)
    inside = [f for f in finished if start <= f[0] < end]
    ok = [f for f in inside if f[2] == 200]
    return Load(
        done=len(ok),
        errors=len(inside) - len(ok),
        seconds=end - start,
        latencies=[f[1] for f in ok],
        commands=serving_commands(commands, commands_after),
        cpu=CpuMeter.describe(cpu, cpu_after, end - start, len(ok)),
        extra=extra,
    )


def batch_sizes(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"batch done: (\d+) jobs", log)]


class LogMark:
    """Batch sizes the given workers logged after this point."""

    def __init__(self, workers: list[Child]) -> None:
        self.workers = workers
        self.offsets = [len(w.log) for w in workers]

    def sizes(self) -> list[int]:
        return [n for w, off in zip(self.workers, self.offsets, strict=True) for n in batch_sizes(w.log[off:])]


# ---- Redis alone: the per-request command mix, without HTTP or model ------------------------------


def null_result() -> dict:
    """A result in the real format (top-5 labels), as the stand-in model answers."""
    return {"success": True, "predictions": StandInModel().classify(np.zeros((1, 224, 224, 3), np.uint8))[0]}


def redis_mix(url: str, queue_name: str, seconds: float, job_json: bytes) -> int:
    """Run the per-request Redis mix for `seconds` in batches of BATCH_FOR_MIX; the number of requests done."""
    queue = Queues.on(connect(url), queue_name, result_ttl=60)
    template = Job.from_json(job_json)
    result = null_result()
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        jobs = [replace(template, id=f"{done + i:032x}") for i in range(BATCH_FOR_MIX)]
        for job in jobs:
            queue.web.enqueue(job, max_queue=10 * BATCH_FOR_MIX)
        claimed = queue.worker.claim_batch("mix-worker", BATCH_FOR_MIX, wait=0, block=1)
        queue.worker.finish_batch("mix-worker", [(Job.from_json(raw), result) for raw in claimed], [])
        for job in jobs:
            queue.web.take_result(job.origin, job.id)
        done += len(jobs)
    return done


def cluster_mix(url: str, queue_name: str, seconds: float, job_json: bytes) -> list[int]:
    """Phase 8's mix on a sharded queue, for `seconds`: enqueue BATCH_FOR_MIX jobs (spread over the shards), claim
    them back shard by shard, publish, take every result. Returns the jobs done in each shard."""
    queue = Queues.on(connect(url), queue_name, result_ttl=60, shards=CLUSTER_SHARDS)
    claimer = Claimer(queue.worker, "mix-worker", range(CLUSTER_SHARDS), BATCH_FOR_MIX, 0)
    claimer.registered.update(range(CLUSTER_SHARDS))
    template, result = Job.from_json(job_json), null_result()
    per_shard, done, end = [0] * CLUSTER_SHARDS, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        jobs = [replace(template, id=f"{done + i:032x}") for i in range(BATCH_FOR_MIX)]
        for job in jobs:
            queue.web.enqueue(job, max_queue=10 * BATCH_FOR_MIX)
            per_shard[job.shard] += 1
        claimed = 0
        while claimed < len(jobs):
            shard, raws = claimer.claim(0)
            queue.worker.finish_batch("mix-worker", [(Job.from_json(raw), result) for raw in raws], [], 0, shard)
            claimed += len(raws)
        for job in jobs:
            queue.web.take_result(job.origin, job.id, job.shard)
        done += len(jobs)
    return per_shard
