"""Send many /predict requests from a thread pool and summarize what came back.

    python stress_test.py [--url http://127.0.0.1:5000] [--image FILE] [--requests 500] [--concurrency 16]
                          [--gap 0.05] [--timeout 120] [--async] [--csv FILE] [--plot FILE.png] [--api-key KEY]

--url takes the base URL or the /predict URL. With --async each request submits the image as a job
(POST /jobs) and polls its status until it is done; its latency runs until then. A server with API_KEYS
set needs a key: --api-key, else the environment's IMGSERVE_API_KEY.

One request is submitted every --gap seconds (0.05 s, as in the original tutorial) to a pool of
--concurrency threads; without --image a generated JPEG is sent. Every request is waited for
before the summary is printed. Exit code 0 when every request succeeded, 1 otherwise, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from imgserve.client.simple_request import (
    API_KEY_ENV,
    DEFAULT_URL,
    NEEDS_KEY,
    ClientError,
    auth_headers,
    base_url,
    positive_float,
    read_image,
)

THREAD_PREFIX = "stress"
_local = threading.local()


@dataclass
class Outcome:
    """One request: when it started (s after the run began), how long it took, what came back."""

    index: int
    start: float
    latency: float
    status: int | None = None
    error: str = ""  # empty on success

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def kind(self) -> str:
        """`ok`, `HTTP 503`, `connection error`, `timeout`, `bad answer` or `other error`."""
        if self.ok:
            return "ok"
        if self.status is not None and self.status != 200:
            return f"HTTP {self.status}"
        return self.error.split(":", 1)[0]


@dataclass
class Summary:
    """Counts and latencies (seconds, successful requests only) of a run."""

    total: int
    successes: int
    failures: int
    errors: dict[str, int] = field(default_factory=dict)
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    wall: float = 0.0

    @property
    def throughput(self) -> float:
        """Requests answered per second of wall time."""
        return self.total / self.wall if self.wall > 0 else 0.0


def generated_image(width: int = 640, height: int = 480) -> bytes:
    """A JPEG of a colour gradient with noise, for runs without --image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    pixels = (ramp + rng.integers(0, 40, ramp.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _session() -> requests.Session:
    """One keep-alive session per pool thread (a Session is not meant to be shared between threads)."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def _use_key(api_key: str | None) -> None:
    """This thread's session sends the API key (`api_key`, else IMGSERVE_API_KEY), or none if there is none."""
    session = _session()
    session.headers.pop("Authorization", None)
    session.headers.update(auth_headers(api_key))


def send_one(url: str, image: bytes, index: int, run_started: float, timeout: float, later: bool = False,
             api_key: str | None = None) -> Outcome:  # fmt: skip
    """POST one image to URL/predict (or submit it and poll, `later`) and record the outcome; never raises
    for network errors."""
    started = time.perf_counter()
    outcome = Outcome(index, started - run_started, 0.0)
    try:
        _use_key(api_key)
        response = (_submit_and_collect if later else _predict)(base_url(url), image, started + timeout)
        outcome.status = response.status_code
        outcome.error = _answer_error(response)
    except requests.Timeout:
        outcome.error = f"timeout: no answer within {timeout:g} s"
    except requests.ConnectionError as exc:
        outcome.error = f"connection error: {type(exc).__name__}"
    except requests.RequestException as exc:
        outcome.error = f"other error: {exc}"
    outcome.latency = time.perf_counter() - started
    return outcome


def _predict(url: str, image: bytes, deadline: float) -> requests.Response:
    remaining = max(0.001, deadline - time.perf_counter())
    return _session().post(url + "/predict", files={"image": ("image.jpg", image)}, timeout=remaining)


def _submit_and_collect(url: str, image: bytes, deadline: float) -> requests.Response:
    """POST /jobs, then GET its status until it is done or failed; the last answer (an error answer as is)."""
    response = _session().post(
        url + "/jobs", files={"image": ("image.jpg", image)}, timeout=deadline - time.perf_counter()
    )
    if response.status_code != 202:
        return response
    status_url, pause = url + response.json()["status_url"], 0.02
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise requests.Timeout()
        response = _session().get(status_url, timeout=remaining)
        if response.status_code != 200 or response.json().get("status") in ("done", "failed"):
            return response
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, 0.5)


def _answer_error(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"bad answer: not JSON (HTTP {response.status_code})"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {body.get('error', '')}"
    if body.get("status") == "failed":
        return f"job failed: {body.get('error', '')}"
    return "" if body.get("success") or body.get("status") == "done" else "bad answer: success is not true"


def run(
    url: str,
    image: bytes,
    n: int,
    concurrency: int,
    gap: float,
    timeout: float,
    progress: bool = True,
    later: bool = False,
    api_key: str | None = None,
) -> tuple[list[Outcome], float]:
    """Send `n` requests, one every `gap` s, from `concurrency` threads; (outcomes by index, wall seconds).

    Returns only when every request has finished and every pool thread has been joined.
    """
    run_started = time.perf_counter()
    lock = threading.Lock()
    with tqdm(total=n, unit="req", disable=not progress) as bar:

        def tick(_future: object) -> None:
            with lock:  # called from the pool threads
                bar.update()

        # Leaving the `with` shuts the pool down with wait=True: all requests finish, all threads are joined.
        with ThreadPoolExecutor(concurrency, thread_name_prefix=THREAD_PREFIX) as pool:
            futures = []
            for index in range(n):
                future = pool.submit(send_one, url, image, index, run_started, timeout, later, api_key)
                future.add_done_callback(tick)
                futures.append(future)
                if gap > 0 and index < n - 1:
                    time.sleep(gap)
        outcomes = [future.result() for future in futures]
    return outcomes, time.perf_counter() - run_started


def summarize(outcomes: list[Outcome], wall: float) -> Summary:
    """Counts by outcome kind and latency percentiles of the successful requests."""
    good = [o.latency for o in outcomes if o.ok]
    errors = Counter(o.kind for o in outcomes if not o.ok)
    summary = Summary(len(outcomes), len(good), len(outcomes) - len(good), dict(sorted(errors.items())), wall=wall)
    if good:
        summary.p50, summary.p95, summary.p99 = (float(v) for v in np.percentile(good, [50, 95, 99]))
        summary.max = max(good)
    return summary


def format_summary(summary: Summary) -> str:
    """The human-readable report printed at the end of a run."""
    lines = [
        f"requests:    {summary.total}",
        f"successes:   {summary.successes}",
        f"failures:    {summary.failures}",
    ]
    lines += [f"  {kind}: {count}" for kind, count in summary.errors.items()]
    if summary.max is not None:
        named = (("p50", summary.p50), ("p95", summary.p95), ("p99", summary.p99), ("max", summary.max))
        ms = [f"{name} {value * 1000:.0f} ms" for name, value in named]
        lines.append(f"latency (successful requests): {', '.join(ms)}")
    else:
        lines.append("latency: n/a (no successful request)")
    lines.append(f"throughput:  {summary.throughput:.2f} req/s ({summary.total} requests in {summary.wall:.2f} s)")
    if summary.total and summary.errors.get("connection error") == summary.total:
        lines.append("no request reached the server: is it running? Start it with `make run` (or pass --url)")
    if summary.errors.get("HTTP 401"):
        lines.append(NEEDS_KEY)
    return "\n".join(lines)


def write_csv(outcomes: list[Outcome], path: str | Path) -> None:
    """One row per request: index, start offset (s), latency (s), HTTP status, error text."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["index", "start_s", "latency_s", "status", "error"])
        for o in outcomes:
            writer.writerow([o.index, f"{o.start:.6f}", f"{o.latency:.6f}", o.status or "", o.error])


def plot_latencies(outcomes: list[Outcome], path: str | Path) -> None:
    """A PNG histogram of request latencies, successes and failures stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [o.latency * 1000 for o in outcomes if o.ok]
    bad = [o.latency * 1000 for o in outcomes if not o.ok]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist([good, bad], bins=40, stacked=True, label=[f"ok ({len(good)})", f"failed ({len(bad)})"])
    if good:
        for q, style in ((50, "--"), (95, ":"), (99, "-.")):
            ax.axvline(float(np.percentile(good, q)), color="black", linestyle=style, label=f"p{q} (ok)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"/predict latency, {len(outcomes)} requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the web API's base URL (default {DEFAULT_URL})")
    parser.add_argument("--image", help="image file to send (default: a generated JPEG)")
    parser.add_argument("--requests", type=_positive_int, default=500, help="number of requests (default 500)")
    parser.add_argument("--concurrency", type=_positive_int, default=16, help="threads sending (default 16)")
    parser.add_argument("--gap", type=_non_negative, default=0.05, help="seconds between submissions (default 0.05)")
    parser.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--async", dest="later", action="store_true",
                        help="submit each image as a job (POST /jobs) and poll until it is done")  # fmt: skip
    parser.add_argument("--csv", help="write one row per request to this CSV file")
    parser.add_argument("--plot", help="draw a latency histogram into this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--api-key", help=f"the API key for a server with API_KEYS set (default: ${API_KEY_ENV})")
    return parser.parse_args(argv)


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {raw!r}")
    return int(raw)


def _non_negative(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {raw}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        image = read_image(args.image) if args.image else generated_image()
    except ClientError as exc:
        print(f"stress_test.py: {exc}", file=sys.stderr)
        return exc.code
    target = base_url(args.url) + ("/jobs (then polling each job)" if args.later else "/predict")
    print(f"sending {args.requests} requests to {target}, {args.concurrency} threads, gap {args.gap:g} s")
    outcomes, wall = run(args.url, image, args.requests, args.concurrency, args.gap, args.timeout,
                         not args.no_progress, args.later, args.api_key)  # fmt: skip
    summary = summarize(outcomes, wall)
    print(format_summary(summary))
    if args.csv:
        write_csv(outcomes, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot_latencies(outcomes, args.plot)
        print(f"wrote {args.plot}")
    return 0 if summary.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
