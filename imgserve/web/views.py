"""The web API's views, in one Blueprint (`api`): each view reads the request, calls the queue through the
Service (app.py) and answers; the helpers below them prepare uploads, wait for answers and shape job statuses.

Refusals are raised as errors.Refused and answered by the handlers that errors.py registers; so is Redis
being unavailable (REDIS_UNAVAILABLE, a 503), which the views let through, except where a failure is
tolerated (releasing a hold, cancelling a timed-out job) and in /readyz, which answers it itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory

from imgserve import logger
from imgserve.imaging import IMAGE_SIZE
from imgserve.imaging.prepare import UPLOAD_COPIES, DecodeBusy, ImageError, prepare_image
from imgserve.protocol import REDIS_UNAVAILABLE, SUBMITTED, Job, ResultTimeout, WebQueue
from imgserve.protocol.cache import DEFAULT_MODEL, request_digest
from imgserve.protocol.inspector import distinct_models
from imgserve.protocol.job import DEFAULT_TOP_K, MAX_TOP_K
from imgserve.protocol.priority import DEFAULT_PRIORITY, PRIORITIES, parse_priority
from imgserve.web import security
from imgserve.web.coalescing import cached_answer
from imgserve.web.deadlines import Timeout, effective_timeout
from imgserve.web.errors import Refused, error
from imgserve.web.registry import ModelState

if TYPE_CHECKING:
    from imgserve.web.app import Service

log = logger.get("web")
bp = Blueprint("api", __name__)
WEB_DIR = Path(__file__).resolve().parent  # static/ and openapi.yaml
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: unguessable


def _service() -> Service:
    return current_app.extensions["imgserve"]


@bp.post("/predict")
def predict():
    """POST /predict with one or more multipart file fields `image`: wait for the answers."""
    service = _service()
    config = service.config
    model = _model(service)
    top_k, priority = _top_k(model), _priority()
    timeout = effective_timeout(request.headers, config.request_timeout, "REQUEST_TIMEOUT")
    started = time.time()
    prepared = _prepared_uploads(service, config.max_images_per_request, model=model)
    if service.result_cache is not None and len(prepared) == 1:
        answer = _cached(service, prepared[0], top_k, timeout, priority, model.name)
        return _single_answer(answer, "cached or shared answer", started)
    jobs = [
        Job.new(pixels, service.origin, timeout.seconds, config.job_codec, config.job_quality, top_k, priority)
        for pixels in prepared
    ]
    results = _answers(service, jobs, timeout, model.name)
    if len(jobs) > 1:
        log.info("%d jobs answered in %.0f ms", len(jobs), (time.time() - started) * 1000)
        return jsonify(success=True, results=[_entry(result) for result in results])
    return _single_answer(results[0], f"job {jobs[0].id}", started)


def _single_answer(result: dict, what: str, started: float):
    """The answer to a one-image request: its result, or the error its job failed with."""
    elapsed_ms = (time.time() - started) * 1000
    if not result.get("success"):
        log.warning("%s failed after %.0f ms: %s", what, elapsed_ms, logger.untrusted(result.get("error")))
        return error(int(result.get("status", 500)), result.get("error", "the job failed"))
    log.info("%s answered in %.0f ms", what, elapsed_ms)
    return jsonify(result)


def _cached(
    service: Service, pixels, top_k: int, timeout: Timeout, priority: str = DEFAULT_PRIORITY, model: str = DEFAULT_MODEL
) -> dict:
    """One image's answer through the result cache (coalescing.py): from the cache, shared with an identical
    request in flight, or its own job's."""
    config, deadline = service.config, time.time() + timeout.seconds

    def run() -> dict:
        seconds = deadline - time.time()
        job = Job.new(pixels, service.origin, seconds, config.job_codec, config.job_quality, top_k, priority)
        return _answers(service, [job], timeout, model)[0]

    digest = request_digest(pixels, top_k, model)
    try:
        return cached_answer(service.result_cache, service.in_flight, digest, deadline, run)
    except ResultTimeout:
        raise Refused(504, f"no result within {timeout.describe()}") from None


