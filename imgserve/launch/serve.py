"""`make run`: start the whole stack and stop all of it on Ctrl-C.

Starts a local Redis on 127.0.0.1:6379 (no persistence) unless REDIS_URL is set, one model
worker, the web app under gunicorn (threaded workers), and nginx in front of it on WEB_PORT
(PROXY, see proxy.py). Checks first that the ports it needs are free; says where to send a request once a
worker has loaded its model. Exits when any part exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import requests

from imgserve import logger, settings
from imgserve.launch import proxy, stack
from imgserve.launch.local_redis import LocalRedis

LOCAL_REDIS_PORT = 6379
NGINX, GUNICORN = "the proxy (nginx)", "the web server (gunicorn)"
log = logger.get("serve")


def main() -> int:
    try:
        config = settings.load(role=settings.ALL)  # it starts every role: all checked first
    except settings.SettingsError as exc:
        print(f"serve.py: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.setup("serve", config.log_level)
    taken = taken_port(config, own_redis=not os.environ.get("REDIS_URL"))
    if taken:
        log.error("%s", taken)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.ExitStack() as cleanup:
        env = dict(os.environ)
        if not os.environ.get("REDIS_URL"):
            try:
                redis_server = cleanup.enter_context(LocalRedis(port=LOCAL_REDIS_PORT))  # started on enter
            except RuntimeError as exc:
                log.error("%s: is port %d in use? Set REDIS_URL to use that Redis instead.", exc, LOCAL_REDIS_PORT)
                return 1
            env["REDIS_URL"] = redis_server.url
            log.info("started a local Redis at %s (no persistence)", redis_server.url)
        # A fresh directory per run for the web processes' Prometheus values (stale files would add old counts).
        metrics_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="imgserve-metrics-"))
        try:
            nginx = proxy.find_nginx(config)
        except proxy.ProxyUnavailable as exc:
            log.error("%s", exc)
            return 2
        # nginx's folder outlives nginx: the callbacks below run first (last in, first out).
        prefix = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="imgserve-proxy-")) if nginx else None
        # Own sessions: Ctrl-C reaches only this supervisor, which then stops the children in order.
        children: dict[str, subprocess.Popen] = {}
        cleanup.callback(_stop_all, children, config.request_timeout + 10)
        children.update(_start_web(config, env, metrics_dir, nginx, prefix))
        models = list(config.models())
        for name in models:  # one worker per model of MODELS_FILE, each with its own queue
            title = "the model worker" if len(models) == 1 else f"the model worker of {name}"
            children[title] = stack.start_worker(env, "--model", name, start_new_session=True)
        url = f"http://{config.web_host}:{config.web_port}"
        loading = (
            "the worker is loading the model" if len(models) == 1 else f"the workers are loading {', '.join(models)}"
        )
        log.info("starting the web server on %s; %s (a few seconds) ...", url, loading)
        return _supervise(children, stop, config)


def _start_web(
    config: settings.Settings, env: dict[str, str], metrics_dir: str, nginx: str | None, prefix: str | None
) -> dict[str, subprocess.Popen]:
    """gunicorn on WEB_PORT; or, with `nginx`, nginx on WEB_PORT passing complete requests to gunicorn on a
    Unix socket in the private folder `prefix`. In the order they should stop."""
    if nginx is None:
        if config.proxy == "auto":
            log.warning(
                "nginx not found: serving with gunicorn alone, where each slow or idle client holds one of its %d "
                "threads. Install it (%s), or set PROXY=off to silence this.",
                config.web_processes * config.web_threads,
                proxy.INSTALL_HINT,
            )
        return {GUNICORN: stack.start_web(env, metrics_dir, start_new_session=True)}
    upstream = f"unix:{Path(prefix) / 'gunicorn.sock'}"
    log.info("nginx (%s) in front of gunicorn: slow clients wait in nginx, not in gunicorn's threads", nginx)
    return {
        NGINX: proxy.start(config, nginx, Path(prefix), upstream, start_new_session=True),
        GUNICORN: stack.start_web(env, metrics_dir, bind=upstream, start_new_session=True),
    }


def taken_port(config: settings.Settings, own_redis: bool) -> str | None:
    """Why the stack cannot start, in one line, when a port it would listen on is taken; else None.

    The worker's METRICS_PORT is not checked: a worker that cannot bind it serves without metrics."""
    if not _can_bind(config.web_host, config.web_port):
        other = next((p for p in range(config.web_port + 1, config.web_port + 50) if _can_bind(config.web_host, p)), 0)
        return (
            f"port {config.web_port} on {config.web_host} is taken (WEB_PORT); "
            f"set WEB_PORT={other or 'another port'} in .env or the environment"
        )
    if own_redis and not _can_bind("127.0.0.1", LOCAL_REDIS_PORT):
        return (
            f"port {LOCAL_REDIS_PORT} on 127.0.0.1 is taken (make run's own Redis, started when REDIS_URL is unset); "
            f"set REDIS_URL=redis://127.0.0.1:{LOCAL_REDIS_PORT}/0 to use the Redis there, or stop what holds the port"
        )
    return None


def _can_bind(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (with SO_REUSEADDR, as nginx and gunicorn bind)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        return True
    except OSError:
        return False


def _ready(config: settings.Settings) -> bool:
    """Whether the stack answers /readyz with 200 on WEB_PORT (through nginx when it is in front), every model of
    the models file with a live worker."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(config.web_host, config.web_host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        answer = requests.get(f"http://{host}:{config.web_port}/readyz", timeout=2)
        return answer.status_code == 200 and not answer.json().get("models_without_workers")
    except (requests.RequestException, ValueError):
        return False


def _supervise(children: dict[str, subprocess.Popen], stop: threading.Event, config: settings.Settings) -> int:
    """Wait until Ctrl-C/SIGTERM or until a child exits; its exit code (0 when asked to stop). Says where to
    send a request once the stack is ready (checked every second until then)."""
    is_ready, checks = False, 0
    while not stop.wait(0.2):
        for name, child in children.items():
            if child.poll() is not None:
                when = "" if is_ready else " before the stack was ready (the cause is in the lines above)"
                log.error("%s exited with code %s%s; stopping everything", name, child.returncode, when)
                return child.returncode or 1
        checks += 1
        if not is_ready and checks % 5 == 0 and _ready(config):
            is_ready = True
            _say_ready(config)
    return 0


def _say_ready(config: settings.Settings) -> None:
    url = f"http://{config.web_host}:{config.web_port}"
    key = ' -H "Authorization: Bearer $IMGSERVE_API_KEY"' if config.accepted_api_keys else ""
    log.info("ready: a worker has loaded its model, for each model; the upload page is %s/", url)
    log.info("try: curl%s -F image=@examples/sample.jpg %s/predict    (Ctrl-C stops everything)", key, url)


def _stop_all(children: dict[str, subprocess.Popen], grace: float) -> None:
    """Stop the children one by one, in order: nginx, then the web server, first finish their requests in
    flight while the worker still serves them; then the worker finishes its batch."""
    for name, child in children.items():
        if child.poll() is None:
            child.send_signal(proxy.STOP_SIGNAL if name == NGINX else signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
