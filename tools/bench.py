"""`make bench`: the model's own speed against the whole serving path, measured side by side in one run.

    python -m tools.bench [--quick] [--json FILE] [--markdown FILE] [--sweep BATCH_WAIT_MS=0,2,10] ...

Starts its own Redis, model worker(s) and gunicorn web server(s) (MODEL_WEIGHTS=none: random
weights, the same compute as the real ones) and prints, each against its goal:

 1. the raw model limit: model.Classifier.predict alone, images/s per batch size; Keras model.predict beside it
 2. saturation: images/s through HTTP + Redis + worker with 32 concurrent clients, as a ratio of (1)
 3. low-load latency: p50 of sequential requests minus the batch-1 model time (the model alone, called between
    the requests); the p50 of each request's time minus the worker's own inference time for it; and the p50
    with no model at all (tools/standin.py)
 4. Redis commands per request (INFO commandstats) and bytes per queued job
 5. the serving ceiling: requests/s with a stand-in classifier (no model), many clients
 6. throughput with 1 and 2 model workers
 7. low-load latency and commands with NOTIFICATIONS=auto vs off, interleaved
 8. Redis alone: its CPU per request for our command mix, so how many requests one Redis core carries
 9. GPU feed: one worker and a stand-in model that sleeps for an H100's time per batch (tools/gpu_feed.py)
10. preparing one upload (castle, a 48 MP JPEG, 4096x4096 RGBA and 6300x6300 PNGs): CPU and peak memory
11. Redis Cluster: phase 8's mix over QUEUE_SHARDS=3 on a local 3-primary cluster: jobs per shard, Redis CPU
    per request on each node and commands per request, beside phase 8's single-Redis figures
    (`--cluster-only`: phases 8 and 11 alone, about a minute)
12. the front door (tools/front_door.py): web CPU per request by step, the web server before issue 13 beside
    this one, every JOB_CODEC (bytes, CPU on each side, pixel error), JPEG decoders; cores per 1,000 requests/s
13. priorities (tools/priority_mix.py): a mixed high/normal load over a low backlog, one stand-in worker; latency
    and share per level with PRIORITY_WEIGHTS 8,4,1 beside 1,1,1 (`--priority-only`: this phase alone)
14. repeated images: the same upload from many clients, RESULT_CACHE_TTL=0 beside 60, one real model worker
    (`--cache-only`: this phase alone, about a minute)
15. backends (tools/bench_backends.py): the model alone per backend and precision (TensorFlow, ONNX Runtime,
    OpenVINO; fp32, int8), then the stack at saturation on each (`--backends-only`: this phase alone)

Clients, web server, Redis and workers all share this machine's cores; the output says how much
CPU each used, and how much other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import redis
import requests

from imgserve import settings
from imgserve.imaging.codecs import CODECS
from imgserve.launch.local_redis import LocalCluster, LocalRedis
from imgserve.protocol import Job, connect
from tools.bench_report import Report
from tools.load import (
    BATCH_FOR_MIX,
    CLUSTER_SHARDS,
    OWN_COMMANDS,
    Client,
    CpuMeter,
    Load,
    LogMark,
    Web,
    WorkerProcess,
    closed_loop,
    cluster_mix,
    command_counts,
    null_result,
    process_cpu,
    redis_mix,
    redis_pid,
    running,
    serving_commands,
    start_worker,
    with_children,
)
from tools.processes import CASTLE, PROJECT, Child, sample_image_bytes, server_env
from tools.queues import Queues

MONITOR_END = "imgserve-bench-monitor-end"


@dataclass(frozen=True)
class Plan:
    """How long each phase runs."""

    repeats: int  # model timings per batch size (median taken)
    sequential: int  # low-load requests per notification mode
    warmup: float  # seconds of load before a throughput window opens
    window: float  # seconds of the 1-worker saturation window
    window_two: float  # seconds of the 2-worker window
    ceiling_window: float
    redis_window: float
    front_door_rounds: int  # alternating windows per web server in phase 11
    front_door_window: float
    clients: int = 32
    ceiling_clients: int = 64


FULL = Plan(
    repeats=5,
    sequential=40,
    warmup=15,
    window=60,
    window_two=45,
    ceiling_window=20,
    redis_window=15,
    front_door_rounds=3,
    front_door_window=10,
)
QUICK = Plan(repeats=3, sequential=12, warmup=6, window=15, window_two=12, ceiling_window=8, redis_window=6,
             front_door_rounds=1, front_door_window=5)  # fmt: skip


# ---- measuring helpers -------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples)) * 1000


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) * 1000


def cpu_lines(report: Report, cpu: dict) -> None:
    parts = [
        f"{name} {v['cores']:.2f} cores" + (f" ({v['ms_per_request']:.1f} ms/request)" if v["ms_per_request"] else "")
        for name, v in cpu.items()
        if isinstance(v, dict)
    ]
    report.say(
        f"   CPU over the window (of {cpu['machine_cores']} cores): "
        + "; ".join(parts)
        + f"; idle {cpu['idle_cores']:.2f} cores; taken by the hypervisor (steal) {cpu['steal_cores']:.2f} cores"
    )


def sample_job(queue: Queues, tries: int = 200) -> bytes | None:
    """A real job as the web server queued it, read at the queue's head without claiming it."""
    for _ in range(tries):
        raw = queue.inspect.peek()
        if raw is not None:
            return raw
        time.sleep(0.01)
    return None


def monitor(url: str, action: Callable[[], int]) -> tuple[Counter, int]:
    """Run `action` (returns how many requests it made) under MONITOR; count commands by (source, name).

    Source is 'script' for commands a Lua script ran, 'client' for network round trips.
    """
    watcher, ender = redis.Redis.from_url(url), redis.Redis.from_url(url)
    ender.ping()  # connect now: its handshake must not be counted
    seen: Counter = Counter()
    with watcher.monitor() as mon:

        def read() -> None:
            while True:
                entry = mon.next_command()
                if entry["command"] == f"ECHO {MONITOR_END}":
                    return
                name = entry["command"].split(" ", 1)[0].lower()
                if name not in OWN_COMMANDS:
                    seen["script" if entry["client_type"] == "lua" else "client", name] += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        count = action()
        ender.echo(MONITOR_END)
        reader.join(60)
    watcher.close()
    ender.close()
    return seen, count


# ---- the phases --------------------------------------------------------------------------------


