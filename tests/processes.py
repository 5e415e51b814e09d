"""Start the real servers as child processes, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import requests

from local_redis import free_port
from settings import Settings

PROJECT = Path(__file__).resolve().parent.parent
SHARED_IMAGES = PROJECT.parent / "shared" / "images"
CASTLE = SHARED_IMAGES / "castle_image.jpg"


def server_env(redis_url: str, queue: str, **extra: object) -> dict[str, str]:
    """Environment for a child server: test defaults, no .env surprises, random weights."""
    env = dict(os.environ)
    # Every setting explicit: the environment wins over a developer's .env (load_dotenv does not override).
    env.update({field.name.upper(): str(field.default) for field in fields(Settings)})
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


class Child:
    """A child process whose combined output goes to a temporary log file."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="imgserve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.log_file.close()  # the child has its own descriptor; we read the file by name

    @property
    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.process.poll() is not None:
                raise RuntimeError(f"process exited with {self.process.returncode}:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} after {timeout} s:\n{self.log[-3000:]}")
            time.sleep(0.1)

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


def start_worker(env: dict[str, str], *args: str, timeout: float = 120) -> Child:
    """A model worker, returned once it waits for jobs."""
    child = Child([sys.executable, "run_model_server.py", *args], env)
    child.wait_for_log("waiting for jobs", timeout)
    return child


class WebServer(Child):
    def __init__(self, env: dict[str, str], gunicorn: bool = False, processes: int = 1) -> None:
        self.port = free_port()
        env = dict(env, WEB_PORT=str(self.port), WEB_HOST="127.0.0.1")
        if gunicorn:
            args = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--threads", "64",
                    "--workers", str(processes),
                    "--bind", f"127.0.0.1:{self.port}", "run_web_server:create_app()"]  # fmt: skip
        else:
            args = [sys.executable, "run_web_server.py"]
        super().__init__(args, env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> WebServer:
        self.wait_for_http(self.url + "/healthz", timeout)
        return self


def start_web(env: dict[str, str], gunicorn: bool = False, processes: int = 1) -> WebServer:
    """A web server on a free port, returned once /healthz answers; `processes` is gunicorn's --workers."""
    return WebServer(env, gunicorn, processes).wait_ready()


@contextlib.contextmanager
def live_stack(env: dict[str, str], **web_options: object) -> Iterator[tuple[Child, WebServer]]:
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
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def published_ids(logs: Callable[[], list[str]], expected: int, timeout: float = 30) -> list[str]:
    """Job ids from the workers' "batch done" lines, once `expected` distinct ones are there.

    A worker logs the line just after publishing, so it can trail the HTTP answer by a moment.
    """

    def ids() -> list[str]:
        found = [job_id for log in logs() for job_id in processed_job_ids(log)]
        return found if len(set(found)) >= expected else []

    return wait_until(ids, timeout, f"{expected} published job ids in the worker logs")


def processed_job_ids(log: str) -> list[str]:
    """Ids of the jobs whose results a worker published, from its DEBUG "batch done" lines."""
    ids = []
    for match in re.finditer(r"batch done: \d+ jobs: ([0-9a-f ]*)", log):
        ids += match.group(1).split()
    return ids


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
