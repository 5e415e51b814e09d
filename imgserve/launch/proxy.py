"""The buffering reverse proxy that `make run` puts in front of gunicorn: nginx, from nginx.conf.template.

gunicorn's threaded workers give each connection a thread while its request is read: a few dozen clients
that send their headers slowly (a slowloris) take every thread, and the service stops answering. nginx
reads every request in full first, with timeouts (PROXY_HEADER_TIMEOUT, PROXY_BODY_TIMEOUT), and holds
thousands of slow connections at a few KB each; gunicorn then only sees complete requests, from nginx,
on a Unix socket of its own. PROXY decides: `auto` (nginx where installed), `nginx` (required), `off`.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

from imgserve import settings
from imgserve.web import security

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
# Connections nginx holds at once: idle and slow clients, and two per request it is passing on.
CONNECTIONS = 4096
STOP_SIGNAL = signal.SIGQUIT  # nginx's graceful stop: it finishes the requests in flight, as gunicorn's SIGTERM does
INSTALL_HINT = "apt-get install nginx-light (what `make install` runs as root), or your system's nginx package"
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


class ProxyUnavailable(RuntimeError):
    """PROXY=nginx, and no nginx is installed."""


def find_nginx(config: settings.Settings) -> str | None:
    """The nginx binary to put in front of gunicorn; None to serve with gunicorn alone (PROXY=off, or
    PROXY=auto without nginx). ProxyUnavailable for PROXY=nginx without it."""
    if config.proxy == "off":
        return None
    found = shutil.which("nginx", path=SEARCH_PATH)
    if found is None and config.proxy == "nginx":
        raise ProxyUnavailable(f"PROXY=nginx, but nginx is not installed: {INSTALL_HINT}")
    return found


def render(config: settings.Settings, prefix: Path, upstream: str) -> str:
    """nginx.conf for `config`: listening on WEB_HOST:WEB_PORT, passing requests to `upstream` (e.g.
    unix:/path/gunicorn.sock), its pid file and temporary files under `prefix`."""
    nofile = min(2 * CONNECTIONS + 64, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    values = {
        "PREFIX": str(prefix),
        "NOFILE": nofile,
        "CONNECTIONS": min(CONNECTIONS, nofile - 64),
        "LISTEN": f"{_bracketed(config.web_host)}:{config.web_port}",
        "UPSTREAM": upstream,
        "HEADER_TIMEOUT": _duration(config.proxy_header_timeout),
        "BODY_TIMEOUT": _duration(config.proxy_body_timeout),
        "READ_TIMEOUT": _duration(config.request_timeout + 30),
        "MAX_UPLOAD_BYTES": config.max_upload_bytes,
        "MAX_UPLOAD_TEXT": f"{config.max_upload_bytes:,}",
        "SECURITY_HEADERS": security_headers(),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    return text


def security_headers() -> str:
    """add_header lines for security.HEADERS, the headers the web app puts on its own answers."""
    lines = []
    for name, value in security.HEADERS.items():
        if any(c in value for c in '"\\$\n'):  # nginx would read these as quoting, escapes or variables
            raise ValueError(f"{name}: {value!r} cannot be written into nginx.conf as it is")
        lines.append(f'add_header {name} "{value}" always;')
    return "\n            ".join(lines)


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as nginx's listen wants it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def start(config: settings.Settings, nginx: str, prefix: Path, upstream: str, **popen: object) -> subprocess.Popen:
    """nginx in the foreground with its configuration written to `prefix`, which must be empty and private."""
    conf = prefix / "nginx.conf"
    conf.write_text(render(config, prefix, upstream))
    # Started as root, nginx's worker processes run as an unprivileged user: they must reach the folder.
    prefix.chmod(0o711)
    return subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"], **popen)
