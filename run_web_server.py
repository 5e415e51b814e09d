"""The web API: accepts an image, queues it for the model workers, answers with the top-5 labels.

    python run_web_server.py                         # development server (threaded)
    gunicorn 'run_web_server:create_app()' ...       # production, see `make run`

Settings come from the environment / `.env` (see settings.py).
"""

from __future__ import annotations

import sys
import time
import uuid

from flask import Flask, Response, current_app, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

import logger
import metrics
import security
import settings
from helpers import DecodeBudget, DecodeBusy, ImageError, prepare_image
from redis_protocol import REDIS_UNAVAILABLE, Job, JobQueue, ResultListener, ResultTimeout
from uploads import UploadRequest

log = logger.get("web")


class Service:
    """What the views need: settings, the queue and this process's result listener."""

    def __init__(self, config: settings.Settings, queue: JobQueue | None = None) -> None:
        self.config = config
        self.origin = uuid.uuid4().hex[:12]
        self.queue = queue or JobQueue.from_settings(config)
        self.decode_budget = DecodeBudget(config.decode_budget_bytes, config.decode_wait)
        self.listener = ResultListener(self.queue, self.origin, config.notifications != "off")


def create_app(config: settings.Settings | None = None, queue: JobQueue | None = None) -> Flask:
    """Application factory: one Service (and one listener thread) per process.

    Tests may pass a stand-in `queue`: then nothing connects to Redis and no listener thread starts
    (a waiting request polls the stand-in).
    """
    config = config or settings.load()
    logger.setup("web", config.log_level)
    app = Flask(__name__)
    app.request_class = UploadRequest
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    service = Service(config, queue)
    app.extensions["imgserve"] = service
    if queue is None:
        service.listener.start()
    app.register_error_handler(HTTPException, _http_error)
    app.add_url_rule("/predict", view_func=predict, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    metrics.init_app(app, service.queue)
    security.init_app(app, config.allowed_origins, config.accepted_api_keys)  # after metrics: refusals counted
    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/openapi.yaml", view_func=openapi_document)
    log.info("web process %s ready; Redis %s, queue %r", service.origin, config.redis_url_safe, config.image_queue)
    return app


def _service() -> Service:
    return current_app.extensions["imgserve"]


def error(status: int, message: str, retry_after: int | None = None):
    """A JSON error response."""
    response = jsonify(success=False, error=message)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _http_error(exc: HTTPException):
    if exc.code == 413:
        limit = _service().config.max_upload_bytes
        return error(413, f"the upload is larger than the limit of {limit:,} bytes (MAX_UPLOAD_BYTES)")
    response = error(exc.code or 500, exc.description or exc.name)
    # Keep the exception's own headers, e.g. the Allow of a 405 (required by RFC 9110).
    response.headers.extend((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")
    return response


def predict():
    """POST /predict with a multipart file field `image`."""
    service = _service()
    upload = request.files.get("image")
    if upload is None:
        return error(400, "send the image as a multipart form file field named 'image'")
    config = service.config
    try:
        pixels = prepare_image(
            upload.read(),
            config.max_image_pixels,
            config.max_decode_bytes,
            service.decode_budget,
            formats=config.accepted_formats,
        )
    except ImageError as exc:
        return error(400, str(exc))
    except DecodeBusy:
        return error(503, "the server is busy decoding other images; try again shortly", retry_after=1)
    job = Job.new(pixels, service.origin, config.request_timeout, config.job_codec, config.job_quality)
    with service.listener.expect(job.id):
        try:
            if not service.queue.enqueue(job, config.max_queue):
                return error(503, "the server is busy (queue full); try again shortly", retry_after=1)
            result = service.listener.wait(job.id, job.deadline)
        except REDIS_UNAVAILABLE as exc:
            log.warning("Redis unavailable for job %s: %s", job.id, exc)
            return error(503, "the job queue (Redis) is unavailable; try again shortly", retry_after=1)
        except ResultTimeout:
            _give_up(service.queue, job)
            return error(504, f"no result within {config.request_timeout:g} s (REQUEST_TIMEOUT)")
    elapsed_ms = (time.time() - job.enqueued_at) * 1000
    if not result.get("success"):
        log.warning("job %s failed after %.0f ms: %s", job.id, elapsed_ms, logger.untrusted(result.get("error")))
        return error(int(result.get("status", 500)), result.get("error", "the job failed"))
    log.info("job %s answered in %.0f ms", job.id, elapsed_ms)
    return jsonify(result)


def _give_up(queue: JobQueue, job: Job) -> None:
    """Take a timed-out job out of the queue, so that no worker runs it for a client that is gone.

    A job a worker holds already is dropped by the worker once past its deadline, and a late result
    expires seconds after it.
    """
    try:
        if queue.cancel(job):
            log.info("job %s cancelled: no result within its deadline, still queued", job.id)
    except REDIS_UNAVAILABLE as exc:
        log.warning("could not cancel job %s: %s", job.id, exc)


def healthz():
    """GET /healthz: the process is alive."""
    return jsonify(status="ok")


def readyz():
    """GET /readyz: Redis answers and at least one worker is alive."""
    service = _service()
    try:
        depth = service.queue.depth()
        workers = service.queue.live_workers()
    except REDIS_UNAVAILABLE as exc:
        # The details (Redis's address among them) go to the log, not to whoever asks.
        log.warning("not ready: Redis unavailable: %s", exc)
        return jsonify(ready=False, redis=False, error="the job queue (Redis) is unavailable"), 503
    ready = workers > 0
    body = dict(ready=ready, redis=True, workers=workers, queue_depth=depth, wait_mode=service.listener.mode)
    return jsonify(body), 200 if ready else 503


def index() -> Response:
    """GET /: the upload page (static/index.html)."""
    return current_app.send_static_file("index.html")


def openapi_document() -> Response:
    """GET /openapi.yaml: the OpenAPI description of this API."""
    return send_from_directory(settings.PROJECT_DIR, "openapi.yaml", mimetype="application/yaml")


def main() -> int:
    try:
        config = settings.load()
    except settings.SettingsError as exc:
        print(f"run_web_server.py: configuration error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    app.extensions["imgserve"].listener.wait_ready(3)
    log.info("serving on http://%s:%d (development server; `make run` uses gunicorn)", config.web_host, config.web_port)
    app.run(host=config.web_host, port=config.web_port, debug=config.flask_debug, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
