"""One log format for every process: `[TIMESTAMP] [SERVER_NAME] [SCRIPT_NAME] ACTION`.

Usage:
    log = logger.setup("web", level="INFO")
    log.info("enqueued job %s", job_id)
    # [2026-11-28 03:50:01.123] [web] [run_web_server.py] enqueued job 3f2a...

Modules that are not entry points use `logger.get(__name__)`; their lines carry the
server name the entry point chose.
"""

from __future__ import annotations

import logging
import os
import sys
import time

ROOT = "imgserve"
FORMAT = "[%(asctime)s.%(msecs)03d] [%(server_name)s] [%(script_name)s] %(levelname_prefix)s%(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _ContextFilter(logging.Filter):
    """Adds the server name and the script file name to every record."""

    def __init__(self, server_name: str) -> None:
        super().__init__()
        self.server_name = server_name

    def filter(self, record: logging.LogRecord) -> bool:
        record.server_name = self.server_name
        record.script_name = os.path.basename(record.pathname)
        record.levelname_prefix = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return True


def setup(server_name: str, level: str = "INFO", stream=None) -> logging.Logger:
    """Configure the project's root logger once for this process and return it."""
    log = logging.getLogger(ROOT)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    formatter.converter = time.localtime
    handler.setFormatter(formatter)
    handler.addFilter(_ContextFilter(server_name))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log


def untrusted(value: object, limit: int = 200) -> str:
    """`value`, from outside (e.g. a job read from Redis), as text fit for one log line: control characters,
    line breaks and backslashes escaped as in a Python string (a newline in a job id must not forge a log
    line of its own), and cut to `limit` characters."""
    text = str(value)
    cut = text[:limit]
    escaped = "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in cut)
    return escaped + (f"... ({len(text):,} characters)" if len(text) > limit else "")


def get(name: str) -> logging.Logger:
    """A child of the project logger, for library modules."""
    return logging.getLogger(f"{ROOT}.{name}")
