"""How the web API answers errors: always JSON, `{"success": false, "error": ...}`.

Views raise Refused (or an HTTPException, which Flask raises too: 404, 405, 413) and let REDIS_UNAVAILABLE
through; `init_app` registers the handlers that turn each into its JSON answer.
"""

from __future__ import annotations

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from imgserve import logger
from imgserve.protocol import REDIS_UNAVAILABLE
from imgserve.web.uploads import FormTooLarge

log = logger.get("web")


def init_app(app: Flask) -> None:
    """Answer `app`'s errors as JSON."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Refused, _refused)
    for unavailable in REDIS_UNAVAILABLE:  # Flask takes one class per handler
        app.register_error_handler(unavailable, _redis_unavailable)


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
        limit = current_app.config["MAX_CONTENT_LENGTH"]  # MAX_UPLOAD_BYTES
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


def _redis_unavailable(exc: Exception):
    """503 for Redis unavailable: a client may try again shortly. The details (Redis's address among
    them) go to the log, not to whoever asks."""
    log.warning("Redis unavailable for %s %s: %s", request.method, request.path, exc)
    return error(503, "the job queue (Redis) is unavailable; try again shortly", retry_after=1)
