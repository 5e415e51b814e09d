"""Start the stack's processes the one way that `make run`, the tests, the benchmark and the deliverables
all use: model workers, and the web app under gunicorn with gunicorn.conf.py. (local_redis.py starts Redis.)

Every function takes the environment the process should see; the settings in it decide the rest.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from imgserve import settings
from imgserve.settings import PROJECT_DIR

# Where gunicorn's web processes add up their Prometheus values (one folder per server, empty at start).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
WEB_APP = "imgserve.web.app:create_app()"
GUNICORN_CONF = Path(__file__).resolve().parent / "gunicorn.conf.py"


def gunicorn_command(config: settings.Settings, app: str = WEB_APP, bind: str | None = None) -> list[str]:
    """The production web server: gthread workers, one result listener per process.

    `app` is the WSGI app gunicorn loads; the tools pass a wrapper of this one to measure it. `bind` (e.g.
    unix:/path, behind a proxy) replaces WEB_HOST:WEB_PORT."""
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gthread",
        "--workers", str(config.web_processes),
        "--threads", str(config.web_threads),
        "--bind", bind or f"{config.web_host}:{config.web_port}",
        "--graceful-timeout", str(int(config.request_timeout) + 5),
        "--log-level", "warning",
        "--config", str(GUNICORN_CONF),
        app,
    ]  # fmt: skip


def start_web(
    env: Mapping[str, str], metrics_dir: str, app: str = WEB_APP, bind: str | None = None, **popen: object
) -> subprocess.Popen:
    """gunicorn serving the web app, with the settings in `env` and an empty folder for its metrics."""
    config = settings.load(env=env, role=settings.LAUNCH)
    return subprocess.Popen(
        gunicorn_command(config, app, bind), cwd=PROJECT_DIR, env={**env, METRICS_DIR_ENV: metrics_dir}, **popen
    )


def start_worker(env: Mapping[str, str], *args: str, **popen: object) -> subprocess.Popen:
    """A model worker (run_model_server.py `args`) with the settings in `env`."""
    worker_env = {k: v for k, v in env.items() if k != METRICS_DIR_ENV}  # a worker keeps its own registry
    return subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "run_model_server.py"), *args], cwd=PROJECT_DIR, env=worker_env, **popen
    )