def _model(service: Service) -> ModelState:
    """The model the `model` query argument names (DEFAULT_MODEL without it): Refused 404 for an unknown one, 503
    for one no live worker serves whose input size only a worker can tell."""
    name = request.args.get("model", service.models.default)
    if name not in service.models.file_models and name not in (known := service.models.known()):
        raise Refused(404, f"no model {name!r}; the known models: {', '.join(known)}")
    state = service.models.state(name)
    if state.input_size is None:
        raise Refused(503, f"no worker serves model {name} right now; try again shortly", retry_after=5)
    return state


def _top_k(model: ModelState | None = None) -> int:
    """The `top_k` query argument: how many classes each answer lists, at most the model's number of labels."""
    raw = request.args.get("top_k")
    most = min(MAX_TOP_K, model.labels) if model and model.labels else MAX_TOP_K
    if raw is None:
        return min(DEFAULT_TOP_K, most)
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= most):
        named = f" (model {model.name} has {model.labels} labels)" if most < MAX_TOP_K else ""
        raise Refused(400, f"top_k must be a whole number from 1 to {most}{named}")
    return int(raw)


def _priority() -> str:
    """The `priority` query argument: the level the jobs wait at (high, normal or low)."""
    raw = request.args.get("priority", DEFAULT_PRIORITY)
    if parse_priority(raw) is None:
        raise Refused(400, f"priority must be one of {', '.join(PRIORITIES)}")
    return raw


def _queue_full(priority: str) -> Refused:
    """The 503 of a full queue: MAX_QUEUE applies to each priority level on its own."""
    return Refused(503, f"the server is busy (queue full at priority {priority}); try again shortly", retry_after=1)


def _prepared_uploads(
    service: Service, limit: int, limit_source: str = "MAX_IMAGES_PER_REQUEST", model: ModelState | None = None
) -> list:
    """The uploaded `image` fields, each prepared for the model; Refused (and nothing queued) if any is bad.

    The body's memory is reserved in the decode budget before it is read, and freed once prepared: a
    burst of large uploads waits for (or is refused) memory, rather than each buffering its body."""
    with _body_reserved(service):
        files = request.files
        try:
            size = model.input_size if model and model.input_size else IMAGE_SIZE[0]
            return _prepared(service, files.getlist("image"), limit, limit_source, (size, size))
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


def _prepared(service: Service, uploads: list, limit: int, limit_source: str, size: tuple[int, int]) -> list:
    if not uploads:
        raise Refused(400, "send the image as a multipart form file field named 'image'")
    if len(uploads) > limit:
        raise Refused(400, f"{len(uploads)} images in one request; the limit is {limit} ({limit_source})")
    config, prepared = service.config, []
    for number, upload in enumerate(uploads, start=1):
        try:
            prepared.append(
                prepare_image(upload.read(), config.max_image_pixels, config.max_decode_bytes, service.decode_budget,
                              formats=config.accepted_formats, size=size)
            )  # fmt: skip
        except ImageError as exc:
            named = f"image {number} ({upload.filename!r}): " if len(uploads) > 1 else ""
            raise Refused(400, f"{named}{exc}") from None
        except DecodeBusy:
            raise Refused(503, "the server is busy decoding other images; try again shortly", retry_after=1) from None
    return prepared


def _answers(service: Service, jobs: list[Job], timeout: Timeout, model: str) -> list[dict]:
    """Queue the jobs on `model`'s queue in one round trip and wait for each result, in order; a 504 naming
    `timeout` after it."""
    config, queue, listener = service.config, service.models.queue(model), service.models.listener(model)
    with ExitStack() as expecting:
        expecting.enter_context(_held(service, jobs))
        for job in jobs:
            expecting.enter_context(listener.expect(job.id))
        try:
            if not queue.enqueue_many(jobs, config.max_queue):
                raise _queue_full(jobs[0].priority)
            return [listener.wait(job.id, job.deadline, job.shard) for job in jobs]
        except ResultTimeout:
            for job in jobs:
                _give_up(queue, job)
            raise Refused(504, f"no result within {timeout.describe()}") from None


