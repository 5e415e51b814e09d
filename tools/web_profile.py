"""The web app with a CPU clock on every step of POST /predict: for tools.front_door, never for serving.

    gunicorn ... 'tools.web_profile:create_app()'

It is run_web_server's app, unchanged, except that the steps of a request are wrapped in timers of the
calling thread's CPU time (time.thread_time, so a thread that waits costs nothing) and GET /__profile
answers the totals so far: CPU seconds per step (a step's own time, without the timed steps it calls),
requests, the WSGI call as a whole, the listener thread and the whole process. What the process spent
outside the WSGI calls and the listener thread is gunicorn's: accepting, reading and parsing HTTP,
writing the answer.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from functools import wraps

from flask import Flask, jsonify, request

from imgserve.protocol import Job
from imgserve.web import app as web
from imgserve.web import metrics, views

_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)
_lock = threading.Lock()
_local = threading.local()  # .inner: CPU seconds of timed steps called by the one running now


def timed(name: str, call: Callable) -> Callable:
    """`call`, charging its thread CPU time to `name`, less the time of the timed steps inside it."""

    @wraps(call)
    def wrapper(*args, **kwargs):
        outer_inner = getattr(_local, "inner", 0.0)
        _local.inner = 0.0
        started = time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with _lock:
                _totals[name] += spent - _local.inner
                _counts[name] += 1
            _local.inner = outer_inner + spent

    return wrapper


class _TimedJob(Job):
    new = classmethod(timed("job: pack the pixels (Job.new: JOB_CODEC, base64)", Job.new.__func__))


def _patch_module_steps() -> None:
    """Wrap the steps that create_app registers or the view calls by name (before create_app runs)."""
    views.prepare_image = timed("decode and resize the image (prepare_image)", views.prepare_image)
    views.Job = _TimedJob
    Job.to_json = timed("job: to JSON (Job.to_json)", Job.to_json)
    metrics._before = timed("metrics: before/after request hooks", metrics._before)
    metrics._after = timed("metrics: before/after request hooks", metrics._after)
    metrics._teardown = timed("metrics: before/after request hooks", metrics._teardown)
    for level in ("info", "warning"):
        setattr(views.log, level, timed("logging (one line per request)", getattr(views.log, level)))


def _patch_service(service: web.Service) -> None:
    service.queue.enqueue_many = timed("Redis: LPUSH the job (WebQueue.enqueue_many)", service.queue.enqueue_many)
    service.listener.wait = timed("Redis: wait for and GETEX the result (listener.wait)", service.listener.wait)
    service.listener.expect = timed("listener: register the job (listener.expect)", service.listener.expect)


def _parse_upload() -> None:
    """Read the multipart body first, in its own timer (request.files caches it for the view)."""
    if request.path == "/predict":
        timed("read the body (gunicorn's input stream)", lambda: request.get_data(cache=True))()
        timed("multipart parse (request.files: uploads.py)", lambda: request.files)()


def _wsgi_timer(app: Flask) -> Callable:
    inner = app.wsgi_app

    def wsgi(environ, start_response):
        started = time.thread_time()
        try:
            return inner(environ, start_response)
        finally:
            with _lock:
                _totals["wsgi"] += time.thread_time() - started
                _counts["wsgi"] += 1

    return wsgi


def create_app() -> Flask:
    """run_web_server.create_app() with its steps timed, plus GET /__profile."""
    _patch_module_steps()
    app = web.create_app()
    service = app.extensions["imgserve"]
    _patch_service(service)
    app.before_request_funcs.setdefault(None, []).insert(0, _parse_upload)
    predict = app.view_functions["api.predict"]
    app.view_functions["api.predict"] = timed("the view's own code (checks, JSON answer)", predict)
    app.wsgi_app = _wsgi_timer(app)
    app.add_url_rule("/__profile", "profile", lambda: _profile(service))
    return app


def _thread_cpu(thread: threading.Thread | None) -> float:
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _profile(service: web.Service):
    with _lock:
        steps = dict(_totals)
        counts = dict(_counts)
    return jsonify(
        pid=os.getpid(),
        process_cpu_s=time.process_time(),
        listener_cpu_s=_thread_cpu(service.listener._thread),
        steps=steps,
        counts=counts,
    )
