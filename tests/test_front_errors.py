"""The answers the front servers make themselves, before the web app sees a request: nginx's refusals of
malformed requests (as `make run` configures it, proxy.py) and its answer when gunicorn's worker is gone are
the API's JSON, with the web app's security headers (security.HEADERS).

Real processes: Redis, the web app under gunicorn, nginx from nginx.conf.template in front of it; the
requests are written to a socket as they are, malformed where the test says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from imgserve import settings
from imgserve.launch import proxy
from imgserve.launch.local_redis import free_port
from imgserve.web import security
from tools.processes import WebServer, env_queue, sample_image_bytes, server_env, wait_until

NGINX = proxy.find_nginx(settings.load(env={}, dotenv=False))
pytestmark = [pytest.mark.system, pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]
MAX_UPLOAD = 1_000_000


class Nginx:
    """nginx on a free port in front of `web`, configured by proxy.py as `make run` does."""

    def __init__(self, env: dict[str, str], web: WebServer) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._prefix = tempfile.TemporaryDirectory(prefix="imgserve-test-proxy-")
        config = settings.load(env=dict(env, WEB_PORT=str(self.port), WEB_HOST="127.0.0.1"), dotenv=False)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.process = proxy.start(config, NGINX, Path(self._prefix.name), f"127.0.0.1:{web.port}", **quiet)
        wait_until(lambda: _answers(self.url), 10, "nginx")

    def stop(self) -> None:
        self.process.send_signal(proxy.STOP_SIGNAL)
        self.process.wait(30)
        self._prefix.cleanup()


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def env(redis_server):
    return server_env(redis_server.url, f"front-{uuid.uuid4().hex[:6]}", MAX_UPLOAD_BYTES=MAX_UPLOAD)


@pytest.fixture(scope="module")
def web(env):
    server = WebServer(env, gunicorn=True).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx(env, web):
    front = Nginx(env, web)
    yield front
    front.stop()


def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as it is; the answer's status, headers (lower-case names) and body (Content-Length long)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed after {answer!r}"
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _length(answer: bytes) -> int:
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in head else 0


def assert_json_with_security_headers(headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (headers, body[:200])
    for name, value in security.HEADERS.items():
        assert headers.get(name.lower()) == value, (name, headers)
    answer = json.loads(body)
    assert answer["success"] is False and answer["error"]
    return answer


MALFORMED = {
    "garbage request line": (b"\x16\x03\x01 hello\r\n\r\n", 400),
    "request line of 10 KB": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
    "header of 10 KB": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431),
    "no Host in HTTP/1.1": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "unknown transfer encoding": (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "body over MAX_UPLOAD_BYTES": (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        + f"Content-Length: {MAX_UPLOAD + 1}\r\n\r\n".encode(),
        413,
    ),
}


@pytest.mark.parametrize("request_bytes, status", MALFORMED.values(), ids=MALFORMED.keys())
def test_nginx_answers_malformed_requests_in_json_with_the_security_headers(nginx, request_bytes, status):
    got, headers, body = raw(nginx.port, request_bytes)
    assert got == status, (headers, body[:300])
    assert_json_with_security_headers(headers, body)


# What gunicorn alone (PROXY=off) refuses itself, and with which status; without a Host it serves the request.
GUNICORN_REFUSES = {name: MALFORMED[name][0] for name in MALFORMED if name != "no Host in HTTP/1.1"}


@pytest.mark.parametrize("request_bytes", GUNICORN_REFUSES.values(), ids=GUNICORN_REFUSES.keys())
def test_gunicorn_alone_answers_malformed_requests_in_json_with_the_security_headers(web, request_bytes):
    """Without nginx, gunicorn refuses these itself (gunicorn.conf.py's post_worker_init makes its answers
    JSON), with statuses of its own choosing; the body over MAX_UPLOAD_BYTES is the web app's 413."""
    got, headers, body = raw(web.port, request_bytes)
    assert 400 <= got < 600, (got, headers, body[:300])
    assert_json_with_security_headers(headers, body)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /no-such-page HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 404),
        (b"PUT /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    ],
    ids=["404", "405"],
)
def test_the_web_apps_own_json_errors_pass_through_nginx_unchanged(nginx, web, request_bytes, status):
    got, headers, body = raw(nginx.port, request_bytes)
    direct, _, direct_body = raw(web.port, request_bytes)
    assert got == direct == status
    assert json.loads(body) == json.loads(direct_body)
    assert_json_with_security_headers(headers, body)


def test_a_killed_gunicorn_worker_is_a_503_with_retry_after_and_the_next_worker_answers(nginx, web):
    """Requests in flight when the gunicorn worker dies (no model worker: each waits for its result) get
    nginx's 503, not a 502 or a reset connection; gunicorn's arbiter starts a new worker, which answers."""
    master = web.process.pid
    (worker,) = map(int, Path(f"/proc/{master}/task/{master}/children").read_text().split())
    queue = env_queue(web.env)
    before = queue.inspect.depth()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_sample, nginx.url) for _ in range(4)]
        wait_until(lambda: queue.inspect.depth() >= before + 4, 10, "four requests waiting in the web app")
        os.kill(worker, signal.SIGKILL)
        answers = [future.result() for future in futures]
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", (answer.status_code, answer.text)
        assert_json_with_security_headers({k.lower(): v for k, v in answer.headers.items()}, answer.content)
    wait_until(lambda: _answers(nginx.url), 30, "a new gunicorn worker")


def post_sample(url: str) -> requests.Response:
    return requests.post(url + "/predict", files={"image": ("a.jpg", sample_image_bytes())}, timeout=60)
