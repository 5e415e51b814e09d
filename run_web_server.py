"""The web API: accepts images, queues them for the model workers, answers with the top-k labels.

    python run_web_server.py                         # development server (threaded)
    gunicorn 'run_web_server:create_app()' ...       # production, see `make run`

Settings come from the environment / `.env` (see settings.py).
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from flask import Flask, Response, current_app, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

import logger
import metrics
import security
import settings
from helpers import UPLOAD_COPIES, DecodeBudget, DecodeBusy, ImageError, prepare_image
from redis_protocol import REDIS_UNAVAILABLE, SUBMITTED, Job, JobQueue, ResultListener, ResultTimeout
from redis_protocol.job import DEFAULT_TOP_K, MAX_TOP_K
from redis_protocol.queue import distinct_models
from uploads import FormTooLarge, UploadRequest

log = logger.get("web")
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: unguessable


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
    app.register_error_handler(Refused, _refused)
    app.add_url_rule("/predict", view_func=predict, methods=["POST"])
    app.add_url_rule("/jobs", view_func=submit_job, methods=["POST"])
    app.add_url_rule("/jobs/<job_id>", view_func=job_status, methods=["GET"])
    app.add_url_rule("/jobs/<job_id>", view_func=cancel_job, methods=["DELETE"])
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    metrics.init_app(app, service.queue)
    security.init_hosts(app, config.accepted_hosts)  # first of the refusals: a rebound name learns nothing
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
    if isinstance(exc, FormTooLarge):  # too many parts, or too much in fields: its own limit, not the body's size
        return error(413, exc.description)
    if exc.code == 413:
        limit = _service().config.max_upload_bytes
        return error(413, f"the upload is larger than the limit of {limit:,} bytes (MAX_UPLOAD_BYTES)")
    response = error(exc.code or 500, exc.description or exc.name)
    # Keep the exception's own headers, e.g. the Allow of a 405 (required by RFC 9110).
    response.headers.extend((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")
    return response


class Refused(Exception):
    """A request the API turns down: answered as a JSON error with `status` (and Retry-After, if given)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _refused(exc: Refused):
    return error(exc.status, exc.message, exc.retry_after)


def predict():
    """POST /predict with one or more multipart file fields `image`: wait for the answers."""
    service = _service()
    config = service.config
    top_k = _top_k()
    jobs = [
        Job.new(pixels, service.origin, config.request_timeout, config.job_codec, config.job_quality, top_k)
        for pixels in _prepared_uploads(service, config.max_images_per_request)
    ]
    results = _answers(service, jobs)
    elapsed_ms = (time.time() - jobs[0].enqueued_at) * 1000
    if len(jobs) > 1:
        log.info("%d jobs answered in %.0f ms", len(jobs), elapsed_ms)
        return jsonify(success=True, results=[_entry(result) for result in results])
    [(job, result)] = zip(jobs, results, strict=True)
    if not result.get("success"):
        log.warning("job %s failed after %.0f ms: %s", job.id, elapsed_ms, logger.untrusted(result.get("error")))
        return error(int(result.get("status", 500)), result.get("error", "the job failed"))
    log.info("job %s answered in %.0f ms", job.id, elapsed_ms)
    return jsonify(result)


def _top_k() -> int:
    """The `top_k` query argument: how many classes each answer lists."""
    raw = request.args.get("top_k")
    if raw is None:
        return DEFAULT_TOP_K
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_TOP_K):
        raise Refused(400, f"top_k must be a whole number from 1 to {MAX_TOP_K}")
    return int(raw)


def _prepared_uploads(service: Service, limit: int, limit_source: str = "MAX_IMAGES_PER_REQUEST") -> list:
    """The uploaded `image` fields, each prepared for the model; Refused (and nothing queued) if any is bad.

    The body's memory is reserved in the decode budget before it is read, and freed once prepared: a
    burst of large uploads waits for (or is refused) memory, rather than each buffering its body."""
    with _body_reserved(service):
        files = request.files
        try:
            return _prepared(service, files.getlist("image"), limit, limit_source)
        finally:
            for _, upload in files.items(multi=True):
                upload.close()  # the parsed copy; the request lives on while its jobs run


@contextmanager
def _body_reserved(service: Service) -> Iterator[None]:
    """Hold UPLOAD_COPIES times the body's length (at most MAX_UPLOAD_BYTES) of the budget; a 503 if it stays full."""
    limit = service.config.max_upload_bytes
    length = min(request.content_length or limit, limit)
    try:
        with service.decode_budget.hold(UPLOAD_COPIES * length):
            yield
    except DecodeBusy:
        raise Refused(503, "the server is busy reading other uploads; try again shortly", retry_after=1) from None


def _prepared(service: Service, uploads: list, limit: int, limit_source: str) -> list:
    if not uploads:
        raise Refused(400, "send the image as a multipart form file field named 'image'")
    if len(uploads) > limit:
        raise Refused(400, f"{len(uploads)} images in one request; the limit is {limit} ({limit_source})")
    config, prepared = service.config, []
    for number, upload in enumerate(uploads, start=1):
        try:
            prepared.append(
                prepare_image(upload.read(), config.max_image_pixels, config.max_decode_bytes, service.decode_budget,
                              formats=config.accepted_formats)
            )  # fmt: skip
        except ImageError as exc:
            named = f"image {number} ({upload.filename!r}): " if len(uploads) > 1 else ""
            raise Refused(400, f"{named}{exc}") from None
        except DecodeBusy:
            raise Refused(503, "the server is busy decoding other images; try again shortly", retry_after=1) from None
    return prepared


