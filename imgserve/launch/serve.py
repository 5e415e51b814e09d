"""`make run`: start the whole stack and stop all of it on Ctrl-C.

Starts a local Redis on 127.0.0.1:6379 (no persistence) unless REDIS_URL is set, one model
worker, the web app under gunicorn (threaded workers), and nginx in front of it on WEB_PORT
(PROXY, see proxy.py). Exits when any part exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from imgserve import logger, settings
from imgserve.launch import proxy, stack
from imgserve.launch.local_redis import LocalRedis

LOCAL_REDIS_PORT = 6379
NGINX, GUNICORN = "the proxy (nginx)", "the web server (gunicorn)"
log = logger.get("serve")


def main() -> int:
    try:
        config = settings.load()
    except settings.SettingsError as exc:
        print(f"serve.py: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.setup("serve", config.log_level)
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
        children["the model worker"] = stack.start_worker(env, start_new_session=True)
        url = f"http://{config.web_host}:{config.web_port}"
        log.info("web server on %s; the worker needs a few seconds to load the model", url)
        log.info("try: curl -F image=@photo.jpg %s/predict    (Ctrl-C stops everything)", url)
        return _supervise(children, stop)


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


def _supervise(children: dict[str, subprocess.Popen], stop: threading.Event) -> int:
    """Wait until Ctrl-C/SIGTERM or until a child exits; its exit code (0 when asked to stop)."""
    while not stop.wait(0.2):
        for name, child in children.items():
            if child.poll() is not None:
                log.error("%s exited with code %s; stopping everything", name, child.returncode)
                return child.returncode or 1
    return 0


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
