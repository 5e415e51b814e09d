"""What the front door costs: web and Redis CPU per request, by step, old beside new, for every job codec.

    python -m tools.front_door [--rev 36a4a9a] [--rounds 3] [--seconds 10] [--clients 4] [--parts all]

One Redis and one stand-in worker (tools/standin.py: the real worker, no model) serve several web servers
under gunicorn, as `make run` starts them (1 process x 64 threads); `--clients` closed-loop clients post the
castle photo to one web server at a time, and /proc says how much CPU each process spent. Parts:

  steps    this commit's web app with a CPU clock on every step (tools/web_profile.py): where each
           millisecond of a request goes
  compare  the web server of `--rev` (a git worktree; its own default codec) and this one's, measured in
           alternating windows, `--rounds` each: web, Redis and worker CPU per request, medians
  codecs   this web server with each JOB_CODEC, alternating: bytes per job, CPU per request on each side,
           and pixel error against the lossless image
  decoders preparing the castle photo with this commit's path (Pillow) and the other decoders that scale
           a JPEG in the DCT (simplejpeg; OpenCV and libvips where installed): speed and difference in pixels

The clients run on the same cores; their CPU is not counted in any figure.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from imgserve import settings
from imgserve.imaging.codecs import CODECS, LOSSLESS, decode_image
from imgserve.imaging.prepare import prepare_image
from imgserve.launch import stack
from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol import Job, connect
from tools.load import Client, CpuMeter, closed_loop, redis_pid, running, start_worker, with_children
from tools.processes import PROJECT, WebServer, sample_image_bytes, server_env

PROFILED_APP = "tools.web_profile:create_app()"
BASE_REV = "36a4a9a"  # main before issue 13: werkzeug's multipart parser, Pillow's JPEG decoder, JOB_CODEC=zstd
PARTS = ("steps", "compare", "codecs", "decoders")


@dataclass
class Window:
    """One measured window of closed-loop load against one web server."""

    requests_per_s: float
    errors: int
    web_ms: float  # CPU per request, gunicorn master and workers
    redis_ms: float
    worker_ms: float
    commands: float  # Redis commands per request

    @property
    def stack_requests_per_core_second(self) -> float:
        """Requests per second of CPU of the whole stack (web + Redis + worker), clients excluded."""
        return 1000 / (self.web_ms + self.redis_ms + self.worker_ms)


class Stack:
    """One Redis and one stand-in worker, for any number of web servers."""

    def __init__(self, exits: ExitStack, clients: int, seconds: float) -> None:
        self.redis_url = exits.enter_context(LocalRedis()).url
        self.counter = connect(self.redis_url)
        self.env = server_env(self.redis_url, "front-door", LOG_LEVEL="INFO", PYTHONPATH=str(PROJECT))
        self.worker = exits.enter_context(running(start_worker(self.env, null=True)))
        self.exits, self.clients, self.seconds = exits, clients, seconds
        self.client = Client(sample_image_bytes())

    def web(self, app: str = "run_web_server:create_app()", cwd: Path | None = None, **settings: str) -> WebServer:
        """A gunicorn web server of this stack, started as `make run` starts it (from `cwd`: another commit)."""
        server = WebIn(dict(self.env, **settings), app, cwd)
        self.exits.enter_context(running(server))
        server.wait_ready(60)
        for _ in range(10):  # warm-up: connections, first-request costs
            self.client.post(server.url)
        return server

    def measure(self, web: WebServer) -> Window:
        """One window of `clients` closed-loop clients against `web`."""
        meter = CpuMeter(
            {
                "web": with_children(web.process.pid),
                "redis": [redis_pid(self.counter)],
                "worker": [self.worker.process.pid],
            }
        )
        load = closed_loop(self.client, web.url, self.clients, 2.0, self.seconds, self.counter, meter)
        return Window(
            requests_per_s=load.rate,
            errors=load.errors,
            web_ms=load.cpu["web"]["ms_per_request"],
            redis_ms=load.cpu["redis"]["ms_per_request"],
            worker_ms=load.cpu["worker"]["ms_per_request"],
            commands=sum(load.commands.values()) / load.done,
        )


class WebIn(WebServer):
    """A gunicorn web server that loads `app` from `cwd` (this project by default)."""

    def __init__(self, env: dict[str, str], app: str = stack.WEB_APP, cwd: Path | None = None) -> None:
        self.cwd = cwd
        super().__init__(env, gunicorn=True, app=app)

    def _start(self, args: list[str], **output: object) -> subprocess.Popen:
        if self.cwd is None:
            return super()._start(args, **output)
        command = stack.gunicorn_command(settings.load(env=self.env, dotenv=False, role=settings.LAUNCH), self.app)
        command[command.index("--config") + 1] = str(self.cwd / "gunicorn.conf.py")  # that commit's hooks
        env = dict(self.env, **{stack.METRICS_DIR_ENV: self._metrics_dir.name}, PYTHONPATH=str(self.cwd))
        return subprocess.Popen(command, cwd=self.cwd, env=env, **output)


def medians(windows: list[Window]) -> Window:
    """The median of each figure over the windows (errors: their sum)."""
    figures = {f: statistics.median(getattr(w, f) for w in windows) for f in Window.__dataclass_fields__}
    return Window(**figures | {"errors": sum(w.errors for w in windows)})


def alternate(stack: Stack, webs: dict[str, WebServer], rounds: int, say: Callable[[str], None]) -> dict[str, Window]:
    """`rounds` windows of each web server, in turn, so that the machine's mood falls on each alike; medians."""
    windows: dict[str, list[Window]] = {name: [] for name in webs}
    for round_ in range(1, rounds + 1):
        for name, web in webs.items():
            windows[name].append(stack.measure(web))
            say(f"   round {round_}, {name}: {describe(windows[name][-1])}")
    return {name: medians(w) for name, w in windows.items()}