def _answers(service: Service, jobs: list[Job]) -> list[dict]:
    """Queue the jobs in one round trip and wait for each result, in order."""
    config = service.config
    with ExitStack() as expecting:
        for job in jobs:
            expecting.enter_context(service.listener.expect(job.id))
        try:
            if not service.queue.enqueue_many(jobs, config.max_queue):
                raise Refused(503, "the server is busy (queue full); try again shortly", retry_after=1)
            return [service.listener.wait(job.id, job.deadline, job.shard) for job in jobs]
        except REDIS_UNAVAILABLE as exc:
            log.warning("Redis unavailable for job %s: %s", jobs[0].id, exc)
            raise Refused(503, "the job queue (Redis) is unavailable; try again shortly", retry_after=1) from None
        except ResultTimeout:
            for job in jobs:
                _give_up(service.queue, job)
            raise Refused(504, f"no result within {config.request_timeout:g} s (REQUEST_TIMEOUT)") from None


def _entry(result: dict) -> dict:
    """One image's part of a several-image answer."""
    if result.get("success"):
        return {key: value for key, value in result.items() if key != "success"}
    return {"success": False, "error": result.get("error", "the job failed")}


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


def submit_job():
    """POST /jobs with a multipart file field `image`: queue it and answer at once where to collect it."""
    service = _service()
    config = service.config
    top_k = _top_k()
    [pixels] = _prepared_uploads(service, 1, "a job is one image; /predict takes several")
    # A submitted job may wait in the queue, and its result be collected, until RESULT_TTL after now.
    job = Job.new(pixels, SUBMITTED, config.result_ttl, config.job_codec, config.job_quality, top_k)
    try:
        queued = service.queue.submit(job, config.max_queue)
    except REDIS_UNAVAILABLE as exc:
        log.warning("Redis unavailable for submitted job %s: %s", job.id, exc)
        raise Refused(503, "the job queue (Redis) is unavailable; try again shortly", retry_after=1) from None
    if not queued:
        raise Refused(503, "the server is busy (queue full); try again shortly", retry_after=1)
    log.info("job %s submitted", job.id)
    response = jsonify(success=True, id=job.id, status_url=f"/jobs/{job.id}")
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job.id}"
    return response


def job_status(job_id: str):
    """GET /jobs/<id>: a submitted job's status, with its predictions once done."""
    status = _known_job(job_id, lambda: _service().queue.job_status(job_id))
    return jsonify(id=job_id, **_public_status(status))


def cancel_job(job_id: str):
    """DELETE /jobs/<id>: cancel a submitted job that no worker has taken yet."""
    outcome = _known_job(job_id, lambda: _service().queue.cancel_submitted(job_id))
    if outcome == 1:
        log.info("job %s cancelled by its client", job_id)
        return jsonify(success=True, id=job_id, status="cancelled")
    if outcome == 0 or _service().queue.job_status(job_id):
        return error(409, f"job {job_id} is running or done already; it can no longer be cancelled")
    raise Refused(404, f"no job {job_id} (unknown, cancelled, or its result expired after RESULT_TTL)")


def _known_job(job_id: str, read):
    """What `read` says of a job; Refused 404 for an id that cannot be a job's, or when Redis knows none."""
    if not JOB_ID.fullmatch(job_id):
        raise Refused(404, f"no job {job_id!r}: job ids are 32 hexadecimal digits")
    try:
        value = read()
    except REDIS_UNAVAILABLE as exc:
        log.warning("Redis unavailable for job %s: %s", job_id, exc)
        raise Refused(503, "the job queue (Redis) is unavailable; try again shortly", retry_after=1) from None
    if value is None:
        raise Refused(404, f"no job {job_id} (unknown, cancelled, or its result expired after RESULT_TTL)")
    return value


def _public_status(status: dict) -> dict:
    """A job's status as GET /jobs/<id> shows it: a failed job's HTTP status stays inside."""
    if status["status"] == "failed":
        return {"status": "failed", "error": status.get("error", "the job failed")}
    return {key: value for key, value in status.items() if key != "success"}


def healthz():
    """GET /healthz: the process is alive."""
    return jsonify(status="ok")


def readyz():
    """GET /readyz: Redis answers and at least one worker is alive."""
    service = _service()
    try:
        depth = service.queue.depth()
        alive = service.queue.live_worker_models()  # one read of the heartbeats: who is alive, running what
    except REDIS_UNAVAILABLE as exc:
        # The details (Redis's address among them) go to the log, not to whoever asks.
        log.warning("not ready: Redis unavailable: %s", exc)
        return jsonify(ready=False, redis=False, error="the job queue (Redis) is unavailable"), 503
    ready = bool(alive)
    models = distinct_models(alive.values())
    body = dict(
        ready=ready, redis=True, workers=len(alive), models=models, queue_depth=depth, wait_mode=service.listener.mode
    )
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
