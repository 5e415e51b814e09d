"""The worker of an older commit beside this one, with the real (CPU) model, in one session.

    python -m tools.compare_workers [--rev 4d8f5d8] [--rounds 3] [--window 30] [--clients 32] [--sequential 30]

One Redis and one gunicorn web server (as `make run` starts it) for the whole run; each round starts the
old worker, then the new one (MODEL_WEIGHTS=none, the same compute as the real weights) and measures
images/s with `--clients` concurrent clients and the p50 latency of `--sequential` one-at-a-time
requests. Prints the median of the rounds for each and their ratio. The old worker runs from a git worktree
of `--rev` (its own code, this commit's web server, with JOB_CODEC=zstd: a job format both workers read).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from imgserve.launch import stack
from imgserve.launch.local_redis import LocalRedis, free_port

PROJECT = Path(__file__).resolve().parent.parent
CASTLE = PROJECT.parent / "shared" / "images" / "castle_image.jpg"


def post(session: requests.Session, url: str, image: bytes) -> float:
    """Seconds one /predict took; raises on anything but 200."""
    started = time.perf_counter()
    response = session.post(url + "/predict", files={"image": ("castle.jpg", image, "image/jpeg")}, timeout=120)
    response.raise_for_status()
    return time.perf_counter() - started


def saturation(url: str, image: bytes, clients: int, warmup: float, window: float) -> float:
    """Requests/s answered inside `window` s (after `warmup` s) by `clients` closed-loop clients."""
    stop, done = threading.Event(), []

    def loop() -> None:
        session = requests.Session()
        while not stop.is_set():
            post(session, url, image)
            done.append(time.perf_counter())

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    start = time.perf_counter()
    time.sleep(window)
    end = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(180)
    return sum(1 for t in done if start <= t < end) / (end - start)


def low_load(url: str, image: bytes, count: int) -> float:
    """p50 milliseconds of `count` sequential requests."""
    session = requests.Session()
    return statistics.median(post(session, url, image) for _ in range(count)) * 1000


def start_worker(env: dict[str, str], cwd: Path, url: str, image: bytes) -> subprocess.Popen:
    """A model worker from `cwd`, returned once it has answered a request."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    worker = subprocess.Popen([sys.executable, "run_model_server.py"], cwd=cwd, env=env, **quiet)
    deadline = time.monotonic() + 180
    while True:
        try:
            post(requests.Session(), url, image)
            return worker
        except requests.RequestException:
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                worker.wait()
                raise RuntimeError(f"the worker in {cwd} did not answer") from None


def measure(env: dict, cwd: Path, url: str, image: bytes, args: argparse.Namespace) -> tuple[float, float]:
    worker = start_worker(env, cwd, url, image)
    try:
        return saturation(url, image, args.clients, args.warmup, args.window), low_load(url, image, args.sequential)
    finally:
        worker.terminate()
        worker.wait(120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="4d8f5d8", help="the older commit whose worker to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--window", type=float, default=30)
    parser.add_argument("--sequential", type=int, default=30)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image = CASTLE.read_bytes() if CASTLE.exists() else None
    if image is None:
        from tools.gpu_feed import castle_pixels  # noqa: F401 - the fallback photo lives with the GPU tool

        raise SystemExit("this comparison needs ../shared/images/castle_image.jpg")
    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        git = {"cwd": PROJECT, "capture_output": True}
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.rev], check=True, **git)
        port = free_port()
        # JOB_CODEC=zstd: a codec both workers read (the old one knows raw and zstd, not this commit's zstd2).
        env = dict(os.environ, REDIS_URL=server.url, MODEL_WEIGHTS="none", METRICS_PORT="0", WEB_PORT=str(port),
                   JOB_CODEC="zstd")  # fmt: skip
        metrics_dir = Path(tmp) / "metrics"
        metrics_dir.mkdir()
        metrics_dir = str(metrics_dir)
        web = stack.start_web(env, metrics_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            figures: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
            for round_ in range(1, args.rounds + 1):
                for name, cwd in (("old", old), ("new", PROJECT)):
                    rate, p50 = measure(env, cwd, url, image, args)
                    figures[name].append((rate, p50))
                    print(f"round {round_}, {name} worker: {rate:.2f} images/s, low-load p50 {p50:.1f} ms", flush=True)
        finally:
            web.terminate()
            web.wait(60)
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], check=False, **git)
    medians = {n: (statistics.median(r for r, _ in f), statistics.median(p for _, p in f)) for n, f in figures.items()}
    for name, (rate, p50) in medians.items():
        which = args.rev if name == "old" else "this commit"
        print(f"{name} worker ({which}): median {rate:.2f} images/s, low-load p50 {p50:.1f} ms")
    (old_rate, old_p50), (new_rate, new_p50) = medians["old"], medians["new"]
    print(f"new / old: {new_rate / old_rate:.3f} images/s, {new_p50 / old_p50:.3f} low-load p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
