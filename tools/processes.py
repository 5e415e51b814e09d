"""The process harness that the tests, the benchmark and the deliverables share: real servers started as
`make run` starts them (stack.py), their output in a log file each, and waits on real state (an HTTP
answer, a worker registered in Redis, a result published)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import requests

from imgserve.launch import stack
from imgserve.launch.local_redis import free_port
from imgserve.protocol import connect
from imgserve.protocol.keys import BASE_MODEL
from imgserve.protocol.notifications import channel_pattern, enable_everywhere, servers
from imgserve.settings import PROJECT_DIR, Settings
from tools.queues import Queues

PROJECT = PROJECT_DIR
SHARED_IMAGES = PROJECT.parent / "shared" / "images"
CASTLE = SHARED_IMAGES / "castle_image.jpg"


def server_env(redis_url: str, queue: str, **extra: object) -> dict[str, str]:
    """Environment for a child server: test defaults, no .env surprises, random weights."""
    env = dict(os.environ)
    # Every setting explicit: the environment wins over a developer's .env (load_dotenv does not override).
    # Not API_KEYS and API_KEYS_FILE: set but empty, they are refused (the operator meant to close the API).
    env.update({field.name.upper(): _env_value(field.default) for field in fields(Settings)})
    for name in ("API_KEYS", "API_KEYS_FILE"):
        env.pop(name, None)
    env.update(
        REDIS_URL=redis_url,
        IMAGE_QUEUE=queue,
        MODEL_WEIGHTS="none",
        METRICS_PORT="0",
        LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


def _env_value(default: object) -> str:
    """A setting's default as its variable spells it: a tuple is a comma-separated list; None (the program
    decides: PREFETCH_BATCHES auto, WORKER_SHARDS all) is empty, which load() reads as the default."""
    if default is None:
        return ""
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def env_queue(env: dict[str, str], model: str = BASE_MODEL) -> Queues:
    """A client for `model`'s queue, and its shards, that a child's environment names."""
    shards = int(env.get("QUEUE_SHARDS") or 1)
    return Queues.on(connect(env["REDIS_URL"]), env["IMAGE_QUEUE"], shards=shards, model=model)


class Child:
    """A child process whose combined output goes to a temporary log file."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.env = env
        self.log_file = tempfile.NamedTemporaryFile(prefix="imgserve-", suffix=".log", delete=False)
        self.process = self._start(args, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.log_file.close()  # the child has its own descriptor; we read the file by name

    def _start(self, args: list[str], **output: object) -> subprocess.Popen:
        return subprocess.Popen(args, cwd=PROJECT, env=self.env, **output)

    @property
    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_for_http(self, url: str, timeout: float) -> None:
        """Poll `url` until it answers 2xx; stop this child and raise if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(url, timeout=2).ok:
                    return
            except requests.RequestException:  # refused, or accepted by gunicorn before its worker booted
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no answer from {url}:\n{self.log[-3000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Worker(Child):
    """A model worker started as `make run` starts it; `id` is the id it registered under in Redis."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.id = ""
        # The queue it serves: its --model's (the first model of MODELS_FILE without it, as in these tests).
        self.model = args[args.index("--model") + 1] if "--model" in args else BASE_MODEL
        super().__init__(list(args), env)

    def _start(self, args: list[str], **output: object) -> subprocess.Popen:
        return stack.start_worker(self.env, *args, **output)

    def wait_registered(self, timeout: float = 120) -> Worker:
        """Wait until the worker is in the queue's workers sets (its model is loaded by then); learn its id."""
        queue = env_queue(self.env, self.model)
        mine = f"{socket.gethostname()}-{self.process.pid}-"  # Worker.id in run_model_server.py
        deadline = time.monotonic() + timeout
        try:
            while not self.id:
                self.id = next((w for w in queue.inspect.worker_ids() if w.startswith(mine)), "")
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not register within {timeout} s:\n{self.log[-3000:]}")
                time.sleep(0.05)
        finally:
            queue.redis.close()
        return self


def start_worker(env: dict[str, str], *args: str, timeout: float = 120) -> Worker:
    """A model worker, returned once it has registered in Redis."""
    return Worker(env, *args).wait_registered(timeout)


class WebServer(Child):
    """The web app on a free port: under gunicorn as `make run` serves it, or Flask's development server."""

    def __init__(
        self, env: dict[str, str], gunicorn: bool = False, processes: int = 1, app: str = stack.WEB_APP
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(env, WEB_PORT=str(self.port), WEB_HOST="127.0.0.1", WEB_PROCESSES=str(processes))
        self._metrics_dir = None if stack.METRICS_DIR_ENV in env else tempfile.TemporaryDirectory()
        self.gunicorn = gunicorn
        self.app = app
        super().__init__([sys.executable, "run_web_server.py"], env)

    def _start(self, args: list[str], **output: object) -> subprocess.Popen:
        if not self.gunicorn:
            return super()._start(args, **output)
        metrics_dir = self._metrics_dir.name if self._metrics_dir else self.env[stack.METRICS_DIR_ENV]
        return stack.start_web(self.env, metrics_dir, self.app, **output)

    def wait_ready(self, timeout: float = 30) -> WebServer:
        self.wait_for_http(self.url + "/healthz", timeout)
        return self

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        code = super().stop(sig, timeout)
        if self._metrics_dir:
            self._metrics_dir.cleanup()
        return code


def start_web(env: dict[str, str], gunicorn: bool = False, processes: int = 1) -> WebServer:
    """A web server on a free port, returned once /healthz answers; `processes` is gunicorn's --workers."""
    return WebServer(env, gunicorn, processes).wait_ready()


class Stack(Child):
    """The whole stack as `make run` starts it (serve.py: a worker, gunicorn, nginx as PROXY says) on a free
    port, against the Redis in REDIS_URL."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "imgserve.launch.serve"], dict(env, WEB_PORT=str(self.port), WEB_HOST="127.0.0.1")
        )

    def wait_ready(self, timeout: float = 120) -> Stack:
        """Wait until /readyz answers 200: the web server answers and a worker has loaded its model."""
        self.wait_for_http(self.url + "/readyz", timeout)
        return self

    def pids(self) -> dict[str, list[int]]:
        """The stack's processes by command (`nginx`, `gunicorn`, `run_model_server.py`), from /proc."""
        found: dict[str, list[int]] = {}
        for pid in _descendants(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except FileNotFoundError:
                continue
            name = next((n for n in ("nginx", "gunicorn", "run_model_server.py") if n in command), None)
            if name:
                found.setdefault(name, []).append(pid)
        return found


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's children lists."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return children + [d for child in children for d in _descendants(child)]


@contextlib.contextmanager
def live_stack(env: dict[str, str], **web_options: object) -> Iterator[tuple[Worker, WebServer]]:
    """A worker and a web server for the duration of the block; both stopped even if one fails to start."""
    worker = start_worker(env)
    try:
        web = start_web(env, **web_options)
        try:
            yield worker, web
        finally:
            web.stop()
    finally:
        worker.stop()


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `condition` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class PublishedResults:
    """Every result published on a queue while the block runs, by job id, with when it was published.

    Read from Redis's keyspace notifications: each SET of a result key is one publication, whichever
    worker made it, so a result published twice is seen twice. In a cluster, from every primary.
    """

    def __init__(self, redis_url: str, queue_name: str, shards: int = 1) -> None:
        self.queue = Queues.on(connect(redis_url), queue_name, shards=shards)
        self.times: dict[str, list[float]] = {}
        self._pubsubs = [node.pubsub() for node in servers(self.queue.web)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> PublishedResults:
        assert enable_everywhere(self.queue.web)
        for pubsub in self._pubsubs:
            pubsub.psubscribe(channel_pattern(self.queue.web, "*"))  # every web process's results
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for pubsub in self._pubsubs:
            pubsub.close()
        self.queue.redis.close()

    def _listen(self) -> None:
        while not self._stop.is_set():
            for pubsub in self._pubsubs:
                message = pubsub.get_message(timeout=0.1 / len(self._pubsubs))
                if message and message["type"] == "pmessage" and message["data"] == b"set":
                    job_id = message["channel"].rsplit(b":", 1)[1].decode()
                    self.times.setdefault(job_id, []).append(time.monotonic())

    @property
    def counts(self) -> Counter:
        return Counter({job_id: len(times) for job_id, times in self.times.items()})

    def wait_for(self, jobs: int, timeout: float = 30) -> Counter:
        """The counts once `jobs` distinct jobs have a published result (a worker publishes just before
        the client reads it, so the last notifications can trail the HTTP answers by a moment)."""
        wait_until(lambda: len(self.times) >= jobs, timeout, f"{jobs} published results")
        return self.counts


def post_image(url: str, data: bytes | None = None, timeout: float = 120) -> requests.Response:
    """POST /predict with `data` (default: the sample image) as the multipart file `image`."""
    files = {"image": ("photo.jpg", data or sample_image_bytes(), "image/jpeg")}
    return requests.post(url + "/predict", files=files, timeout=timeout)


def sample_image_bytes() -> bytes:
    """The castle photo when ../shared/images is there, else a generated JPEG."""
    if CASTLE.exists():
        return CASTLE.read_bytes()
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 480 * 800 * 3).reshape(480, 800, 3)
    pixels = (gradient + rng.integers(0, 40, gradient.shape)).clip(0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()
