"""Classify one image with a running imgserve web API and print the top labels.

    python simple_request.py IMAGE [--url http://127.0.0.1:5000] [--top-k 5] [--async] [--json] [--timeout 60]
                             [--api-key KEY]

Prints `1. church: 0.4136` style lines, or with --json the server's JSON answer. --url takes the base URL
or the /predict URL. --async submits the image (POST /jobs) and polls its status until it is done,
showing the status on stderr. A server with API_KEYS set needs a key: --api-key, else the environment's
IMGSERVE_API_KEY, sent as `Authorization: Bearer <key>`. Exit code 0 on success, 1 when the server is
unreachable, too slow or answers an error, 2 when IMAGE cannot be read.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import time
from pathlib import Path

import requests

DEFAULT_URL = "http://127.0.0.1:5000"
API_KEY_ENV = "IMGSERVE_API_KEY"
NEEDS_KEY = f"the server needs an API key: --api-key or {API_KEY_ENV}"


class ClientError(Exception):
    """A failure to report to the user in one line; `code` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def read_image(path: str) -> bytes:
    """The file's bytes; ClientError (exit code 2) when it is missing or unreadable."""
    file = Path(path)
    if not file.is_file():
        raise ClientError(f"no such file: {path}", code=2)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}", code=2) from None


def base_url(url: str) -> str:
    """The API's base URL from what a user may paste: the base, or the URL of /predict or /jobs."""
    url = url.rstrip("/")
    for route in ("/predict", "/jobs"):
        if url.endswith(route):
            return url[: -len(route)]
    return url


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header for `api_key`, else for IMGSERVE_API_KEY from the environment; none without."""
    key = api_key or os.environ.get(API_KEY_ENV, "")
    return {"Authorization": f"Bearer {key.strip()}"} if key.strip() else {}


def post_image(url: str, name: str, data: bytes, timeout: float, top_k: int | None = None,
               route: str = "/predict", api_key: str | None = None) -> requests.Response:  # fmt: skip
    """POST the image to URL/predict (or `route`) as the multipart field `image`; ClientError when no answer came."""
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    params = {"top_k": top_k} if top_k else None
    files = {"image": (name, data, content_type)}
    return _request("post", base_url(url) + route, timeout, api_key, files=files, params=params)


def _request(method: str, endpoint: str, timeout: float, api_key: str | None = None, **kwargs: object
             ) -> requests.Response:  # fmt: skip
    try:
        return requests.request(method, endpoint, timeout=timeout, headers=auth_headers(api_key), **kwargs)
    except requests.Timeout:
        raise ClientError(f"no answer from {endpoint} within {timeout:g} s (raise --timeout?)") from None
    except requests.ConnectionError:
        raise ClientError(f"cannot connect to {endpoint}: is the server running? Start it with `make run`") from None
    except requests.RequestException as exc:
        raise ClientError(f"cannot send the request to {endpoint}: {exc}") from None


def parse_answer(response: requests.Response) -> dict:
    """The JSON body of a successful answer; ClientError with the server's `error` text otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        snippet = " ".join(response.text.split())[:200]
        raise ClientError(f"the server answered {response.status_code} with something that is not JSON: {snippet!r}")
    if response.status_code == 401:
        raise ClientError(f"{NEEDS_KEY} (the server answered 401: {body.get('error') or 'no error message'})")
    if response.status_code not in (200, 202) or not body.get("success", body.get("status") == "done"):
        message = body.get("error") or "no error message"
        raise ClientError(f"the server answered {response.status_code}: {message}")
    return body


def format_predictions(predictions: list[dict]) -> list[str]:
    """`1. church: 0.4136` lines, in the server's order (most probable first)."""
    return [f"{rank}. {p['label']}: {p['probability']:.4f}" for rank, p in enumerate(predictions, start=1)]


def classify(path: str, url: str = DEFAULT_URL, timeout: float = 60.0, top_k: int | None = None,
             api_key: str | None = None) -> tuple[dict, str]:  # fmt: skip
    """Send the image at `path` and wait for the answer; (parsed JSON, raw JSON text). Raises ClientError."""
    data = read_image(path)
    response = post_image(url, Path(path).name, data, timeout, top_k, api_key=api_key)
    return parse_answer(response), response.text


def classify_later(path: str, url: str = DEFAULT_URL, timeout: float = 60.0, top_k: int | None = None,
                   progress=None, api_key: str | None = None) -> tuple[dict, str]:  # fmt: skip
    """Submit the image (POST /jobs), then poll its status until it is done; (parsed JSON, raw JSON text).

    `progress(status, seconds)` is called after each poll. Raises ClientError, also when the job failed."""
    data = read_image(path)
    submitted = parse_answer(post_image(url, Path(path).name, data, timeout, top_k, "/jobs", api_key))
    status_url, started, pause = base_url(url) + submitted["status_url"], time.monotonic(), 0.1
    while time.monotonic() - started < timeout:
        response = _request("get", status_url, timeout, api_key)
        body = parse_answer(response) if response.status_code != 200 else response.json()
        if progress:
            progress(body.get("status", "?"), time.monotonic() - started)
        if body.get("status") in ("done", "failed"):
            return parse_answer(response), response.text
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)
    raise ClientError(f"job {submitted['id']} was not done within {timeout:g} s (raise --timeout?)")


def _show_progress(status: str, seconds: float) -> None:
    print(f"\rjob {status} after {seconds:.1f} s ", end="", file=sys.stderr, flush=True)


def positive_float(raw: str) -> float:
    """argparse type: a number greater than 0."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {raw}")
    return value


def top_k(raw: str) -> int:
    """argparse type: a whole number from 1 to 20."""
    if not raw.isdigit() or not 1 <= int(raw) <= 20:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 20, got {raw!r}")
    return int(raw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the image file to classify (JPEG, PNG, ...)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the web API's base URL (default {DEFAULT_URL})")
    parser.add_argument("--top-k", type=top_k, help="how many classes to list, 1 to 20 (default: the server's 5)")
    parser.add_argument("--async", dest="later", action="store_true",
                        help="submit the image as a job (POST /jobs), then poll until it is done")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer as it came")
    parser.add_argument("--api-key", help=f"the API key for a server with API_KEYS set (default: ${API_KEY_ENV})")
    parser.add_argument(
        "--timeout", type=positive_float, default=60.0, help="seconds to wait for the answer (default 60)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.later:
            body, raw = classify_later(args.image, args.url, args.timeout, args.top_k, _show_progress, args.api_key)
            print(file=sys.stderr)
        else:
            body, raw = classify(args.image, args.url, args.timeout, args.top_k, args.api_key)
    except ClientError as exc:
        print(("\n" if args.later else "") + f"simple_request.py: {exc}", file=sys.stderr)
        return exc.code
    print(raw.strip() if args.json else "\n".join(format_predictions(body["predictions"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
