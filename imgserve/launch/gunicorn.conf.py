"""Gunicorn's settings for the web app: stack.gunicorn_command passes this file with --config, beside the
command-line flags it sets itself (workers, threads, bind) from the settings.

Gunicorn reads this file only when told to: it is not in the folder gunicorn starts from.
"""

from __future__ import annotations

import os


def child_exit(server, worker) -> None:
    """Drop the live gauges of a web process that exited, so /metrics stops counting it (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker) -> None:
    """Lower this web process's CPU priority by WEB_NICE; the threads it starts later inherit it."""
    from imgserve import settings

    try:
        nice = settings.load(role=settings.WEB).web_nice
    except settings.SettingsError:
        return  # the app factory loads the settings next and reports the bad one
    if nice:
        os.nice(nice)


# gunicorn 27 gives every instance the same control socket in ~/.gunicorn: several gunicorns on one
# machine (tests, `make bench`, `make run`) would unlink each other's. Nothing here uses it.
control_socket_disable = True
