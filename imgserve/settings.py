"""All settings, read from the environment (and `.env`) and validated once at start-up.

Each setting is declared once, as a field of `Settings` made by `setting(default, parser, roles, doc)`: its
parser, its default, the roles that read it and the line that documents it. Every entry point calls
`load(role=...)`, which parses and checks only the settings its role reads; a bad value raises `SettingsError`
naming the variable, which the entry points print and turn into exit code 2. The README's settings table and
`.env.example` are generated from the declarations: `make settings-doc` (tools/settings_doc.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

from imgserve.models import ModelsError, ModelSpec, load_models

# The project's folder (where `.env` is read from): the one that holds the imgserve package.
PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Formats whose decoders are common and well exercised; Pillow reads many more (EPS runs Ghostscript,
# PSD, FITS, JPEG 2000 ...), each a decoder an upload could reach.
DEFAULT_ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message names the variable."""


def hide_password(url: str) -> str:
    """Return `url` with every password in it replaced by ***: the user information before the last `@`
    (all of it when a password's unencoded `/` or `?` leaves a URL parser unsure where it ends) and
    `password=` query arguments."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        masked = f"{user}:***" if colon and "/" not in user and "?" not in user else "***"
        rest = f"{masked}@{rest}"
    return _PASSWORD_ARGUMENT.sub(r"\1***", scheme + sep + rest)


_PASSWORD_ARGUMENT = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _int(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise SettingsError(f"{name} must be {bound}, got {value}")
        return value

    return parse


def _float(lo: float, strict: bool = False) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if value != value or value < lo or (strict and value == lo):
            relation = "greater than" if strict else "at least"
            raise SettingsError(f"{name} must be {relation} {lo:g}, got {raw!r}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _auto_or(parse: Callable[[str, str], object], word: str = "auto") -> Callable[[str, str], object]:
    """`word` (None: the program decides) or what `parse` accepts."""

    def parse_or_auto(name: str, raw: str) -> object:
        return None if raw.strip().lower() == word else parse(name, raw)

    return parse_or_auto


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _redis_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name} must start with redis://, rediss:// or unix://, got {hide_password(raw)!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"{name} has no host name: {hide_password(raw)!r}")
    return raw.strip()


def _queue_name(name: str, raw: str) -> str:
    value = raw.strip()
    # Braces are left out because the shards' hash tags are made of them: `{image_queue:0}`.
    # '@' is left out too: it separates the queue's name from a model's (keys.model_queue).
    if not value or any(c.isspace() for c in value) or any(c in value for c in "*?[]{}@"):
        raise SettingsError(
            f"{name} must be a non-empty name without spaces, braces, '@' or glob characters, got {raw!r}"
        )
    return value


def _priority_weights(name: str, raw: str) -> tuple[int, ...]:
    """Three whole numbers from 1 to 1000, e.g. `8,4,1`: one per priority level, high first."""
    parts = [part.strip() for part in raw.split(",")]
    if len(parts) != 3:
        raise SettingsError(f"{name} must be three weights (high,normal,low) separated by commas, got {raw!r}")
    return tuple(_int(1, 1000)(name, part) for part in parts)


def _shard_list(name: str, raw: str) -> tuple[int, ...]:
    """A comma-separated list of shard numbers, e.g. `0,2`."""
    parse = _int(0, 1023)
    shards = tuple(sorted({parse(name, part.strip()) for part in raw.split(",") if part.strip()}))
    if not shards:
        raise SettingsError(f"{name} must be 'all' or shard numbers separated by commas, got {raw!r}")
    return shards


def _weights(name: str, raw: str) -> str:
    value = raw.strip()
    if value.lower() in ("imagenet", "none"):
        return value.lower()
    if not Path(value).expanduser().is_file():
        raise SettingsError(f"{name} must be 'imagenet', 'none' or the path of a weights file; no file at {value!r}")
    return str(Path(value).expanduser())


def _path(name: str, raw: str) -> Path:
    """A path, relative to the project's folder unless absolute (whether it exists is the reader's concern)."""
    if not raw.strip():
        raise SettingsError(f"{name} must be a path, got {raw!r}")
    return PROJECT_DIR / Path(raw.strip()).expanduser()


def _model_name(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise SettingsError(f"{name} must be a model name (letters, digits, '-', '_'), got {raw!r}")
    return value


def _folder(name: str, raw: str) -> Path:
    path = _path(name, raw)
    if not path.is_dir():
        raise SettingsError(f"{name} must be a folder of images; no folder at {raw.strip()!r}")
    return path


def _host(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} must not be empty")
    return raw.strip()


def _formats(name: str, raw: str) -> tuple[str, ...]:
    from PIL import Image  # only when the setting is given: serve.py and gunicorn.conf.py load settings too

    Image.init()
    values = tuple(dict.fromkeys(v.strip().upper() for v in raw.split(",") if v.strip()))
    unknown = [v for v in values if v not in Image.OPEN]
    if not values or unknown:
        raise SettingsError(
            f"{name} must be a comma-separated list of formats Pillow reads ({', '.join(sorted(Image.OPEN))}); "
            f"got {raw!r}"
        )
    return values


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = []
    for value in (v.strip().lower().rstrip("/") for v in raw.split(",") if v.strip()):
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise SettingsError(f"{name} must list origins such as https://example.com:8443, got {value!r}")
        origins.append(value)
    return tuple(origins)


# The names a browser on this machine reaches a loopback-bound server by: ALLOWED_HOSTS's default there.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_HOST_NAME = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")


def _hosts(name: str, raw: str) -> tuple[str, ...]:
    """Host names, each with an optional port (`example.com`, `10.0.0.5:8080`, `[::1]`), or `*` for any."""
    values = tuple(dict.fromkeys(v.strip().lower().rstrip(".") for v in raw.split(",") if v.strip()))
    bad = [v for v in values if v != "*" and not _HOST_NAME.fullmatch(v)]
    if not values or bad:
        raise SettingsError(
            f"{name} must list host names, each with an optional port (api.example.com, 10.0.0.5:8080, [::1]), "
            f"or * for any; got {raw!r}"
        )
    return values


MIN_API_KEY_LENGTH = 16


def _api_keys(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated keys; set but holding none (empty, or only commas and spaces) is an error: whoever set
    it meant to close the API, and an empty value would leave it open without a word."""
    keys = _key_list(name, raw)
    if not keys:
        raise SettingsError(f"{name} is set but holds no key: give at least one, or unset {name} to leave the API open")
    return keys


