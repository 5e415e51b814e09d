"""`make run`: start the whole stack and stop all of it on Ctrl-C.

Starts a local Redis on 127.0.0.1:6379 (no persistence) unless REDIS_URL is set, one model
worker, and the web app under gunicorn (threaded workers). Exits when any part exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import logger
import settings as settings_module
from local_redis import LocalRedis

LOCAL_REDIS_PORT = 6379
log = logger.get("serve")


def gunicorn_command(config: settings_module.Settings) -> list[str]:
    """The production web server: gthread workers, one result listener per process."""
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gthread",
        "--workers", str(config.web_processes),
        "--threads", str(config.web_threads),
        "--bind", f"{config.web_host}:{config.web_port}",
        "--graceful-timeout", str(int(config.request_timeout) + 5),
        "--log-level", "warning",
        "--config", str(settings_module.PROJECT_DIR / "gunicorn.conf.py"),
        "run_web_server:create_app()",
    ]  # fmt: skip


def main() -> int:
    try:
        config = settings_module.load()
    except settings_module.SettingsError as exc:
        print(f"serve.py: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.setup("serve", config.log_level)
    redis_server = None
    env = dict(os.environ)
    if not os.environ.get("REDIS_URL"):
        redis_server = LocalRedis(port=LOCAL_REDIS_PORT)
        try:
            redis_server.start()
        except RuntimeError as exc:
            log.error("%s: is port %d in use? Set REDIS_URL to use that Redis instead.", exc, LOCAL_REDIS_PORT)
            return 1
        env["REDIS_URL"] = redis_server.url
        log.info("started a local Redis at %s (no persistence)", redis_server.url)
    # A fresh directory per run for the web processes' Prometheus values (stale files would add old counts).
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    metrics_dir = tempfile.TemporaryDirectory(prefix="imgserve-metrics-")
    # Own sessions: Ctrl-C reaches only this supervisor, which then stops the children in order.
    web_env = dict(env, PROMETHEUS_MULTIPROC_DIR=metrics_dir.name)
    web = subprocess.Popen(gunicorn_command(config), env=web_env, start_new_session=True)
    worker = subprocess.Popen([sys.executable, "run_model_server.py"], env=env, start_new_session=True)
    url = f"http://{config.web_host}:{config.web_port}"
    log.info("web server on %s; the worker needs a few seconds to load the model", url)
    log.info("try: curl -F image=@photo.jpg %s/predict    (Ctrl-C stops everything)", url)
    code = _supervise([web, worker], grace=config.request_timeout + 10)
    metrics_dir.cleanup()
    if redis_server:
        redis_server.stop()
    return code


def _supervise(children: list[subprocess.Popen], grace: float) -> int:
    """Wait until Ctrl-C/SIGTERM or until a child exits, then stop the children one by one, in order.

    The web server goes first and finishes its requests in flight while the worker still serves
    them; then the worker finishes its batch.
    """
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    while not stop:
        exited = [child for child in children if child.poll() is not None]
        if exited:
            code = exited[0].returncode or 1
            log.error("%s exited with code %s; stopping everything", exited[0].args[1:3], exited[0].returncode)
            break
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
