"""Who may call the web API, and what it tells browsers: API keys, security headers on every answer,
and cross-site POSTs refused.

API keys (API_KEYS, API_KEYS_FILE): when any is set, every route but OPEN_ENDPOINTS needs
`Authorization: Bearer <key>`, so a route added later is closed until it is listed there.

A page on any other site can make its visitors' browsers POST a form to /predict (a "simple" request,
sent without asking first). Browsers say where such a request comes from, in `Origin` and
`Sec-Fetch-Site`; clients that are not browsers (curl, scripts) send neither, and pass.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, jsonify, request

from imgserve.protocol.keys import OPEN_OWNER

# The upload page loads its script and style from static/ and shows the chosen file from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The answer to an allowed origin's preflight (OPTIONS): what its script may send. Browsers keep it Max-Age seconds.
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}
# Open without a key: liveness and readiness probes, Prometheus, the page, its icon and the API's description.
# (The page asks for a key when /readyz says one is required.) None: an unknown path (a 404). Endpoints are
# named as Flask names them: "api." for the views' Blueprint (views.py).
OPEN_ENDPOINTS = frozenset(
    {"api.healthz", "api.readyz", "metrics", "api.index", "api.openapi_document", "static", "api.favicon", None}
)


def init_app(app: Flask, allowed_origins: tuple[str, ...], api_keys: tuple[str, ...] = ()) -> None:
    """Refuse requests without a valid key when `api_keys` are set, and cross-site requests that change state,
    except from `allowed_origins`; add HEADERS to every answer."""
    allowed = frozenset(allowed_origins)
    if api_keys:
        keys = [key.encode() for key in api_keys]
        app.before_request(lambda: _refuse_without_key(keys))
    app.before_request(lambda: _refuse_cross_site(allowed))
    app.after_request(lambda response: _add_headers(response, allowed))


def key_matches(given: bytes, keys: Iterable[bytes]) -> bool:
    """Whether `given` is one of `keys`, in time that depends on neither: every key is compared, each
    with hmac.compare_digest (whose time depends only on the length of the key given)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def _refuse_without_key(keys: list[bytes]) -> Response | None:
    if request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":  # a CORS preflight carries no key
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key_matches(given.strip().encode(), keys):
        return None
    response = jsonify(success=False, error="a valid API key is required: send Authorization: Bearer <key>")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="imgserve"'
    return response


def is_cross_site(origin: str | None, fetch_site: str | None, host: str) -> bool:
    """Whether a browser sent this request from a page of another site than `host` (the Host header).

    The Origin's host and port, not its scheme, are compared: behind a proxy that ends TLS, the page is
    https and the request reaches this server as http.
    """
    if origin is None:
        return fetch_site == "cross-site"
    return urlsplit(origin.lower()).netloc != host.lower()


def _refuse_cross_site(allowed: frozenset[str]) -> None:
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() in allowed:
        return
    if is_cross_site(origin, request.headers.get("Sec-Fetch-Site"), request.host):
        abort(403, "requests from pages of other sites are refused; ALLOWED_ORIGINS lists the sites that may post")


def _add_headers(response: Response, allowed: frozenset[str]) -> Response:
    response.headers.update(HEADERS)
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() in allowed:
        # An allowed site's script may read the answer, too.
        response.headers["Access-Control-Allow-Origin"] = origin
        _answer_preflight(response)
    if allowed:  # the answer depends on the Origin: caches must keep one per origin
        response.vary.add("Origin")
    return response


def request_owner(keyed: bool) -> str:
    """Who owns the jobs of this request: with API keys set (`keyed`), an id of the key it carries (checked
    already), the same in every process, from which the key cannot be read back; OPEN_OWNER without keys.
    Computed once per request."""
    if not keyed:
        return OPEN_OWNER
    if "owner" not in g:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        g.owner = owner_id(given.strip())
    return g.owner


def owner_id(key: str) -> str:
    """An API key's owner id: 16 hex digits of a keyed SHA-256 of it (keys.py, the ticket and owner keys)."""
    return hmac.new(b"imgserve job owner", key.encode(), hashlib.sha256).hexdigest()[:16]


def _answer_preflight(response: Response) -> None:
    """To an allowed origin's preflight, the methods and headers its script may use: a key, a DELETE."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response.headers.update(PREFLIGHT_HEADERS)


def init_hosts(app: Flask, accepted_hosts: tuple[str, ...]) -> None:
    """Refuse requests whose Host header is none of `accepted_hosts` (ALLOWED_HOSTS; empty: any host).

    A page on another site can have a name of its own resolve to this machine (DNS rebinding): its script's
    requests are then same-origin to the browser, and only their Host, that other name, gives them away.
    """
    if accepted_hosts:
        accepted = frozenset(accepted_hosts)
        app.before_request(lambda: _refuse_other_host(accepted))


def host_allowed(host: str, accepted: frozenset[str]) -> bool:
    """Whether a Host header value is in `accepted`: by its name alone, or by name and port."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]") + 1
        name, port = host[:end], host[end + 1 :] if host[end : end + 1] == ":" else ""
    else:
        name, _, port = host.partition(":")
    name = name.rstrip(".")
    return bool(name) and (name in accepted or f"{name}:{port}" in accepted)


def _refuse_other_host(accepted: frozenset[str]) -> Response | None:
    if host_allowed(request.host, accepted):
        return None
    response = jsonify(
        success=False,
        error="this server does not answer to that Host header: ALLOWED_HOSTS lists the names it answers to",
    )
    response.status_code = 400
    return response