def _key_list(name: str, raw: str) -> tuple[str, ...]:
    keys = tuple(dict.fromkeys(k.strip() for k in raw.split(",") if k.strip()))
    # Never the key itself in the message: it may be a real key with a typo.
    for number, key in enumerate(keys, start=1):
        if len(key) < MIN_API_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
            raise SettingsError(
                f"{name}: key number {number} must be at least {MIN_API_KEY_LENGTH} printable characters "
                f"without spaces (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    return keys


def _api_keys_file(name: str, raw: str) -> tuple[str, ...]:
    """The keys in a file: one per line (or comma-separated); blank lines and lines starting with # ignored."""
    if not raw.strip():
        raise SettingsError(f"{name} is set but empty: name a file of keys, or unset {name} to leave the API open")
    path = Path(raw.strip()).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{name}: cannot read {str(path)!r} ({type(exc).__name__})") from None
    lines = (line.strip() for line in text.splitlines())
    keys = _key_list(name, ",".join(line for line in lines if line and not line.startswith("#")))
    if not keys:
        raise SettingsError(f"{name}: {str(path)!r} holds no key")
    return keys


def _log_level(name: str, raw: str) -> str:
    return _choice("debug", "info", "warning", "error")(name, raw).upper()


# The roles that read settings: a process loads the settings of its role only (`load(role=...)`), so the web
# server never checks MODEL_WEIGHTS' file and a worker never reads API_KEYS_FILE.
WEB, WORKER, LAUNCH = "web", "worker", "launch"  # LAUNCH: what starts gunicorn and nginx (`make run`, stack.py)
ALL = "all"  # every setting: `make run`, which starts every role, and the tools


@dataclass(frozen=True)
class Spec:
    """How one setting is read and documented; declared once, beside its field in Settings (see `setting`)."""

    parse: Callable[[str, str], object]  # (VARIABLE_NAME, raw text) -> value; raises SettingsError naming it
    roles: tuple[str, ...]  # the roles that read it: WEB, WORKER, LAUNCH
    doc: str  # one line of Markdown: the README's settings table and, as plain text, .env.example
    shown: str  # the default as the variable spells it ("" for unset)
    example: str | None  # a value worth showing in .env.example beside the default


def setting(
    default: object,
    parse: Callable[[str, str], object],
    roles: tuple[str, ...],
    doc: str,
    *,
    shown: str | None = None,
    example: str | None = None,
    secret: bool = False,
) -> object:
    """A field of Settings with its parser, roles and documentation. `shown` spells the default as the variable
    would (needed when the default is None: "auto", "all"); `secret` keeps the value out of repr(), so that no log
    line or error message that shows the settings shows it."""
    spec = Spec(parse, roles, doc, _spelled(default) if shown is None else shown, example)
    return dataclasses.field(default=default, repr=not secret, metadata={"setting": spec})


def _spelled(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        raise TypeError("a setting whose default is None needs shown= (the word that means it, e.g. auto)")
    return str(value)


def spec(field: dataclasses.Field) -> Spec:
    """The declaration of one field of Settings."""
    return field.metadata["setting"]


@dataclass(frozen=True)
class Settings:
    """Every setting: the variable is the field's name in capitals; `setting(default, parser, roles, doc)`."""

    redis_url: str = setting(
        DEFAULT_REDIS_URL,
        _redis_url,
        (WEB, WORKER),
        "Redis to use; `rediss://` for TLS; password in the URL (`redis://:pw@host:6379/0`, or `?password=pw`), "
        "shown as `***` in every log line and error message. Any node of a Redis Cluster will do: cluster mode is "
        "detected from the server. Unset under `make run`: a local Redis is started on 127.0.0.1:6379.",
        example="rediss://:s3cret@redis.example.com:6380/0",
    )
    image_queue: str = setting(
        "image_queue",
        _queue_name,
        (WEB, WORKER),
        "the Redis LIST of queued jobs; every other key starts with this name (no braces: the shards' hash tags "
        "are made of them)",
    )
    queue_shards: int = setting(
        1,
        _int(1, 1024),
        (WEB, WORKER),
        "shards the queue is split into (1 to 1024), each a queue of its own whose keys share one hash tag, "
        "`{image_queue:N}`; on a Redis Cluster, several times the number of primaries. Every web server and "
        "worker must use the same value. See [Redis Cluster](#redis-cluster-sharded-queues)",
    )
    worker_shards: tuple[int, ...] | None = setting(
        None,
        _auto_or(_shard_list, "all"),
        (WORKER,),
        "the shards a model worker serves, e.g. `0,2` (`run_model_server.py --shards 0,2`); `all` serves every "
        "shard in turn",
        shown="all",
        example="0,2",
    )
    batch_size: int = setting(32, _int(1, 1024), (WORKER,), "most jobs a worker runs through the model at once")
    priority_weights: tuple[int, ...] = setting(
        (8, 4, 1),
        _priority_weights,
        (WORKER,),
        "the weighted fair share of the priority levels high, normal and low (`?priority=`): while several levels "
        "have jobs waiting, a worker takes each level's weight's share of them (8,4,1: low gets 1 job in 13, never "
        "none). See [Priorities](#priorities)",
        example="1,1,1",
    )
    batch_wait_ms: float = setting(
        0.0,
        _float(0.0),
        (WORKER,),
        "after the first job arrives, how long (ms) a worker waits for more to fill the batch; 0: take what is "
        "queued (under load batches fill while the model runs, `make bench`)",
    )
    prefetch_batches: int | None = setting(
        None,
        _auto_or(_int(0, 4)),
        (WORKER,),
        "claimed batches a worker decodes ahead of its model (0 to 4), so that a GPU never waits for Redis; "
        "`auto` is 1 on a GPU and 0 on the CPU (where decoding ahead would take cores from the model); see "
        "[Feeding a GPU](#feeding-a-gpu)",
        shown="auto",
    )
    job_codec: str = setting(
        "zstd2",
        _choice("raw", "zstd", "zstd2", "jpeg", "webp"),
        (WEB,),  # image_codecs.CODECS
        "how the web server packs an image into its job (`imgserve/imaging/codecs.py`). Lossless: `zstd2` "
        "(green subtracted from red and blue, rows delta-coded, then Zstandard: the castle photo's job is "
        "111,250 bytes), `zstd` "
        "(without the green step: 132,147), `raw` (plain uint8 pixels: 200,900; the least CPU for a GPU worker). "
        "Lossy, opt-in: `jpeg` or `webp` at `JOB_QUALITY` (the castle: 32,571 bytes as JPEG at 90, PSNR 37.3 dB "
        "against the lossless pixels; what that does to accuracy is not measured here: no real weights). An image "
        "that does not compress goes raw. Workers read every codec: upgrade workers before web servers. See "
        "[The front door's cost](#the-front-doors-cost)",
    )
    job_quality: int = setting(
        90, _int(1, 100), (WEB,), "quality (1 to 100) of `JOB_CODEC=jpeg` or `webp`; the lossless codecs ignore it"
    )
    result_ttl: int = setting(
        3600,
        _int(1),
        (WEB, WORKER),
        "the longest (s) a result stays in Redis; a result expires 5 s after its job's deadline, and 2 s after the "
        "web server took it",
    )
    request_timeout: float = setting(
        30.0, _float(0.0, strict=True), (WEB, LAUNCH), "seconds a client waits for its result before a 504"
    )
    result_cache_ttl: int = setting(
        0,
        _int(0, 86400),
        (WEB,),
        "seconds a successful single-image `/predict` answer is kept and shared by identical requests (same "
        "pixels, model and `top_k`), which also share one job while it runs; 0: off (no hashing). See "
        "[Result cache](#result-cache)",
        example="60",
    )
    model_weights: str = setting(
        "imagenet",
        _weights,
        (WORKER,),
        "`imagenet`: Keras downloads the ImageNet weights (needs internet once; cached in `~/.keras/models`); a "
        "weights file path (`resnet50_weights_tf_dim_ordering_tf_kernels.h5`); or `none`: random weights, for "
        "smoke tests only (predictions are meaningless)",
        example="/path/to/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
    )
    models_file: Path = setting(
        PROJECT_DIR / "models.toml",
        _path,
        (WEB, WORKER, LAUNCH),
        "the models to serve, one TOML table each (README 'Serve your own model'; models.example.toml); relative "
        "to the project's folder. No such file: the one model `resnet50` (ResNet50 with MODEL_WEIGHTS)",
        shown="models.toml",
        example="models.example.toml",
    )
    default_model: str | None = setting(
        None,
        _model_name,
        (WEB, WORKER, LAUNCH),
        "the model of requests without `?model=`, and of a worker started without `--model`; unset: the first "
        "table of MODELS_FILE",
        shown="",
        example="resnet50",
    )
    model_backend: str = setting(
        "tensorflow",
        _choice("tensorflow", "onnxruntime", "openvino"),
        (WORKER,),
        "what runs the model: `tensorflow`; or `onnxruntime` / `openvino`, faster on a CPU: the model is converted "
        "once and cached (`MODEL_CACHE_DIR`); README 'Faster on the CPU: backends'",
        example="openvino",
    )
    model_precision: str = setting(
        "fp32",
        _choice("fp32", "int8"),
        (WORKER,),
        "`fp32`, or `int8` (`onnxruntime` and `openvino` only): quantized on the images of `MODEL_CALIBRATION_DIR`, "
        "faster, answers close to fp32's (agreement logged at start-up)",
    )
    model_calibration_dir: Path | None = setting(
        None,
        _folder,
        (WORKER,),
        "a folder of your own images (a few hundred, like your uploads) that int8 (`MODEL_PRECISION`) calibrates on; "
        "every fifth is held out to measure agreement with fp32",
        shown="",
        example="/path/to/calibration-images",
    )
    model_threads: int | None = setting(
        None,
        _auto_or(_int(1, 1024), "all"),
        (WORKER,),
        "threads one worker's model computes on (intra-op); `all`: every core. With several workers on one machine, "
        "give each its share (cores / workers)",
        shown="all",
        example="2",
    )
    model_cache_dir: Path | None = setting(
        None,
        _auto_or(_path),
        (WORKER,),
        "where converted models are cached; `auto`: next to a weights file (`imgserve-cache/`), else "
        "`~/.cache/imgserve`",
        shown="auto",
    )
    web_host: str = setting(
        "127.0.0.1",
        _host,
        (WEB, LAUNCH),
        "the address the web server listens on: `127.0.0.1` keeps it private; `0.0.0.0` serves other machines",
    )
    web_port: int = setting(5000, _int(1, 65535), (WEB, LAUNCH), "the port the web server listens on")
    allowed_hosts: tuple[str, ...] | None = setting(
        None,
        _hosts,
        (WEB,),
        "comma-separated host names, each with an optional port (`api.example.com`, `10.0.0.5:8080`, `[::1]`), "
        "that the `Host` header may carry; others get a 400 JSON naming this setting (against DNS rebinding). "
        "Default: `localhost`, `127.0.0.1` and "
        "`[::1]` when `WEB_HOST` is a loopback address, else any host (set it when serving other machines); `*`: any",
        shown="",
        example="api.example.com",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        _origins,
        (WEB,),
        "comma-separated origins (`https://app.example.com`) whose pages may POST to the API from a browser, and "
        "read its answers; see [Security](#security). Empty: only the server's own pages (and clients that are "
        "not browsers: curl, scripts)",
        example="https://app.example.com",
    )
    api_keys: tuple[str, ...] = setting(
        (),
        _api_keys,
        (WEB,),
        "comma-separated API keys (each at least 16 printable characters, no spaces; make one with "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`). When it or `API_KEYS_FILE` holds any, "
        "every route but `/healthz`, `/readyz`, `/metrics`, the page and `/openapi.yaml` needs "
        "`Authorization: Bearer <key>` (401 JSON otherwise). Unset: the API is open; set but empty (or only commas) "
        "is refused at start-up. A secret: keep it in `.env` "
        "or the environment, never in git. See [Security](#security)",
        example="<key1>,<key2>",
        secret=True,
    )
    api_keys_file: tuple[str, ...] = setting(  # the keys read from the file it names
        (),
        _api_keys_file,
        (WEB,),
        "a file of API keys, one per line (`#` comments), readable only by the service, added to `API_KEYS`: "
        "keeps keys out of the environment",
        example="/etc/imgserve/api_keys",
        secret=True,
    )
    proxy: str = setting(
        "auto",
        _choice("auto", "nginx", "off"),
        (LAUNCH,),
        "what `make run` puts in front of gunicorn, so that slow or idle clients cannot hold gunicorn's threads: "
        "`auto` nginx where installed, else gunicorn alone with a warning; `nginx` nginx or a start-up error; "
        "`off` gunicorn alone on `WEB_PORT`. See [Slow clients](#slow-clients-nginx-in-front)",
    )
    proxy_header_timeout: float = setting(
        10.0,
        _float(0.0, strict=True),
        (LAUNCH,),
        "seconds nginx gives a client to send its whole request line and headers (`client_header_timeout`); "
        "then it closes the connection",
    )
    proxy_body_timeout: float = setting(
        15.0,
        _float(0.0, strict=True),
        (LAUNCH,),
        "seconds nginx waits between two reads of a request body, and between two writes of an answer "
        "(`client_body_timeout`, `send_timeout`)",
    )
    web_processes: int = setting(
        1, _int(1, 64), (LAUNCH,), "gunicorn processes under `make run` (each serves `WEB_THREADS` requests at once)"
    )
    web_threads: int = setting(
        64, _int(1, 1024), (LAUNCH,), "gunicorn threads per process under `make run`; each waiting request holds one"
    )
    web_nice: int = setting(
        10,
        _int(0, 19),
        (WEB,),
        "how much lower (0–19) the CPU priority of gunicorn's web processes is: where web and worker share cores, "
        "the model keeps them under load (0 to +7% images/s at saturation in four comparisons here, "
        "`deliverables/TEST_RESULTS.md`); no effect when the cores are idle. 0 leaves it alone",
    )
    max_attempts: int = setting(
        3,
        _int(1),
        (WEB, WORKER),
        "deliveries of a job before it goes to the dead-letter list and its client gets an error",
    )
    max_queue: int = setting(
        1000,
        _int(1),
        (WEB, WORKER),
        "queue length, per priority level, at which `/predict` and `/jobs` answer 503 with `Retry-After`; with "
        "several shards each holds at most its share (`MAX_QUEUE / QUEUE_SHARDS`, rounded up) of each level, and a "
        "job goes to the next shard with room",
    )
    max_queue_per_key: int | None = setting(  # None: auto (queue_share_per_key)
        None,
        _auto_or(_int(1)),
        (WEB,),
        "with API keys set, jobs one key may have queued or running at once (`/predict` and `/jobs` alike; a "
        "submitted job counts until its result is collected with `GET /jobs/<id>`, it is cancelled, or "
        "`RESULT_TTL` passes); over it, 429 with `Retry-After: 1`. `auto`: `MAX_QUEUE` divided by the number of "
        "keys (rounded down, at least 1; `MAX_QUEUE` itself for one key), so no key can fill the queue for the "
        "others. A whole number ≥ 1 or `auto`; without API keys only `MAX_QUEUE` applies",
        shown="auto",
    )
    max_job_bytes: int = setting(
        1_048_576,
        _int(1024),
        (WEB, WORKER),
        "a worker dead-letters a queued element larger than this (bytes) before parsing it (a castle job is about "
        "132 KB, 200 KB with `JOB_CODEC=raw`)",
    )
    dead_letter_max: int = setting(
        1000,
        _int(1),
        (WEB, WORKER),
        "how many dead letters Redis keeps, newest first; each holds the reason and the job's metadata, not its image",
    )
    max_upload_bytes: int = setting(
        16 * 1024 * 1024, _int(1), (WEB, LAUNCH), "larger request bodies get 413 (from nginx too, under `make run`)"
    )
    max_images_per_request: int = setting(
        16,
        _int(1, 256),
        (WEB,),
        "most `image` fields one `/predict` request may carry (1 to 256; several images are queued together); "
        "more get a 400",
    )
    max_image_pixels: int = setting(
        100_000_000, _int(1), (WEB,), "images with more pixels get 400, from their header (decompression bombs)"
    )
    max_decode_bytes: int = setting(
        150_000_000,
        _int(1),
        (WEB,),
        "images whose decoding would hold more memory get 400, judged from their header "
        "(`imgserve.imaging.prepare.decode_cost`): the pixels at the scale their format decodes at (a JPEG at down to "
        "1/8, a JPEG 2000, where accepted, at a "
        "lower resolution level, the others in full) plus any full-size copy on the way. A 48-megapixel phone JPEG "
        "counts 33 MB, a 4096×4096 RGBA PNG 142 MB, a 6300×6300 RGB PNG 167 MB (refused, though its file can be "
        "130 KB). A progressive JPEG also counts every DCT coefficient, which libjpeg holds at full size: 177 MB "
        "for a 48-megapixel one, so accepting those takes `MAX_DECODE_BYTES=200000000`",
    )
    accepted_formats: tuple[str, ...] = setting(
        DEFAULT_ACCEPTED_FORMATS,
        _formats,
        (WEB,),
        "the image formats an upload may be in (Pillow's names); any other gets a 400 naming these, before its "
        "decoder is reached. Pillow reads many more (EPS through Ghostscript, PSD, FITS, JPEG 2000 ...): add one "
        "only if you need it",
    )
    decode_budget_bytes: int = setting(
        512 * 1024 * 1024,
        _int(1),
        (WEB,),
        "memory one web process may hold decoding uploads at once (512 MiB: three of the largest images "
        "`MAX_DECODE_BYTES` allows); an upload that does not fit waits for others to finish. At least "
        "`MAX_DECODE_BYTES`",
    )
    decode_wait: float = setting(
        1.0,
        _float(0.0),
        (WEB,),
        "seconds an upload waits for room in `DECODE_BUDGET_BYTES` before a 503 with `Retry-After`",
    )
    heartbeat_ttl: float = setting(
        2.0,
        _float(1.0),
        (WORKER,),
        "seconds a worker counts as alive after its last heartbeat; it beats four times per TTL, from a thread of "
        "its own. A crashed worker's jobs are back in the queue at most `HEARTBEAT_TTL` + `REAP_INTERVAL` after "
        "its last beat. Raise it where Redis may be out of reach for seconds (a slow link, failovers: a worker "
        "silent that long is reaped; see [Failure handling](#failure-handling))",
    )
    reap_interval: float = setting(
        0.5, _float(0.0, strict=True), (WORKER,), "seconds between a live worker's checks for dead workers"
    )
    notifications: str = setting(
        "auto",
        _choice("auto", "off"),
        (WEB,),
        "`auto`: the web server learns results from keyspace notifications, with polling fallback; `off`: polling only",
    )
    log_level: str = setting("INFO", _log_level, (WEB, WORKER, LAUNCH), "`DEBUG`, `INFO`, `WARNING` or `ERROR`")
    metrics_host: str = setting(
        "127.0.0.1",
        _host,
        (WORKER,),
        "where a worker serves its Prometheus metrics (not `WEB_HOST`: serving the API to other machines does not "
        "publish the workers' metrics); `0.0.0.0` lets other machines scrape them",
    )
    metrics_port: int = setting(
        9100, _int(0, 65535), (WORKER,), "the port of a worker's Prometheus metrics; `0` turns them off"
    )
    flask_debug: bool = setting(
        False,
        _bool,
        (WEB,),
        "Flask debug mode for `run_web_server.py`; never in production. Refused at start-up unless `WEB_HOST` is a "
        "loopback address (the debugger runs any code its visitors send)",
    )

    @property
    def accepted_api_keys(self) -> tuple[str, ...]:
        """Every key API_KEYS and API_KEYS_FILE accept; empty: the API is open."""
        return self.api_keys + self.api_keys_file

    @property
    def accepted_hosts(self) -> tuple[str, ...]:
        """The Host header values ALLOWED_HOSTS accepts (names, or name:port); empty: any."""
        if self.allowed_hosts is None:
            return LOOPBACK_HOSTS if is_loopback(self.web_host) else ()
        return () if "*" in self.allowed_hosts else self.allowed_hosts

    @property
    def queue_share_per_key(self) -> int | None:
        """MAX_QUEUE_PER_KEY: jobs one API key may have queued or running; auto: MAX_QUEUE shared evenly
        between the keys (MAX_QUEUE itself for one key). None without API keys: MAX_QUEUE alone applies."""
        keys = self.accepted_api_keys
        if not keys:
            return None
        return self.max_queue_per_key or max(1, self.max_queue // len(set(keys)))

    def models(self) -> dict[str, ModelSpec]:
        """The models MODELS_FILE names, first the default one (models.py); SettingsError naming what is wrong."""
        try:
            return load_models(self.models_file, self.model_weights)
        except ModelsError as exc:
            raise SettingsError(f"MODELS_FILE: {exc}") from None

    def default_model_name(self) -> str:
        """DEFAULT_MODEL, or the first model of MODELS_FILE."""
        return self.default_model or next(iter(self.models()))

    @property
    def redis_url_safe(self) -> str:
        """REDIS_URL with any password replaced by ***, for logs."""
        return hide_password(self.redis_url)


# Settings whose empty value is an error rather than the default: set at all, they were meant to hold something.
_EMPTY_IS_AN_ERROR = frozenset({"api_keys", "api_keys_file"})


def names_read_by(role: str) -> frozenset[str]:
    """The fields of Settings that `role` (WEB, WORKER, LAUNCH or ALL) reads."""
    if role not in (WEB, WORKER, LAUNCH, ALL):
        raise ValueError(f"unknown settings role {role!r}")
    return frozenset(f.name for f in fields(Settings) if role == ALL or role in spec(f).roles)


def load(env: Mapping[str, str] | None = None, dotenv: bool = True, role: str = ALL, **overrides: object) -> Settings:
    """Build Settings from `env` (default: os.environ after reading `.env`).

    Only the settings `role` reads are parsed and checked; the others keep their defaults. `overrides` (e.g. from
    command-line flags) are raw strings keyed by field name and win over the environment; None values are ignored.
    """
    if env is None:
        if dotenv:
            load_dotenv(PROJECT_DIR / ".env", override=False)
        env = os.environ
    names = names_read_by(role)
    values: dict[str, object] = {}
    for field in fields(Settings):
        name = field.name.upper()
        raw = overrides.get(field.name)
        raw = env.get(name) if raw is None else str(raw)
        if field.name in names and raw is not None and (raw != "" or field.name in _EMPTY_IS_AN_ERROR):
            values[field.name] = spec(field).parse(name, raw)
    config = Settings(**values)
    for needs, rule in _RULES:
        if needs <= names:
            rule(config)
    return config


def _decode_fits_budget(settings: Settings) -> None:
    if settings.max_decode_bytes > settings.decode_budget_bytes:
        raise SettingsError(
            f"MAX_DECODE_BYTES ({settings.max_decode_bytes:,}) must not exceed DECODE_BUDGET_BYTES "
            f"({settings.decode_budget_bytes:,}): one image must fit in the web process's decode budget"
        )


def _shards_exist(settings: Settings) -> None:
    beyond = [shard for shard in settings.worker_shards or () if shard >= settings.queue_shards]
    if beyond:
        raise SettingsError(
            f"WORKER_SHARDS names shard(s) {', '.join(map(str, beyond))}, but QUEUE_SHARDS={settings.queue_shards} "
            f"numbers them 0 to {settings.queue_shards - 1}"
        )


def _debug_on_loopback_only(settings: Settings) -> None:
    if settings.flask_debug and not is_loopback(settings.web_host):
        raise SettingsError(
            f"FLASK_DEBUG=true is refused with WEB_HOST={settings.web_host}: Flask's debugger runs any code "
            f"its visitors send, so it may only listen on a loopback address (127.0.0.1, ::1, localhost)"
        )


def _models_valid(settings: Settings) -> None:
    """MODELS_FILE can be read and names DEFAULT_MODEL (the checks that need no model loaded)."""
    models = settings.models()
    if settings.default_model is not None and settings.default_model not in models:
        raise SettingsError(
            f"DEFAULT_MODEL={settings.default_model} names no model of {shown_path(settings.models_file)} "
            f"(its models: {', '.join(models)})"
        )


def shown_path(path: Path) -> str:
    """A path as messages show it: relative to the project's folder when inside it."""
    return str(path.relative_to(PROJECT_DIR)) if path.is_relative_to(PROJECT_DIR) else str(path)


def _int8_is_calibrated(settings: Settings) -> None:
    """int8, asked by MODEL_PRECISION or by a table of MODELS_FILE, runs on a converted backend and has images."""
    for spec in settings.models().values():
        precision = spec.precision or settings.model_precision
        if precision != "int8":
            continue
        asked = "MODEL_PRECISION=int8" if spec.precision is None else f'precision = "int8" in [{spec.name}]'
        if (spec.backend or settings.model_backend) == "tensorflow":
            raise SettingsError(f"{asked} needs MODEL_BACKEND=onnxruntime or openvino (TensorFlow runs fp32)")
        if settings.model_calibration_dir is None:
            raise SettingsError(
                f"{asked} needs MODEL_CALIBRATION_DIR: a folder of your own images (a few hundred, like "
                "your uploads) to calibrate the quantization on"
            )


# Rules between settings, each checked where a role reads all the settings it names.
_RULES: tuple[tuple[frozenset[str], Callable[[Settings], None]], ...] = (
    (frozenset({"max_decode_bytes", "decode_budget_bytes"}), _decode_fits_budget),
    (frozenset({"worker_shards", "queue_shards"}), _shards_exist),
    (frozenset({"flask_debug", "web_host"}), _debug_on_loopback_only),
    (frozenset({"models_file", "default_model"}), _models_valid),
    (frozenset({"model_precision", "model_backend", "model_calibration_dir", "models_file"}), _int8_is_calibrated),
)


def is_loopback(host: str) -> bool:
    """True when `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
