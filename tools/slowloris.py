"""Slow clients against a running server: do /healthz and /predict still answer on time?

    python -m tools.slowloris [--url http://127.0.0.1:5000] [--connections 1000] [--seconds 30]

Opens `--connections` connections that each send a request line and one header, then one more header line
every `--trickle` seconds and never finish (a slowloris); a connection the server closes is opened again,
so that as many stay open as the server allows. Meanwhile it times GET /healthz every half second and
POST /predict (the sample photo) every two seconds, before the attack and during it, and prints both.
Only for servers of your own: by default it talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

from tools.processes import post_image, sample_image_bytes


@dataclass
class Timings:
    """Latencies of one kind of request, and how many failed (an error or no answer within the timeout)."""

    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    def add(self, call) -> None:
        started = time.perf_counter()
        try:
            ok = call().ok
        except requests.RequestException:
            ok = False
        if ok:
            self.seconds.append(time.perf_counter() - started)
        else:
            self.failures += 1

    def summary(self) -> str:
        if not self.seconds:
            return f"no answer ({self.failures} failed)"
        ms = sorted(1000 * s for s in self.seconds)
        return f"{len(ms)} answered, p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms, {self.failures} failed"


class SlowClients:
    """`count` connections that never finish their request; reopened when the server closes them.

    `lifetimes` holds how long each connection the server closed had been open."""

    def __init__(self, host: str, port: int, count: int, trickle: float = 1.0) -> None:
        self.address, self.count, self.trickle = (host, port), count, trickle
        self.lifetimes: list[float] = []
        self._opened: dict[socket.socket, float] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    @property
    def open(self) -> int:
        return len(self._opened)

    def __enter__(self) -> SlowClients:
        raise_open_files_limit(self.count + 256)
        for _ in range(self.count):
            self._connect()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in list(self._opened):
            self._close(sock)
        self._selector.close()

    def _connect(self) -> None:
        sock = socket.create_connection(self.address, timeout=5)
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {self.address[0]}:{self.address[1]}\r\n".encode())
        sock.setblocking(False)
        self._opened[sock] = time.monotonic()
        self._selector.register(sock, selectors.EVENT_READ)

    def _close(self, sock: socket.socket) -> float:
        self._selector.unregister(sock)
        sock.close()
        return time.monotonic() - self._opened.pop(sock)

    def _run(self) -> None:
        next_trickle = time.monotonic() + self.trickle
        while not self._stop.is_set():
            # Anything readable is the server giving up on a connection (a 408, or the end of the stream).
            for key, _ in self._selector.select(timeout=0.1):
                self._reopen(key.fileobj)
            if time.monotonic() >= next_trickle:
                next_trickle += self.trickle
                for sock in list(self._opened):
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        self._reopen(sock)

    def _reopen(self, sock: socket.socket) -> None:
        self.lifetimes.append(self._close(sock))
        if not self._stop.is_set():
            try:
                self._connect()
            except OSError:  # the server refuses new connections: keep trying on the next round
                pass


def raise_open_files_limit(wanted: int) -> None:
    """Raise this process's soft limit on open files to `wanted`, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def probe(url: str, seconds: float, image: bytes, timeout: float = 10) -> tuple[Timings, Timings]:
    """Time /healthz every 0.5 s and /predict every 2 s for `seconds`, each on a thread of its own."""
    health, predict = Timings(), Timings()
    until = time.monotonic() + seconds

    def every(interval: float, action) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            action()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))

    def health_check() -> requests.Response:
        return requests.get(url + "/healthz", timeout=timeout)

    def prediction() -> requests.Response:
        return post_image(url, image, timeout=timeout)

    threads = [
        threading.Thread(target=every, args=(0.5, lambda: health.add(health_check))),
        threading.Thread(target=every, args=(2.0, lambda: predict.add(prediction))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return health, predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to measure, before and during")
    parser.add_argument("--trickle", type=float, default=1.0, help="seconds between two header lines")
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    image = sample_image_bytes()
    health, predict = probe(args.url, args.seconds, image)
    print(f"before: /healthz {health.summary()}; /predict {predict.summary()}")
    with SlowClients(parts.hostname, parts.port or 80, args.connections, args.trickle) as slow:
        health, predict = probe(args.url, args.seconds, image)
        still_open = slow.open
    print(f"during ({args.connections} slow connections, {still_open} open at the end): "
          f"/healthz {health.summary()}; /predict {predict.summary()}")  # fmt: skip
    if slow.lifetimes:
        print(f"the server closed {len(slow.lifetimes)} slow connections, after {min(slow.lifetimes):.1f} "
              f"to {max(slow.lifetimes):.1f} s")  # fmt: skip
    return 0 if health.failures == 0 and predict.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
