"""Gunicorn's settings for the web app: stack.gunicorn_command passes this file with --config, beside the
command-line flags it sets itself (workers, threads, bind) from the settings.

Gunicorn reads this file only when told to: it is not in the folder gunicorn starts from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os

# Allocations from this size up get pages of their own, given back to the system when freed. glibc otherwise
# raises this threshold to the largest block freed so far (up to 32 MB): after one upload, every later body
# and its parsed copies come from the threads' heaps, which keep their peak, and the web process holds
# gigabytes after a burst of large uploads whatever the decode budget allowed at once
# (`python -m tools.upload_bursts`, deliverables/TEST_RESULTS.md).
LARGE_ALLOCATION_BYTES = 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def child_exit(server, worker) -> None:
    """Drop the live gauges of a web process that exited, so /metrics stops counting it (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker) -> None:
    """Lower this web process's CPU priority by WEB_NICE; the threads it starts later inherit it."""
    from imgserve import settings

    _map_large_allocations()
    try:
        nice = settings.load(role=settings.WEB).web_nice
    except settings.SettingsError:
        return  # the app factory loads the settings next and reports the bad one
    if nice:
        os.nice(nice)


def post_worker_init(worker) -> None:
    """Answer the requests gunicorn refuses by itself (a malformed request line or header, 414, 431, 501) as
    the API answers: JSON with the security headers, as nginx does in front (nginx.conf.template). gunicorn
    has no hook for those answers' body, so its writer of them is replaced, in this web process only."""
    from gunicorn import util

    util.write_error = _write_json_error


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature, writing the API's JSON error and security.HEADERS."""
    from gunicorn import util

    from imgserve.web.security import HEADERS

    body = json.dumps({"success": False, "error": mesg or reason}).encode()  # ASCII: the request's text escaped
    head = [f"HTTP/1.1 {status_int} {reason}", "Connection: close", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in HEADERS.items())]
    util.write_nonblock(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def _map_large_allocations() -> None:
    """Fix glibc's mmap threshold at LARGE_ALLOCATION_BYTES (fixing it also stops it from rising); nothing
    on a C library without mallopt."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)


# gunicorn 27 gives every instance the same control socket in ~/.gunicorn: several gunicorns on one
# machine (tests, `make bench`, `make run`) would unlink each other's. Nothing here uses it.
control_socket_disable = True