@contextmanager
def _held(service: Service, jobs: list[Job], keep: bool = False):
    """Count `jobs` against the caller's share of the queue (MAX_QUEUE_PER_KEY) while the block runs, and
    after it too when `keep` (a submitted job: until collected or cancelled); Refused 429 over the share."""
    limit = service.config.queue_share_per_key
    if limit is None:
        yield
        return
    owner = security.request_owner(keyed=True)
    if not service.queue.hold(owner, jobs, limit):
        raise Refused(429, f"this API key has {limit} jobs queued or running already (MAX_QUEUE_PER_KEY); "
                           "try again shortly", retry_after=1)  # fmt: skip
    try:
        yield
    except BaseException:
        _release_hold(service, owner, [job.id for job in jobs])
        raise
    if not keep:
        _release_hold(service, owner, [job.id for job in jobs])


def _release_hold(service: Service, owner: str, job_ids: list[str]) -> None:
    """Stop counting jobs against their owner's share; a failure only leaves them counted until their deadline."""
    try:
        service.queue.release_hold(owner, job_ids)
    except REDIS_UNAVAILABLE as exc:
        log.warning("could not release job %s from its key's share: %s", job_ids[0], exc)


def _entry(result: dict) -> dict:
    """One image's part of a several-image answer."""
    if result.get("success"):
        return {key: value for key, value in result.items() if key != "success"}
    return {"success": False, "error": result.get("error", "the job failed")}


def _give_up(queue: WebQueue, job: Job) -> None:
    """Take a timed-out job out of the queue, so that no worker runs it for a client that is gone.

    A job a worker holds already is dropped by the worker once past its deadline, and a late result
    expires seconds after it.
    """
    try:
        if queue.cancel(job):
            log.info("job %s cancelled: no result within its deadline, still queued", job.id)
    except REDIS_UNAVAILABLE as exc:
        log.warning("could not cancel job %s: %s", job.id, exc)


@bp.post("/jobs")
def submit_job():
    """POST /jobs with a multipart file field `image`: queue it and answer at once where to collect it."""
    service = _service()
    config = service.config
    model = _model(service)
    top_k, priority = _top_k(model), _priority()
    # A submitted job may wait in the queue until RESULT_TTL after now, or the client's timeout if shorter;
    # its result can be collected until a few seconds after that (RESULT_GRACE).
    timeout = effective_timeout(request.headers, config.result_ttl, "RESULT_TTL")
    [pixels] = _prepared_uploads(service, 1, "a job is one image; /predict takes several", model)
    job = Job.new(pixels, SUBMITTED, timeout.seconds, config.job_codec, config.job_quality, top_k, priority)
    job.owner = _owner()
    with _held(service, [job], keep=True):
        if not service.models.queue(model.name).submit(job, config.max_queue):
            raise _queue_full(priority)
    log.info("job %s submitted", job.id)
    response = jsonify(success=True, id=job.id, status_url=f"/jobs/{job.id}", model=model.name)
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job.id}"
    return response


def _owner() -> str:
    """The owner of this request's jobs (security.request_owner): one per API key, or everyone alike."""
    return security.request_owner(keyed=bool(_service().config.accepted_api_keys))


@bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """GET /jobs/<id>: the caller's submitted job's status, with its predictions once done; 404 for another's."""
    service, owner = _service(), _owner()
    status = _known_job(job_id, lambda: service.queue.job_status(job_id, owner))
    if status["status"] in ("done", "failed") and service.config.queue_share_per_key is not None:
        _release_hold(service, owner, [job_id])  # collected: it no longer counts against the key's share
    return jsonify(id=job_id, **_public_status(status))


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    """DELETE /jobs/<id>: cancel a submitted job of the caller's that no worker has taken yet."""
    service, owner = _service(), _owner()
    outcome = _known_job(job_id, lambda: service.queue.cancel_submitted(job_id, owner))
    if outcome == 1:
        log.info("job %s cancelled by its client", job_id)
        if service.config.queue_share_per_key is not None:
            _release_hold(service, owner, [job_id])
        return jsonify(success=True, id=job_id, status="cancelled")
    if outcome == 0 or service.queue.job_status(job_id, owner):
        return error(409, f"job {job_id} is running or done already; it can no longer be cancelled")
    raise Refused(404, f"no job {job_id} (unknown, cancelled, or its result expired after RESULT_TTL)")


def _known_job(job_id: str, read):
    """What `read` says of a job; Refused 404 for an id that cannot be a job's, or when Redis knows none."""
    if not JOB_ID.fullmatch(job_id):
        raise Refused(404, f"no job {job_id!r}: job ids are 32 hexadecimal digits")
    value = read()
    if value is None:
        raise Refused(404, f"no job {job_id} (unknown, cancelled, or its result expired after RESULT_TTL)")
    return value


def _public_status(status: dict) -> dict:
    """A job's status as GET /jobs/<id> shows it: the status word, never a result's HTTP status or id."""
    if status["status"] == "failed":
        return {"status": "failed", "error": status.get("error", "the job failed")}
    return {key: value for key, value in status.items() if key not in ("success", "id")}


@bp.route("/healthz")
def healthz():
    """GET /healthz: the process is alive."""
    return jsonify(status="ok")


@bp.route("/readyz")
def readyz():
    """GET /readyz: Redis answers and at least one worker is alive."""
    service = _service()
    try:
        depth, alive, unserved = 0, {}, []
        for name in service.models.file_models:  # the models this stack serves, as its models file says
            inspector = service.models.inspector(name)
            depth += inspector.depth()
            workers = inspector.live_worker_models()  # one read of the heartbeats: who is alive, running what
            alive |= workers
            unserved += [] if workers else [name]
    except REDIS_UNAVAILABLE as exc:
        # The details (Redis's address among them) go to the log, not to whoever asks.
        log.warning("not ready: Redis unavailable: %s", exc)
        return jsonify(ready=False, redis=False, error="the job queue (Redis) is unavailable"), 503
    ready = bool(alive)
    models = distinct_models(alive.values())
    body = dict(
        ready=ready, redis=True, workers=len(alive), models=models, queue_depth=depth, wait_mode=service.listener.mode
    )
    body["api_keys_required"] = bool(service.config.accepted_api_keys)  # the page asks for a key first
    body["models_without_workers"] = unserved  # make run waits until this is empty
    return jsonify(body), 200 if ready else 503


@bp.get("/models")
def models():
    """GET /models: every known model with its card (null with no live worker), live workers and queue depth.

    A model that only workers registered (not in this web's models file) and that none serves anymore is
    dropped from the registry here, and so disappears."""
    service, listed = _service(), []
    for name in service.models.known():
        state = service.models.state(name, fresh=True)
        if not state.workers and name not in service.models.file_models:
            service.models.forget_unserved(name)
            continue
        listed.append(
            {"name": name, "card": state.card, "workers": state.workers, "queue_depth":
             service.models.inspector(name).depth(), "in_models_file": name in service.models.file_models}
        )  # fmt: skip
    return jsonify(default=service.models.default, models=listed)


@bp.route("/")
def index() -> Response:
    """GET /: the upload page (static/index.html)."""
    return current_app.send_static_file("index.html")


@bp.route("/favicon.ico")
def favicon() -> Response:
    """GET /favicon.ico: the icon browsers ask for (static/favicon.ico)."""
    return current_app.send_static_file("favicon.ico")


@bp.route("/openapi.yaml")
def openapi_document() -> Response:
    """GET /openapi.yaml: the OpenAPI description of this API."""
    return send_from_directory(WEB_DIR, "openapi.yaml", mimetype="application/yaml")
