"""Slow and idle clients: gunicorn alone gives each one a thread until its request is in; nginx in front (as
`make run` starts it, PROXY) holds them instead, with PROXY_HEADER_TIMEOUT and PROXY_BODY_TIMEOUT.

Real processes: Redis, serve.py (a worker, gunicorn behind nginx), slow clients from tools/slowloris.py.
"""

from __future__ import annotations

import socket
import statistics
import time
import uuid

import pytest
import requests

from imgserve import settings
from imgserve.launch import proxy, serve
from tools.processes import Stack, WebServer, sample_image_bytes, server_env
from tools.slowloris import SlowClients, probe

pytestmark = pytest.mark.system

NGINX = proxy.find_nginx(settings.load(env={}, dotenv=False))
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (`make install` and .ci/run install it with apt-get where they can)"
)
THREADS = 4  # gunicorn's threads: few, so that a handful of slow clients would take them all
HEADER_TIMEOUT, BODY_TIMEOUT = 4, 2
MAX_UPLOAD = 1_000_000


@pytest.fixture(scope="module")
def env(redis_server):
    return server_env(
        redis_server.url,
        f"slow-{uuid.uuid4().hex[:6]}",
        WEB_THREADS=THREADS,
        PROXY_HEADER_TIMEOUT=HEADER_TIMEOUT,
        PROXY_BODY_TIMEOUT=BODY_TIMEOUT,
        MAX_UPLOAD_BYTES=MAX_UPLOAD,
        BATCH_SIZE=4,
    )


@pytest.fixture(scope="module")
def behind_nginx(env):
    if NGINX is None:
        pytest.skip("nginx is not installed")
    stack = Stack(dict(env, PROXY="nginx")).wait_ready()
    yield stack
    assert stack.stop() == 0 and not stack.pids(), f"make run stopped all it started:\n{stack.log[-2000:]}"


def test_gunicorn_alone_stops_answering_with_one_slow_client_per_thread(env):
    web = WebServer(dict(env, PROXY="off"), gunicorn=True).wait_ready()
    try:
        with SlowClients("127.0.0.1", web.port, THREADS + 2):
            time.sleep(0.5)
            with pytest.raises(requests.Timeout):
                requests.get(web.url + "/healthz", timeout=2)
    finally:
        web.stop()


@needs_nginx
def test_behind_nginx_1000_slow_clients_delay_neither_healthz_nor_predict(behind_nginx):
    image = sample_image_bytes()
    _, before = probe(behind_nginx.url, 4, image)
    with SlowClients("127.0.0.1", behind_nginx.port, 1000) as slow:
        assert slow.open == 1000
        health, during = probe(behind_nginx.url, HEADER_TIMEOUT + 2, image)
        reopened = list(slow.lifetimes)
    assert health.failures == 0 and len(health.seconds) >= 10 and max(health.seconds) < 1.0, health.summary()
    assert before.failures == during.failures == 0 and len(during.seconds) >= 3
    assert statistics.median(during.seconds) < 2 * statistics.median(before.seconds) + 0.5, (
        f"before: {before.summary()}; during: {during.summary()}"
    )
    # PROXY_HEADER_TIMEOUT: nginx drops a request whose headers are not all in after that long, trickle or not.
    assert len(reopened) >= 900 and HEADER_TIMEOUT - 0.5 < min(reopened) < max(reopened) < HEADER_TIMEOUT + 2
    print(f"/healthz {health.summary()}; /predict before {before.summary()}, during {during.summary()}")


@needs_nginx
def test_behind_nginx_a_body_that_stops_arriving_is_dropped_after_proxy_body_timeout(behind_nginx):
    with socket.create_connection(("127.0.0.1", behind_nginx.port), timeout=BODY_TIMEOUT + 5) as sock:
        head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {MAX_UPLOAD // 2}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 1000)
        started = time.monotonic()
        answer = sock.recv(1000)  # nginx's 408, or the end of the stream
        waited = time.monotonic() - started
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 2


@needs_nginx
def test_behind_nginx_answers_are_the_web_apps(behind_nginx):
    url = behind_nginx.url
    response = requests.get(url + "/healthz", timeout=5)
    assert response.json() == {"status": "ok"} and response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Server"] == "nginx", "server_tokens off: no version for strangers"
    # Host passes through with its port: a page of this server may post, one of another site may not.
    image = {"image": ("photo.jpg", sample_image_bytes(), "image/jpeg")}
    assert requests.post(url + "/predict", files=image, headers={"Origin": url}, timeout=60).status_code == 200
    other_site = {"Origin": "http://127.0.0.1:1"}
    assert requests.post(url + "/predict", files=image, headers=other_site, timeout=60).status_code == 403
    # nginx's own refusal of a large body is the API's JSON 413.
    too_large = requests.post(url + "/predict", files={"image": ("a.jpg", b"x" * MAX_UPLOAD)}, timeout=10)
    assert too_large.status_code == 413 and "MAX_UPLOAD_BYTES" in too_large.json()["error"]


def test_proxy_nginx_without_nginx_stops_make_run_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(proxy, "SEARCH_PATH", "/nonexistent")
    monkeypatch.setenv("PROXY", "nginx")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # no local Redis either: nothing may start
    assert serve.main() == 2
    assert "PROXY=nginx, but nginx is not installed: apt-get install nginx-light" in capsys.readouterr().err
    monkeypatch.setenv("PROXY", "auto")
    assert proxy.find_nginx(settings.load()) is None
