"""Classify one image with a running imgserve web API and print the top-5 labels.

    python simple_request.py IMAGE [--url http://127.0.0.1:5000] [--json] [--timeout 60]

Prints `1. church: 0.4136` style lines, or with --json the server's JSON answer. Exit code 0 on
success, 1 when the server is unreachable, too slow or answers an error, 2 when IMAGE cannot be read.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
from pathlib import Path

import requests

DEFAULT_URL = "http://127.0.0.1:5000"


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


def post_image(url: str, name: str, data: bytes, timeout: float) -> requests.Response:
    """POST the image to URL/predict as the multipart field `image`; ClientError when no answer came."""
    endpoint = url.rstrip("/") + "/predict"
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        return requests.post(endpoint, files={"image": (name, data, content_type)}, timeout=timeout)
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
    if response.status_code != 200 or not body.get("success"):
        message = body.get("error") or "no error message"
        raise ClientError(f"the server answered {response.status_code}: {message}")
    return body


def format_predictions(predictions: list[dict]) -> list[str]:
    """`1. church: 0.4136` lines, in the server's order (most probable first)."""
    return [f"{rank}. {p['label']}: {p['probability']:.4f}" for rank, p in enumerate(predictions, start=1)]


def classify(path: str, url: str = DEFAULT_URL, timeout: float = 60.0) -> tuple[dict, str]:
    """Send the image at `path`; (parsed JSON, raw JSON text). Raises ClientError."""
    data = read_image(path)
    response = post_image(url, Path(path).name, data, timeout)
    return parse_answer(response), response.text


def positive_float(raw: str) -> float:
    """argparse type: a number greater than 0."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {raw}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the image file to classify (JPEG, PNG, ...)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the web API's base URL (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer as it came")
    parser.add_argument(
        "--timeout", type=positive_float, default=60.0, help="seconds to wait for the answer (default 60)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        body, raw = classify(args.image, args.url, args.timeout)
    except ClientError as exc:
        print(f"simple_request.py: {exc}", file=sys.stderr)
        return exc.code
    print(raw.strip() if args.json else "\n".join(format_predictions(body["predictions"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