def model_limit(report: Report, plan: Plan, batch_size: int) -> tuple[dict, object]:
    """(1) The model alone in this process: compiled call vs Keras model.predict, per batch size.

    Returns the figures and the loaded Classifier, for re-measuring later in the run."""
    from imgserve.worker.model import Classifier

    report.section("1. Raw model limit: ResNet50 alone (model.Classifier.predict on uint8 batches, random weights)")
    classifier = Classifier("none")
    rng = np.random.default_rng(0)
    sizes = sorted({1, 8, 16, batch_size})
    out = {}
    for size in sizes:
        images = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
        compiled, keras = _timed_pair(
            lambda im=images: classifier.predict(im),
            lambda im=images, s=size: _keras_predict(classifier, im, s),
            plan.repeats,
        )
        out[size] = {
            "compiled_ms": median_ms(compiled),
            "keras_predict_ms": median_ms(keras),
            "images_per_s": size / float(np.median(compiled)),
        }
        report.say(
            f"   batch {size:>3}: compiled {out[size]['compiled_ms']:8.1f} ms "
            f"({out[size]['images_per_s']:5.2f} images/s)"
            f"   Keras model.predict {out[size]['keras_predict_ms']:8.1f} ms"
            f"   (medians of {plan.repeats})"
        )
    report.say(
        f"   raw limit at BATCH_SIZE={batch_size}: {out[batch_size]['images_per_s']:.2f} images/s; "
        f"batch-1 latency {out[1]['compiled_ms']:.1f} ms"
    )
    model = {"batch_size": batch_size, "by_batch": out}
    model["limit_images_per_s"], model["batch1_ms"] = out[batch_size]["images_per_s"], out[1]["compiled_ms"]
    return model, classifier


def recheck_model(report: Report, classifier, model: dict, repeats: int) -> None:
    """Time batch 1 and BATCH_SIZE again right before the end-to-end phases (stack idle); keep the faster of each.

    The faster model time makes every ratio and overhead stricter; a large gap means the machine was busy.
    """
    report.section("1b. The model alone again, with the stack started and idle, right before the end-to-end phases")
    size = model["batch_size"]
    rng = np.random.default_rng(1)
    one, full = (rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (1, size))
    batch1, batch_full = _timed_pair(lambda: classifier.predict(one), lambda: classifier.predict(full), repeats)
    again = {"batch1_ms": median_ms(batch1), "limit_images_per_s": size / float(np.median(batch_full))}
    model["recheck"] = again
    drift = abs(again["limit_images_per_s"] / model["limit_images_per_s"] - 1)
    if drift > 0.1:
        report.say(f"   WARNING: the model's speed changed by {100 * drift:.0f}% between (1) and now: the machine is")
        report.say("   busy or throttled, so every ratio below is rough. Re-run on a quiet machine.")
    model["batch1_ms"] = min(model["batch1_ms"], again["batch1_ms"])
    model["limit_images_per_s"] = max(model["limit_images_per_s"], again["limit_images_per_s"])
    report.say(
        f"   batch 1 {again['batch1_ms']:.1f} ms, "
        f"batch {size} {again['limit_images_per_s']:.2f} images/s; from here on: batch-1 time "
        f"{model['batch1_ms']:.1f} ms and raw limit {model['limit_images_per_s']:.2f} images/s (the faster of the two)"
    )


def _keras_predict(classifier, images: np.ndarray, size: int) -> np.ndarray:
    from keras.applications.resnet50 import preprocess_input

    return classifier.model.predict(preprocess_input(images.astype(np.float32)), batch_size=size, verbose=0)