def describe(w: Window) -> str:
    return (
        f"{w.requests_per_s:.0f} req/s, web {w.web_ms:.2f} ms/request, Redis {w.redis_ms:.3f}, "
        f"worker {w.worker_ms:.2f}; {w.commands:.2f} commands/request; "
        f"{w.stack_requests_per_core_second:.0f} requests per stack core-second"
        + (f"; {w.errors} errors" if w.errors else "")
    )


def steps(stack: Stack, say: Callable[[str], None]) -> dict:
    """This commit's web app with every step of POST /predict timed (tools/web_profile.py), ms of CPU per request."""
    web = stack.web(PROFILED_APP)
    before = requests.get(web.url + "/__profile", timeout=10).json()
    window = stack.measure(web)
    after = requests.get(web.url + "/__profile", timeout=10).json()
    done = after["counts"]["wsgi"] - before["counts"]["wsgi"] - 1  # less the /__profile request itself
    per = {name: 1000 * (value - before["steps"].get(name, 0.0)) / done for name, value in after["steps"].items()}
    wsgi = per.pop("wsgi")
    listener = 1000 * (after["listener_cpu_s"] - before["listener_cpu_s"]) / done
    process = 1000 * (after["process_cpu_s"] - before["process_cpu_s"]) / done
    rows = dict(sorted(per.items(), key=lambda item: -item[1]))
    rows["Flask and Werkzeug: routing, request and response objects, hooks"] = wsgi - sum(per.values())
    rows["result listener thread (keyspace notifications)"] = listener
    rows["gunicorn: accept, read and parse HTTP, write the answer"] = process - wsgi - listener
    say(f"   {done} requests, {window.requests_per_s:.0f}/s; web process {process:.2f} ms of CPU per request:")
    for name, ms in rows.items():
        say(f"      {ms:6.3f} ms  {name}")
    return {"window": window.__dict__, "process_ms": process, "steps_ms": rows}


def compare(stack: Stack, rev: str, rounds: int, say: Callable[[str], None]) -> dict:
    """The web server of `rev` and this one's, alternating."""
    old = Path(tempfile.mkdtemp(prefix="imgserve-old-")) / "tree"
    git = {"cwd": PROJECT, "capture_output": True}
    subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], check=True, **git)
    stack.exits.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(old)], check=False, **git)
    old_codec = "zstd" if "zstd2" not in (old / "settings.py").read_text() else "zstd2"
    webs = {f"old ({rev}, JOB_CODEC={old_codec})": stack.web(cwd=old, JOB_CODEC=old_codec), "new": stack.web()}
    out = alternate(stack, webs, rounds, say)
    (old_name, old_w), (_, new_w) = out.items()
    for name, w in out.items():
        say(f"   median, {name}: {describe(w)}")
    say(
        f"   new / old: web CPU {new_w.web_ms / old_w.web_ms:.2f}, Redis CPU {new_w.redis_ms / old_w.redis_ms:.2f}, "
        f"worker CPU {new_w.worker_ms / old_w.worker_ms:.2f}, requests per stack core-second "
        f"{new_w.stack_requests_per_core_second / old_w.stack_requests_per_core_second:.2f}"
    )
    return {"old": old_w.__dict__, "new": new_w.__dict__, "rev": rev, "old_codec": old_codec}


