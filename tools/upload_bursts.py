"""Whether large upload bodies stay within the web process's memory: bursts of 16 MB uploads, old beside new.

    python -m tools.upload_bursts [--rev 39047f8] [--bursts 6] [--concurrency 64] [--decode-wait 30]

One Redis and one stand-in worker (tools/standin.py: the real worker, no model) serve two web servers under
gunicorn, as `make run` starts them (1 process x 64 threads, the default DECODE_BUDGET_BYTES): `--rev`'s, from
a git worktree, and this one's. Each burst posts `--concurrency` uploads at once of one PNG of noise just
under MAX_UPLOAD_BYTES (16 MiB) to one server, then to the other, alternating. Printed per burst and server:
the answers, the gunicorn worker's peak resident memory during the burst (VmHWM, reset before each burst
through /proc/PID/clear_refs) and what it still holds a second after the burst (VmRSS). DECODE_WAIT is
raised (`--decode-wait`) so that uploads wait for the budget rather than being refused at once: both servers
then read and prepare every upload, and only how many at a time differs. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from imgserve import settings
from imgserve.launch.local_redis import LocalRedis
from tools.bench import running, start_worker
from tools.front_door import WebIn
from tools.processes import PROJECT, WebServer, server_env

BASE_REV = "39047f8"  # main before issue 28: upload bodies outside the decode budget
SIDE = 2360  # a PNG of SIDE x SIDE RGB noise is just under 16 MiB


def noise_png(side: int = SIDE) -> bytes:
    """A PNG that does not compress: about 3 x side^2 bytes."""
    pixels = np.random.default_rng(28).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def multipart(image: bytes) -> tuple[bytes, str]:
    """The form with `image` as its one file field, built once and shared by every request of a burst."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="noise.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM), in kB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))


def gunicorn_worker(web: WebServer) -> int:
    """The pid of the gunicorn worker process under the web server's arbiter."""
    master = web.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def burst(web: WebServer, body: bytes, content_type: str, count: int) -> dict:
    """`count` concurrent uploads of `body`: the answers, the peak during the burst and the memory held after."""
    pid = gunicorn_worker(web)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS

    def post(_: int) -> int:
        try:
            headers = {"Content-Type": content_type}
            return requests.post(web.url + "/predict", data=body, headers=headers, timeout=120).status_code
        except requests.RequestException as error:
            return type(error).__name__

    with ThreadPoolExecutor(count) as pool:
        answers = Counter(pool.map(post, range(count)))
    peak = status_kb(pid, "VmHWM")
    time.sleep(1.0)
    return {"answers": dict(answers), "peak_mb": peak / 1024, "held_mb": status_kb(pid, "VmRSS") / 1024}


def old_tree(exits: ExitStack, rev: str) -> Path:
    """A git worktree of `rev`, removed at the end."""
    old = Path(tempfile.mkdtemp(prefix="imgserve-old-")) / "tree"
    git = {"cwd": PROJECT, "capture_output": True}
    subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], check=True, **git)
    exits.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(old)], check=False, **git)
    return old


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    body, content_type = multipart(noise_png())
    limit = settings.Settings.max_upload_bytes
    print(f"body: {len(body):,} bytes (MAX_UPLOAD_BYTES {limit:,}); {args.concurrency} at once, {args.bursts} bursts")
    with ExitStack() as exits:
        redis_url = exits.enter_context(LocalRedis()).url
        env = server_env(
            redis_url, "bursts", LOG_LEVEL="WARNING", DECODE_WAIT=args.decode_wait, PYTHONPATH=str(PROJECT)
        )
        exits.enter_context(running(start_worker(env, null=True)))
        webs = {f"old ({args.rev})": WebIn(env, cwd=old_tree(exits, args.rev)), "new": WebIn(env)}
        for name, web in webs.items():
            exits.enter_context(running(web))
            web.wait_ready(60)
            print(f"{name}: {status_kb(gunicorn_worker(web), 'VmRSS') / 1024:.0f} MB before the first burst")
        out: dict[str, list[dict]] = {name: [] for name in webs}
        for number in range(1, args.bursts + 1):
            for name, web in webs.items():
                result = burst(web, body, content_type, args.concurrency)
                out[name].append(result)
                peak, held = result["peak_mb"], result["held_mb"]
                print(f"burst {number} {name:>14}: peak {peak:6.0f} MB, held after {held:6.0f} MB,"
                      f" answers {result['answers']}", flush=True)  # fmt: skip
    return out


def summary(out: dict[str, list[dict]]) -> None:
    (old_name, old), (_, new) = out.items()
    for what in ("peak_mb", "held_mb"):
        olds, news = [b[what] for b in old], [b[what] for b in new]
        listed = {side: " ".join(f"{v:.0f}" for v in values) for side, values in (("old", olds), ("new", news))}
        print(
            f"{what.split('_')[0]:>4}: old {listed['old']} MB; new {listed['new']} MB;"
            f" new/old at the last burst {news[-1] / olds[-1]:.2f}, highest {max(news) / max(olds):.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default=BASE_REV, help="the older commit whose web server to compare")
    parser.add_argument("--bursts", type=int, default=6, choices=range(1, 21), metavar="1..20")
    parser.add_argument("--concurrency", type=int, default=64, choices=range(1, 129), metavar="1..128")
    parser.add_argument("--decode-wait", type=float, default=30.0, help="DECODE_WAIT of both servers, seconds")
    summary(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