def _timed_pair(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[list, list]:
    """Wall times of two calls, alternated so that both see the same machine; one warm-up call each."""
    first(), second()  # first calls trace and allocate
    samples: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for call, into in ((first, samples[0]), (second, samples[1])):
            started = time.perf_counter()
            call()
            into.append(time.perf_counter() - started)
    return samples


def low_load(
    report: Report,
    plan: Plan,
    client: Client,
    webs: dict[str, Web],
    worker: WorkerProcess,
    counter: redis.Redis,
    models: tuple[dict, object],
    meter: CpuMeter,
) -> dict:
    """(3) + (7): sequential requests, alternating between the NOTIFICATIONS=auto and =off web servers, with a
    batch-1 call of the model alone (in this process) between rounds, so that both see the same machine."""
    report.section("3/7. Low load: one client, sequential requests, NOTIFICATIONS=auto and =off interleaved")
    report.say("   command counts include the workers' heartbeats and reaper, which fall in the window now and then")
    model, classifier = models
    one = np.random.default_rng(2).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    low = {mode: new_tally() for mode in webs}
    alone: list[float] = []
    started, cpu = time.perf_counter(), meter.snapshot()
    for _ in range(plan.sequential):
        for mode, web in webs.items():
            _one_measured_request(client, web, worker, counter, low[mode])
        began = time.perf_counter()
        classifier.predict(one)
        alone.append(time.perf_counter() - began)
    usage = CpuMeter.describe(cpu, meter.snapshot(), time.perf_counter() - started, plan.sequential * len(webs))
    model_1 = median_ms(alone)
    model["batch1_alongside_ms"] = model_1
    report.say(
        f"   the model alone, batch 1, called in this process between the rounds: p50 {model_1:.1f} ms "
        f"(phase 1/1b: {model['batch1_ms']:.1f} ms)"
    )
    out = {"cpu": usage, "model_batch1_ms": model_1}
    for mode, m in low.items():
        f = out[mode] = _low_load_figures(m, model_1)
        report.say(
            f"   NOTIFICATIONS={mode:<4}: {f['requests']} requests, p50 {f['p50_ms']:.1f} ms, "
            f"p90 {f['p90_ms']:.1f} ms; p50 minus the batch-1 model time ({model_1:.1f} ms) = {f['overhead_ms']:.1f} ms"
        )
        report.say(
            f"      per request, its time minus the worker's own inference time for it: p50 {f['stack_p50_ms']:.1f} ms "
            f"(the worker's inference: {f['worker_inference_ms']:.1f} ms per batch, {f['batches']} batches)"
        )
        report.say(
            f"      {f['commands_per_request']:.2f} Redis commands/request: {_breakdown(m['commands'], f['requests'])}"
        )
    cpu_lines(report, usage)
    report.say("   (the bench's CPU in this phase includes the model-alone calls between the rounds)")
    return out


def new_tally() -> dict:
    """What _one_measured_request accumulates for one setup."""
    return {"latencies": [], "own": [], "commands": Counter(), "inference": [0.0, 0]}


def _low_load_figures(tally: dict, model_1: float) -> dict:
    samples, commands, (seconds, batches) = tally["latencies"], tally["commands"], tally["inference"]
    p50 = median_ms(samples)
    return {
        "requests": len(samples),
        "p50_ms": p50,
        "p90_ms": percentile_ms(samples, 90),
        "mean_ms": 1000 * float(np.mean(samples)),
        "overhead_ms": p50 - model_1,
        "batches": batches,
        "worker_inference_ms": 1000 * seconds / batches if batches else float("nan"),
        "stack_p50_ms": median_ms(tally["own"]),
        "commands_per_request": sum(commands.values()) / len(samples),
        "commands": dict(commands),
    }


def _breakdown(commands: Counter, requests_done: int) -> str:
    return ", ".join(f"{name} {n / requests_done:.2f}" for name, n in commands.most_common())


def round_trips(report: Report, url: str, client: Client, redis_url: str, count: int) -> dict:
    """(4) Which commands are network round trips and which run inside Lua scripts (MONITOR)."""

    def action() -> int:
        for _ in range(count):
            client.post(url)
        return count

    seen, n = monitor(redis_url, action)
    by_source = Counter()
    for (source, _), calls in seen.items():
        by_source[source] += calls
    out = {
        "requests": n,
        "round_trips_per_request": by_source["client"] / n,
        "in_script_per_request": by_source["script"] / n,
        "commands": {f"{s}:{c}": v / n for (s, c), v in seen.most_common()},
    }
    report.say(
        f"   MONITOR over {n} sequential requests (NOTIFICATIONS=auto): "
        f"{out['round_trips_per_request']:.2f} round trips"
        f" + {out['in_script_per_request']:.2f} commands inside Lua scripts per request"
    )
    report.say("      " + ", ".join(f"{k} {v:.2f}" for k, v in out["commands"].items()))
    return out


def saturation(
    plan: Plan, client: Client, web: Web, workers: list[Child], counter: redis.Redis, meter: CpuMeter, queue: Queues
) -> Load:
    """(2)/(6) closed-loop clients against the real model worker(s); samples a queued job meanwhile."""
    mark = LogMark(workers)
    load = closed_loop(
        client, web.url, plan.clients, plan.warmup, plan.window, counter, meter, lambda: {"job": sample_job(queue)}
    )
    load.extra["batches"] = mark.sizes()
    return load


def describe_saturation(report: Report, load: Load, model: dict, label: str) -> dict:
    limit = model["limit_images_per_s"]
    best_size, best = max(((n, v["images_per_s"]) for n, v in model["by_batch"].items()), key=lambda nv: nv[1])
    total = sum(load.commands.values())
    sizes = load.extra.get("batches") or [0]
    out = {
        "images_per_s": load.rate,
        "ratio_to_raw_limit": load.rate / limit,
        "ratio_to_best_model_rate": load.rate / best,
        "requests": load.done,
        "errors": load.errors,
        "seconds": load.seconds,
        "p50_ms": median_ms(load.latencies) if load.latencies else None,
        "mean_batch": float(np.mean(sizes)),
        "commands_per_request": total / load.done if load.done else None,
        "commands": dict(load.commands),
        "cpu": load.cpu,
    }
    report.say(
        f"   {label}: {load.done} requests in {load.seconds:.1f} s = {load.rate:.2f} images/s "
        f"({load.rate / limit:.3f} of the raw limit), {load.errors} errors, p50 {out['p50_ms']:.0f} ms, "
        f"mean batch {out['mean_batch']:.1f} (batches in the phase: {len(sizes)})"
    )
    report.say(
        f"      against the best model rate measured in (1), {best:.2f} images/s at batch {best_size}: "
        f"{load.rate / best:.3f}"
    )
    if load.done:
        report.say(f"      {total / load.done:.2f} Redis commands/request: {_breakdown(load.commands, load.done)}")
    cpu_lines(report, load.cpu)
    return out


def job_size(report: Report, raw: bytes | None) -> dict:
    """(4) Bytes one real queued job occupies, and how many of them are the image."""
    if raw is None:
        report.say("   no job was waiting in the queue while sampling; job size not measured")
        return {}
    job = Job.from_json(raw)
    out = {
        "job_bytes": len(raw),
        "image_field_bytes": len(job.image),
        "envelope_bytes": len(raw) - len(job.image),
        "codec": job.codec,
    }
    report.say(
        f"   a real queued job (read with QueueInspector.peek): {len(raw):,} bytes = base64 image {len(job.image):,} "
        f"(codec {job.codec}; raw would be 200,704) + JSON envelope {out['envelope_bytes']:,} "
        "(id, origin, shape, dtype, codec, times)"
    )
    return out


def ceiling(report: Report, plan: Plan, client: Client, env: dict, counter: redis.Redis) -> dict:
    """(5) The serving stack alone: gunicorn + Redis + a worker whose classifier does no work."""
    report.section("5. Serving ceiling: the serving stack alone (tools/standin.py: no model)")
    report.say(
        "   the worker still decodes every job and writes every result; only the model call is replaced by "
        "fixed-shape top-5 from all-zero probabilities"
    )
    out: dict = {}
    sequential: list[float] = []
    for processes in (1, 2):
        with running(start_worker(env, null=True)) as worker, running(Web(env, processes).wait_ready()) as web:
            if processes == 1:
                sequential = [client.post(web.url)[1] for _ in range(plan.sequential + 5)][5:]
                report.say(
                    f"   one client, {len(sequential)} sequential requests: p50 {median_ms(sequential):.1f} ms, "
                    f"p90 {percentile_ms(sequential, 90):.1f} ms: the serving path's own latency at low load"
                )
            meter = CpuMeter(
                {
                    "clients (the bench)": [os.getpid()],
                    "web (gunicorn)": with_children(web.process.pid),
                    "worker": [worker.process.pid],
                    "redis": [redis_pid(counter)],
                }
            )
            load = closed_loop(client, web.url, plan.ceiling_clients, 3.0, plan.ceiling_window, counter, meter)
        out[processes] = {
            "requests_per_s": load.rate,
            "errors": load.errors,
            "p50_ms": median_ms(load.latencies) if load.latencies else None,
            "commands_per_request": sum(load.commands.values()) / load.done if load.done else None,
            "cpu": load.cpu,
        }
        report.say(
            f"   {processes} web process(es) x 64 threads, {plan.ceiling_clients} client threads: {load.rate:.0f} "
            f"requests/s, {load.errors} errors, p50 {out[processes]['p50_ms']:.1f} ms"
        )
        cpu_lines(report, load.cpu)
    best = max(out, key=lambda p: out[p]["requests_per_s"])
    report.say(
        f"   the client threads run in this process, on the same {os.cpu_count()} cores as the servers: "
        "their CPU is taken from the stack"
    )
    return {
        "low_load_p50_ms": median_ms(sequential),
        "by_web_processes": out,
        "best": best,
        "steps": step_costs(report, client.image, 40),
    }


def step_costs(report: Report, image: bytes, repeats: int) -> dict:
    """CPU time of the heaviest per-request steps, each run alone in this process (median of `repeats`)."""
    from werkzeug.test import EnvironBuilder

    from imgserve.imaging.prepare import prepare_image
    from imgserve.web.uploads import UploadRequest

    files = {"image": ("castle_image.jpg", image, "image/jpeg")}
    uploads = [requests.Request("POST", "http://x/predict", files=files).prepare() for _ in range(repeats)]
    bodies = iter(uploads)
    pixels = prepare_image(image)
    raws = {codec: Job.new(pixels, "000000000000", 30, codec).to_json() for codec in CODECS}

    def parse() -> None:
        upload = next(bodies)  # a new multipart boundary each time, as real clients send
        environ = EnvironBuilder(method="POST", data=upload.body, content_type=upload.headers["Content-Type"])
        UploadRequest(environ.get_environ()).files["image"].read()

    steps = {
        "multipart parse (uploads.py)": parse,
        "prepare_image (helpers.py)": lambda: prepare_image(image),
    }
    for codec, raw in raws.items():
        steps[f"Job.new + to_json, {codec} (web)"] = lambda c=codec: Job.new(pixels, "000000000000", 30, c).to_json()
        steps[f"Job.from_json + pixels, {codec} (worker)"] = lambda r=raw: Job.from_json(r).pixels()
    out = {name: _cpu_ms(call, repeats) for name, call in steps.items()}
    report.say(
        "   CPU per request of single steps, run alone in this process (median of {}): {}".format(
            repeats, "; ".join(f"{name} {ms:.2f} ms" for name, ms in out.items())
        )
    )
    return out


def _cpu_ms(call: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        call()
        samples.append(time.process_time() - started)
    return median_ms(samples)


def redis_alone(report: Report, seconds: float, image: bytes, url: str, codec: str, processes: int = 2) -> dict:
    """(8) Redis with our per-request command mix and real job sizes, driven through Queues without HTTP or model.

    Each client process plays web and worker in turn: enqueue a batch of real jobs, claim it, publish the results,
    take every result. Redis's own CPU per request says how many requests one Redis core can carry.
    """
    from multiprocessing import get_context

    from imgserve.imaging.prepare import prepare_image

    report.section(
        f"8. Redis alone: the per-request command mix with real {BATCH_FOR_MIX}-job batches, no HTTP, no model"
    )
    job_json = Job.new(prepare_image(image), "0000000000ab", 3600, codec).to_json()
    counter = connect(url)
    pid = redis_pid(counter)
    before, cpu, started = command_counts(counter), process_cpu(pid), time.perf_counter()
    with get_context("spawn").Pool(processes) as pool:
        done = sum(pool.starmap(redis_mix, [(url, f"bench-mix-{i}", seconds, job_json) for i in range(processes)]))
    elapsed, used = time.perf_counter() - started, process_cpu(pid) - cpu
    commands = serving_commands(before, command_counts(counter))
    out = {
        "requests": done,
        "requests_per_s": done / elapsed,
        "redis_cpu_ms_per_request": 1000 * used / done,
        "redis_core_share": used / elapsed,
        "requests_per_s_per_redis_core": done / used if used else None,
        "commands_per_request": sum(commands.values()) / done,
        "commands": {name: n / done for name, n in commands.most_common()},
    }
    report.say(
        f"   {processes} client processes: {done / elapsed:.0f} requests/s, Redis busy {used / elapsed:.2f} of a core; "
        f"Redis CPU {out['redis_cpu_ms_per_request']:.3f} ms/request, so one Redis core carries about "
        f"{out['requests_per_s_per_redis_core']:.0f} requests/s of this mix (the clients, on the same cores, limit "
        "the measured rate)"
    )
    report.say(f"      {out['commands_per_request']:.2f} commands/request: {_breakdown(commands, done)}")
    out["job_bytes"], out["result_bytes"] = len(job_json), len(json.dumps(null_result()))
    report.say(
        f"      per request Redis stores and hands on one job of {out['job_bytes']:,} bytes and one result of "
        f"{out['result_bytes']:,} bytes (top-5 in the real format)"
    )
    return out


def redis_cluster(report: Report, seconds: float, image: bytes, codec: str, single: dict, processes: int = 2) -> dict:
    """(11) Phase 8's mix, each client spreading its jobs over CLUSTER_SHARDS shards of a local Redis Cluster
    whose shards each live on their own primary, and claiming them back shard by shard as a worker does."""
    from multiprocessing import get_context

    from imgserve.imaging.prepare import prepare_image

    report.section(
        f"11. Redis Cluster: phase 8's mix over QUEUE_SHARDS={CLUSTER_SHARDS} on a local {CLUSTER_SHARDS}-primary "
        "cluster, no HTTP, no model"
    )
    job_json = Job.new(prepare_image(image), "0000000000ab", 3600, codec).to_json()
    with LocalCluster(primaries=CLUSTER_SHARDS) as cluster:
        names = [cluster.spread_queue_name(f"bench-cluster-{i}", CLUSTER_SHARDS) for i in range(processes)]
        nodes = [redis.Redis(port=node.port) for node in cluster.nodes]
        before, cpu = [command_counts(n) for n in nodes], [process_cpu(node.process.pid) for node in cluster.nodes]
        started = time.perf_counter()
        with get_context("spawn").Pool(processes) as pool:
            runs = pool.starmap(cluster_mix, [(cluster.url, name, seconds, job_json) for name in names])
        elapsed = time.perf_counter() - started
        used = [process_cpu(node.process.pid) - c for node, c in zip(cluster.nodes, cpu, strict=True)]
        commands = sum((serving_commands(b, command_counts(n)) for b, n in zip(before, nodes, strict=True)), Counter())
        for node in nodes:
            node.close()
    return _describe_cluster(report, runs, elapsed, used, commands, single)


def _describe_cluster(
    report: Report, runs: list[list[int]], elapsed: float, used: list[float], commands: Counter, single: dict
) -> dict:
    per_shard = [sum(run[shard] for run in runs) for shard in range(CLUSTER_SHARDS)]
    done = sum(per_shard)
    out = {
        "requests": done,
        "requests_per_s": done / elapsed,
        "jobs_per_shard": per_shard,
        "spread_max_over_min": max(per_shard) / min(per_shard),
        "redis_cpu_ms_per_request_by_node": [1000 * u / done for u in used],
        "redis_cpu_ms_per_request": 1000 * sum(used) / done,
        "commands_per_request": sum(commands.values()) / done,
        "commands": {name: n / done for name, n in commands.most_common()},
    }
    report.say(
        f"   {len(runs)} client processes: {done / elapsed:.0f} requests/s; jobs per shard {per_shard} "
        f"(largest / smallest {out['spread_max_over_min']:.3f})"
    )
    report.say(
        "   Redis CPU per request on each node: "
        + ", ".join(f"{ms:.3f} ms" for ms in out["redis_cpu_ms_per_request_by_node"])
        + f"; all nodes together {out['redis_cpu_ms_per_request']:.3f} ms, "
        f"against {single['redis_cpu_ms_per_request']:.3f} ms on the single Redis of phase 8"
    )
    report.say(
        f"   {out['commands_per_request']:.2f} commands/request against {single['commands_per_request']:.2f} on the "
        f"single Redis: {_breakdown(commands, done)}"
    )
    report.say(
        "      (a worker's batch comes from one shard: per request a third of phase 8's batch, so the claim's "
        "BLMOVE/LLEN and the acknowledgement count about three times as often per job)"
    )
    return out


def sweep(report: Report, plan: Plan, client: Client, env: dict, counter: redis.Redis, spec: str) -> dict:
    """Several values of one setting side by side (`spec` like BATCH_WAIT_MS=0,2,10): each value has its own
    queue, worker and web server, all running; low-load requests go round-robin over them and saturation
    windows alternate between them, so machine noise falls on every value alike."""
    name, _, raw = spec.partition("=")
    name, values = name.strip().upper(), [v.strip() for v in raw.split(",") if v.strip()]
    for value in values:
        settings.load(env={name: value}, role=settings.ALL)  # a bad name or value stops here, naming the variable
    report.section(f"Sweep: {name} side by side (one worker and queue per value, NOTIFICATIONS=auto)")
    with ExitStack() as stack:
        setups = {}
        for i, value in enumerate(values):
            wenv = dict(env, **{name: value}, IMAGE_QUEUE=f"bench-sweep-{i}")
            worker = stack.enter_context(running(start_worker(wenv)))
            setups[value] = (worker, stack.enter_context(running(Web(wenv).wait_ready())))
        for _, web in setups.values():
            for _ in range(3):
                client.post(web.url)
        low = {value: new_tally() for value in values}
        for _ in range(plan.sequential):
            for value, (worker, web) in setups.items():
                _one_measured_request(client, web, worker, counter, low[value])
        sat = {value: {"done": 0, "seconds": 0.0, "sizes": []} for value in values}
        for _ in range(3):
            for value, (worker, web) in setups.items():
                mark = LogMark([worker])
                window = max(plan.window / 3, 20.0)  # shorter windows count too few batches to compare
                load = closed_loop(client, web.url, plan.clients, plan.warmup, window, counter, CpuMeter({}))
                sat[value]["done"] += load.done
                sat[value]["seconds"] += load.seconds
                sat[value]["sizes"] += mark.sizes()
    out = {}
    for value in values:
        f = _low_load_figures(low[value], 0.0)
        rate, sizes = sat[value]["done"] / sat[value]["seconds"], sat[value]["sizes"] or [0]
        out[value] = {
            "low_load_p50_ms": f["p50_ms"],
            "low_load_stack_p50_ms": f["stack_p50_ms"],
            "low_load_commands_per_request": f["commands_per_request"],
            "saturation_images_per_s": rate,
            "mean_batch": float(np.mean(sizes)),
        }
        report.say(
            f"   {name}={value}: low load p50 {f['p50_ms']:.1f} ms, minus each request's own inference "
            f"{f['stack_p50_ms']:.1f} ms (p50), {f['commands_per_request']:.2f} commands/request; "
            f"saturation ({plan.clients} clients) {rate:.2f} images/s, mean batch {np.mean(sizes):.1f}"
        )
    return {"setting": name, "values": out}


def _one_measured_request(client: Client, web: Web, worker: WorkerProcess, counter: redis.Redis, into: dict) -> None:
    before, (model_s, batches) = command_counts(counter), worker.inference()
    taken = client.post(web.url)[1]
    into["commands"] += serving_commands(before, command_counts(counter))
    after_s, after_batches = worker.inference()
    into["latencies"].append(taken)
    into["own"].append(taken - (after_s - model_s))
    into["inference"] = [into["inference"][0] + after_s - model_s, into["inference"][1] + after_batches - batches]


# ---- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    plan = QUICK if args.quick else FULL
    config = settings.load(role=settings.ALL)
    report = Report()
    image = sample_image_bytes()
    source = "castle photo (../shared/images)" if CASTLE.exists() else "generated fallback image"
    report.say(
        f"imgserve benchmark ({'quick' if args.quick else 'full'} run), {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    report.say(
        f"BATCH_SIZE={config.batch_size}, BATCH_WAIT_MS={config.batch_wait_ms:g}, JOB_CODEC={config.job_codec}, "
        f"WEB_NICE={config.web_nice}, MODEL_WEIGHTS=none (random weights); "
        f"uploads: {source}, {len(image):,} bytes"
    )
    report.say("Other work on this machine disturbs every figure: the CPU lines show how much it took.")
    report.results["setup"] = {
        "batch_size": config.batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "job_codec": config.job_codec,
        "web_nice": config.web_nice,
        "image": source,
        "image_bytes": len(image),
        "cores": os.cpu_count(),
        "quick": args.quick,
    }
    client = Client(image)
    with ExitStack() as stack:
        server = stack.enter_context(LocalRedis())
        counter = connect(server.url)
        report.results["setup"]["redis_version"] = counter.info("server")["redis_version"]
        env = server_env(
            server.url,
            "bench",
            BATCH_SIZE=config.batch_size,
            BATCH_WAIT_MS=config.batch_wait_ms,
            JOB_CODEC=config.job_codec,
            WEB_NICE=config.web_nice,
            LOG_LEVEL="DEBUG",
            PYTHONPATH=str(PROJECT),
        )
        queue = Queues.on(counter, "bench")
        model, classifier = model_limit(report, plan, config.batch_size)
        report.results["model"] = model
        for spec in args.sweep or []:
            report.results.setdefault("sweeps", []).append(sweep(report, plan, client, env, counter, spec))
        measure_stack(report, plan, client, env, counter, queue, (model, classifier), stack, server.url)
        report.results["ceiling"] = ceiling(report, plan, client, env, counter)
        report.results["redis_alone"] = redis_alone(report, plan.redis_window, image, server.url, config.job_codec)
    report.results["redis_cluster"] = redis_cluster(
        report, plan.redis_window, image, config.job_codec, report.results["redis_alone"]
    )
    report.results["gpu_feed"] = gpu_feed(report, plan, config.job_codec)
    report.results["decode_cost"] = decode_cost(report)
    report.results["front_door"] = front_door(report, plan)
    report.results["priorities"] = priorities(report, plan)
    with LocalRedis() as server:
        env = server_env(server.url, "bench", BATCH_SIZE=config.batch_size, JOB_CODEC=config.job_codec,
                         PYTHONPATH=str(PROJECT))  # fmt: skip
        report.results["repeated_images"] = repeated_images(report, plan, client, env, connect(server.url))
        report.results["backends"] = backend_phase(report, plan, client, server.url, config.batch_size, image)
    verdicts(report)
    return report


def priorities(report: Report, plan: Plan) -> dict:
    """Phase 13: latency and share per priority level, PRIORITY_WEIGHTS 8,4,1 beside 1,1,1 (tools/priority_mix.py)."""
    from tools import priority_mix

    report.section("13. Priorities: mixed load over a low backlog (tools/priority_mix.py)")
    seconds = 4.0 if plan is QUICK else 8.0
    results = {weights: priority_mix.measure(weights, seconds, 3000) for weights in ("8,4,1", "1,1,1")}
    for line in priority_mix.report(results):
        report.say(line)
    return results


def backend_phase(report: Report, plan: Plan, client: Client, url: str, batch_size: int, image: bytes) -> dict:
    """Phase 15: tools/bench_backends.py on its own Redis; adds its goals."""
    from tools import bench_backends

    env = server_env(url, "bench-backends", BATCH_SIZE=batch_size, LOG_LEVEL="DEBUG", PYTHONPATH=str(PROJECT))
    results = bench_backends.backends(report, plan, client, env, connect(url), image, batch_size)
    bench_backends.goals(report, results)
    return results


def _alone(args: argparse.Namespace, phases: str) -> tuple[Plan, settings.Settings, Report, bytes]:
    """What a run of some phases alone starts with: the plan, the settings, a report headed `phases`, the image."""
    report = Report()
    report.say(f"imgserve benchmark, {phases}, {time.strftime('%Y-%m-%d %H:%M:%S')}; {os.cpu_count()} cores")
    return QUICK if args.quick else FULL, settings.load(role=settings.ALL), report, sample_image_bytes()


def run_backends_only(args: argparse.Namespace) -> Report:
    """Phase 15 alone: each backend's raw rate and the stack's saturation on it."""
    plan, config, report, image = _alone(args, f"phase 15 only ({'quick' if args.quick else 'full'})")
    with LocalRedis() as server:
        report.results["backends"] = backend_phase(report, plan, Client(image), server.url, config.batch_size, image)
    return report


def run_cluster_only(args: argparse.Namespace) -> Report:
    """Phases 8 and 11 alone: the single Redis and the cluster with the same mix, one after the other."""
    plan, config, report, image = _alone(args, "phases 8 and 11 only")
    with LocalRedis() as server:
        single = redis_alone(report, plan.redis_window, image, server.url, config.job_codec)
    report.results["redis_alone"] = single
    report.results["redis_cluster"] = redis_cluster(report, plan.redis_window, image, config.job_codec, single)
    cluster_verdicts(report)
    return report


def measure_stack(
    report: Report,
    plan: Plan,
    client: Client,
    env: dict[str, str],
    counter: redis.Redis,
    queue: Queues,
    models: tuple[dict, object],
    stack: ExitStack,
    redis_url: str,
) -> None:
    """Phases 2, 3, 4, 6 and 7 against the real model worker(s)."""
    model, classifier = models
    first = stack.enter_context(running(start_worker(env)))
    webs = {
        "auto": stack.enter_context(running(Web(dict(env, NOTIFICATIONS="auto")).wait_ready())),
        "off": stack.enter_context(running(Web(dict(env, NOTIFICATIONS="off")).wait_ready())),
    }
    for web in webs.values():
        for _ in range(3):
            client.post(web.url)  # warm-up: connections, first-request costs
    recheck_model(report, classifier, model, plan.repeats)
    components = {
        "the bench (clients, measuring)": [os.getpid()],
        "web (gunicorn)": with_children(webs["auto"].process.pid) + with_children(webs["off"].process.pid),
        "workers": [first.process.pid],
        "redis": [redis_pid(counter)],
    }
    meter = CpuMeter(components)
    report.results["low_load"] = low_load(report, plan, client, webs, first, counter, models, meter)
    report.results["round_trips"] = round_trips(
        report, webs["auto"].url, client, redis_url, max(5, plan.sequential // 4)
    )

    report.section(f"2/6. Saturation: {plan.clients} concurrent clients, real model worker(s), NOTIFICATIONS=auto")
    one = saturation(plan, client, webs["auto"], [first], counter, CpuMeter(components), queue)
    report.results["saturation_1_worker"] = describe_saturation(report, one, model, "1 worker")
    report.results["job"] = job_size(report, one.extra.get("job"))
    with running(start_worker(env)) as second:
        components["workers"] = [first.process.pid, second.process.pid]
        two_plan = replace(plan, window=plan.window_two)
        two = saturation(two_plan, client, webs["auto"], [first, second], counter, CpuMeter(components), queue)
        report.results["saturation_2_workers"] = describe_saturation(report, two, model, "2 workers")
    report.say(f"   2 workers / 1 worker: {two.rate / one.rate:.2f}x (both share the same {os.cpu_count()} cores)")
    first.stop()
    for web in webs.values():
        web.stop()


# Stand-ins for a GPU: (name, ms per batch, images per batch). PyTorch ResNet50 on an H100, host-to-device
# copy and preprocessing included: fp32 7.1 ms per 32 images, bf16 21.1 ms per 256.
GPU_STANDINS = (("H100 fp32", 7.1, 32), ("H100 bf16", 21.1, 256))


def gpu_feed(report: Report, plan: Plan, codec: str) -> dict:
    """(9) One real worker draining a prefilled queue for a stand-in model that sleeps for a GPU's time."""
    from tools.gpu_feed import describe, measure

    report.section("9. GPU feed: one worker, a stand-in model that sleeps for an H100's time per batch")
    report.say("   the real Worker and Redis, prefilled with castle jobs; the stand-in sleeps, so the GIL is free")
    out: dict = {}
    for name, ms, per in GPU_STANDINS:
        jobs = (1500 if plan is QUICK else 4000) * (2 if per > 32 else 1)  # a few hundred batches, or 30 big ones
        for job_codec in dict.fromkeys((codec, "raw")):
            feeds = [measure(jobs, ms / 1000 / per, per, job_codec) for _ in range(3)]
            feed = sorted(feeds, key=lambda f: f.ratio)[1]  # the median of three drains
            out[f"{name}, {job_codec}"] = feed.__dict__
            report.say(f"   {name}, median of 3: {describe(feed)}")
    return out


def decode_cost(report: Report) -> list[dict]:
    """(10) CPU and peak memory of preparing one upload, the old way beside the new (tools/decode_cost.py)."""
    from tools import decode_cost as tool

    report.section("10. Preparing one upload: CPU and peak memory, old way and new, each in a fresh process")
    rows = tool.run()
    for row in rows:
        report.say("   " + tool.describe(row))
    return rows


# One H100 worker's rate in images/s (fp32 ResNet50, issue 9): what "per GPU" means in the front-door figures.
H100_IMAGES_PER_S = 4481
FRONT_DOOR_CLIENTS = 4


def front_door(report: Report, plan: Plan) -> dict:
    """(12) Web and Redis CPU per request: by step, the web server before issue 13 beside this one, every codec."""
    from tools import front_door as tool

    report.section(f"12. The front door: CPU per request by step, old web server and new, every JOB_CODEC "
                   f"({FRONT_DOOR_CLIENTS} clients, a stand-in worker)")  # fmt: skip
    say = lambda text: report.say("   " + text.strip())  # noqa: E731
    out = tool.run(("decoders", "steps", "compare", "codecs"), tool.BASE_REV, plan.front_door_rounds,
                   plan.front_door_window, FRONT_DOOR_CLIENTS, say)  # fmt: skip
    new = out["compare"]["new"]
    full_batches = report.results["redis_alone"]["redis_cpu_ms_per_request"]
    ceiling = report.results["ceiling"]["by_web_processes"][report.results["ceiling"]["best"]]["requests_per_s"]
    per_core_second = 1000 / (new["web_ms"] + new["redis_ms"] + new["worker_ms"])
    report.say(
        f"   the serving ceiling restated: {per_core_second:.0f} requests per core-second of the whole stack without "
        f"the model (web + Redis + worker, clients excluded), so {per_core_second * (os.cpu_count() or 1):.0f} "
        f"requests/s on {os.cpu_count()} idle cores; phase 5 measured {ceiling:.0f} requests/s with its clients "
        "on the same cores"
    )
    report.say(
        f"   per 1,000 requests/s: web {new['web_ms']:.1f} cores, Redis {new['redis_ms']:.2f} cores "
        f"({full_batches:.2f} with full {BATCH_FOR_MIX}-job batches, phase 8); per H100 worker "
        f"({H100_IMAGES_PER_S:,} images/s): web {new['web_ms'] * H100_IMAGES_PER_S / 1000:.1f} cores, Redis "
        f"{full_batches * H100_IMAGES_PER_S / 1000:.2f} to {new['redis_ms'] * H100_IMAGES_PER_S / 1000:.2f} cores"
    )
    return out


CACHE_CLIENTS = 16


def repeated_images(report: Report, plan: Plan, client: Client, env: dict[str, str], counter: redis.Redis) -> dict:
    """(14) The castle from CACHE_CLIENTS clients at once, the result cache off and on, one real worker."""
    report.section(f"14. Repeated images: the same upload from {CACHE_CLIENTS} clients, RESULT_CACHE_TTL=0 and 60")
    out = {}
    with running(start_worker(env)) as worker:
        for ttl in ("0", "60"):
            with running(Web(dict(env, RESULT_CACHE_TTL=ttl)).wait_ready()) as web:
                meter = CpuMeter({"web (gunicorn)": with_children(web.process.pid), "worker": [worker.process.pid]})
                jobs_before = _worker_done(worker)
                load = closed_loop(client, web.url, CACHE_CLIENTS, plan.warmup / 3, plan.window / 3, counter, meter)
                jobs = _worker_done(worker) - jobs_before
            out[ttl] = {"requests_per_s": round(load.rate, 1), "p50_ms": round(median_ms(load.latencies), 1),
                        "errors": load.errors, "inferences": jobs, "cpu": load.cpu}  # fmt: skip
            report.say(
                f"   RESULT_CACHE_TTL={ttl:>2}: {load.rate:7.1f} requests/s, p50 {median_ms(load.latencies):6.1f} ms, "
                f"{load.errors} errors; the worker ran {jobs:.0f} inferences (warm-up and window)"
            )
    report.say(f"   cache on / off: {out['60']['requests_per_s'] / out['0']['requests_per_s']:.1f}x the requests/s")
    return out


def _worker_done(worker: WorkerProcess) -> float:
    """The worker's worker_jobs_total{outcome="done"}, from its metrics."""
    text = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).text
    line = next((line for line in text.splitlines() if line.startswith('worker_jobs_total{outcome="done"}')), "x 0")
    return float(line.split()[-1])


def run_cache_only(args: argparse.Namespace) -> Report:
    """Phase 14 alone."""
    plan, config, report = QUICK if args.quick else FULL, settings.load(role=settings.ALL), Report()
    report.say(f"imgserve benchmark, phase 14 only, {time.strftime('%Y-%m-%d %H:%M:%S')}; {os.cpu_count()} cores")
    with LocalRedis() as server:
        env = server_env(server.url, "bench", BATCH_SIZE=config.batch_size, JOB_CODEC=config.job_codec,
                         LOG_LEVEL="INFO", PYTHONPATH=str(PROJECT))  # fmt: skip
        report.results["repeated_images"] = repeated_images(
            report, plan, Client(sample_image_bytes()), env, connect(server.url)
        )
    return report


def verdicts(report: Report) -> None:
    """Every figure against its goal."""
    r = report.results
    report.section("Goals")
    sat = r["saturation_1_worker"]
    report.goal(
        "saturation / raw limit (32 clients)",
        sat["ratio_to_raw_limit"],
        ">= 0.95",
        sat["ratio_to_raw_limit"] >= 0.95,
        f"{sat['ratio_to_raw_limit']:.3f} ({sat['images_per_s']:.2f} images/s)",
    )
    auto = r["low_load"]["auto"]
    report.goal(
        "low-load p50 minus batch-1 model time (measured alongside)",
        auto["overhead_ms"],
        "<= 10 ms",
        auto["overhead_ms"] <= 10,
        f"{auto['overhead_ms']:.1f} ms",
    )
    no_model = r["ceiling"]["low_load_p50_ms"]
    report.goal(
        "low-load p50 with the stand-in (no model at all)", no_model, "<= 10 ms", no_model <= 10, f"{no_model:.1f} ms"
    )
    report.goal(
        "low-load p50 of (request minus its own inference time)",
        auto["stack_p50_ms"],
        "<= 10 ms",
        auto["stack_p50_ms"] <= 10,
        f"{auto['stack_p50_ms']:.1f} ms",
    )
    for label, value in (
        ("Redis commands/request, saturation (in-script included)", sat["commands_per_request"]),
        ("Redis commands/request, low load (in-script included)", auto["commands_per_request"]),
        ("Redis round trips/request, low load (MONITOR)", r["round_trips"]["round_trips_per_request"]),
    ):
        report.goal(label, value, "<= 6", value <= 6, f"{value:.2f}")
    if r.get("job"):
        image, whole = r["job"]["image_field_bytes"], r["job"]["job_bytes"]
        report.goal("image bytes per queued job", image, "<= 200,704", image <= 200_704, f"{image:,}")
        report.goal("whole job bytes (image + JSON envelope)", whole, "<= 200,704", whole <= 200_704, f"{whole:,}")
    best = r["ceiling"]["by_web_processes"][r["ceiling"]["best"]]["requests_per_s"]
    report.goal(
        "serving ceiling, no model (requests/s)", best, ">= 500", best >= 500, f"{best:.0f} (clients on the same cores)"
    )
    for key, feed in r["gpu_feed"].items():
        if key.startswith("H100 fp32"):
            ratio, cpu, redis_ms = feed["ratio"], feed["worker_cpu_ms_per_job"], feed["redis_cpu_ms_per_job"]
            report.goal(f"GPU-feed ratio, {key}", ratio, ">= 0.90", ratio >= 0.90, f"{ratio:.2f}")
            report.goal(f"worker CPU per job, {key}", cpu, "<= 0.15 ms", cpu <= 0.15, f"{cpu:.3f} ms")
            report.goal(f"Redis CPU per job (worker side), {key}", redis_ms, "<= 0.05 ms", redis_ms <= 0.05,
                        f"{redis_ms:.3f} ms")  # fmt: skip
    cluster_verdicts(report)
    front_door_goals(report)
    report.say("These figures are only as quiet as the machine was: re-run `make bench` on an otherwise idle machine.")


def cluster_verdicts(report: Report) -> None:
    """The cluster phase's figure against its goal: jobs spread evenly over the shards."""
    spread = report.results["redis_cluster"]["spread_max_over_min"]
    shown = f"{spread:.3f} ({report.results['redis_cluster']['jobs_per_shard']})"
    report.goal("jobs per shard on the cluster, largest / smallest", spread, "<= 1.10", spread <= 1.10, shown)


def front_door_goals(report: Report) -> None:
    r = report.results
    new, codec = r["front_door"]["compare"]["new"], r["setup"]["job_codec"]
    report.goal(f"web CPU per request under gunicorn ({FRONT_DOOR_CLIENTS} clients)", new["web_ms"], "<= 4 ms",
                new["web_ms"] <= 4, f"{new['web_ms']:.2f} ms")  # fmt: skip
    for label, value in (
        (f"Redis CPU per request, {codec}, {FRONT_DOOR_CLIENTS} clients (small batches)", new["redis_ms"]),
        (f"Redis CPU per request, {codec}, full {BATCH_FOR_MIX}-job batches (phase 8)",
         r["redis_alone"]["redis_cpu_ms_per_request"]),
    ):  # fmt: skip
        report.goal(label, value, "<= 0.1 ms", value <= 0.1, f"{value:.3f} ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter phases (about 3 minutes) for development")
    parser.add_argument(
        "--cluster-only", action="store_true", help="only phases 8 and 11: one Redis against a Redis Cluster"
    )
    parser.add_argument("--priority-only", action="store_true", help="only phase 13: latency per priority level")
    parser.add_argument("--cache-only", action="store_true", help="only phase 14: the result cache off and on")
    parser.add_argument(
        "--backends-only", action="store_true", help="only phase 15: the model backends (MODEL_BACKEND) side by side"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, help="also write the goals table and the output to this file")
    parser.add_argument(
        "--sweep",
        action="append",
        metavar="SETTING=V1,V2,...",
        help="also compare values of one worker setting side by side, e.g. BATCH_WAIT_MS=0,2,10 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.priority_only:
            report = Report()
            report.results["priorities"] = priorities(report, QUICK if args.quick else FULL)
        else:
            runner = (
                run_cluster_only
                if args.cluster_only
                else run_cache_only
                if args.cache_only
                else run_backends_only
                if args.backends_only
                else run
            )
            report = runner(args)
    except settings.SettingsError as exc:
        print(f"tools.bench: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report.results | {"goals": report.goals}, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