def codecs(stack: Stack, rounds: int, say: Callable[[str], None]) -> dict:
    """This web server with each JOB_CODEC, alternating; bytes and pixel error of each from the castle photo."""
    pixels = prepare_image(sample_image_bytes())
    webs = {codec: stack.web(JOB_CODEC=codec) for codec in CODECS}
    out = {}
    for codec, w in alternate(stack, webs, rounds, say).items():
        job = Job.new(pixels, "000000000000", 30, codec)
        back = decode_image(job.image, job.codec, job.dtype, job.shape)
        out[codec] = w.__dict__ | {"job_bytes": len(job.to_json()), "psnr_db": psnr(pixels, back)}
        error = "lossless" if codec in LOSSLESS else f"PSNR {out[codec]['psnr_db']:.1f} dB"
        say(f"   median, {codec}: job {out[codec]['job_bytes']:,} bytes ({error}); {describe(w)}")
    return out


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB; infinity when the images are equal."""
    error = np.mean((reference.astype(np.float64) - other) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def decoders(say: Callable[[str], None], repeats: int = 300) -> dict:
    """Each way to turn the castle photo into the model's input: CPU per image, and pixels against this commit's.

    The candidates take turns, one image each, so that the machine's changes of speed fall on all alike."""
    data = sample_image_bytes()
    reference = prepare_image(data)
    candidates = _decoder_candidates()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, prepare in candidates.items():
            started = time.process_time()
            prepare(data)
            samples[name].append(time.process_time() - started)
    out = {}
    for name, prepare in candidates.items():
        pixels = prepare(data)
        diff = int(np.abs(pixels.astype(np.int16) - reference).max())
        ms = 1000 * statistics.median(samples[name])
        out[name] = {"cpu_ms": ms, "max_difference": diff, "psnr_db": psnr(reference, pixels)}
        alike = "the same pixels" if diff == 0 else f"pixels differ by up to {diff}, PSNR {out[name]['psnr_db']:.1f} dB"
        say(f"   {ms:6.3f} ms  {name}: {alike}")
    return out


def _decoder_candidates() -> dict[str, Callable[[bytes], np.ndarray]]:
    """This commit's path (Pillow), simplejpeg, and OpenCV's and libvips's reduced JPEG decoding where installed."""
    import simplejpeg
    from PIL import Image

    def simplejpeg_then_pillow(data: bytes) -> np.ndarray:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=224, min_height=224)
        return np.asarray(Image.fromarray(pixels).resize((224, 224), Image.Resampling.BILINEAR))

    def pillow_bare(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (224, 224))
        return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))

    candidates = {
        "this commit: prepare_image (header checks, EXIF, memory budget; Pillow decodes)": prepare_image,
        "Pillow alone: draft at 1/2 scale, convert, resize (bilinear)": pillow_bare,
        "simplejpeg at 1/2 scale, then Pillow's resize (bilinear)": simplejpeg_then_pillow,
    }
    try:
        import cv2

        def opencv(data: bytes) -> np.ndarray:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
            return cv2.cvtColor(cv2.resize(bgr, (224, 224), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)

        candidates["OpenCV: IMREAD_REDUCED_COLOR_2, resize INTER_AREA"] = opencv
    except ImportError:
        pass
    try:
        import pyvips

        def vips(data: bytes) -> np.ndarray:
            image = pyvips.Image.thumbnail_buffer(data, 224, height=224, size="force")
            return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8, shape=(224, 224, 3))

        candidates["libvips: thumbnail_buffer (shrink-on-load), size force"] = vips
    except (ImportError, OSError):
        pass
    return candidates


def run(parts: tuple[str, ...], rev: str, rounds: int, seconds: float, clients: int,
        say: Callable[[str], None] = print) -> dict:  # fmt: skip
    """The chosen parts, each with its figures; prints as it goes."""
    out: dict = {}
    if "decoders" in parts:
        say("Preparing the castle photo (CPU per image, median; OpenCV and libvips only where installed):")
        out["decoders"] = decoders(say)
    server_parts = [p for p in parts if p != "decoders"]
    if not server_parts:
        return out
    with ExitStack() as exits:
        stack = Stack(exits, clients, seconds)
        say(f"{clients} closed-loop clients, {seconds:g} s windows; CPU per request from /proc, clients excluded")
        if "steps" in parts:
            say("Where a request's web CPU goes, by step (tools/web_profile.py):")
            out["steps"] = steps(stack, say)
        if "compare" in parts:
            say(f"The web server of {rev} beside this one's, {rounds} alternating windows each:")
            out["compare"] = compare(stack, rev, rounds, say)
        if "codecs" in parts:
            say(f"Each JOB_CODEC, {rounds} alternating windows each:")
            out["codecs"] = codecs(stack, rounds, say)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="all", help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--rev", default=BASE_REV, help="the older commit whose web server to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured window")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    args.parts = PARTS if args.parts == "all" else tuple(p.strip() for p in args.parts.split(","))
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run(args.parts, args.rev, args.rounds, args.seconds, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
