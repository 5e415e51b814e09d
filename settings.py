"""All settings, read from the environment (and `.env`) and validated once at start-up.

Every entry point calls `load()`; a bad value raises `SettingsError` naming the variable,
which the entry points print and turn into exit code 2.
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

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Formats whose decoders are common and well exercised; Pillow reads many more (EPS runs Ghostscript,
# PSD, FITS, JPEG 2000 ...), each a decoder an upload could reach.
DEFAULT_ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    image_queue: str = "image_queue"
    queue_shards: int = 1
    worker_shards: tuple[int, ...] | None = None  # None: "all", every shard of the queue
    batch_size: int = 32
    batch_wait_ms: float = 0.0
    prefetch_batches: int | None = None  # None: "auto", decided by the worker from its model's device
    job_codec: str = "zstd2"
    job_quality: int = 90
    result_ttl: int = 3600
    request_timeout: float = 30.0
    model_weights: str = "imagenet"
    web_host: str = "127.0.0.1"
    web_port: int = 5000
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None  # None: the loopback names when WEB_HOST is loopback, else any
    # Secrets: kept out of repr(), so that no log line or error message that shows the settings shows them.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    api_keys_file: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # the keys read from the file it names
    proxy: str = "auto"
    proxy_header_timeout: float = 10.0
    proxy_body_timeout: float = 15.0
    web_processes: int = 1
    web_threads: int = 64
    web_nice: int = 10
    max_attempts: int = 3
    max_queue: int = 1000
    max_job_bytes: int = 1_048_576
    dead_letter_max: int = 1000
    max_upload_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 16
    max_image_pixels: int = 100_000_000
    max_decode_bytes: int = 150_000_000
    accepted_formats: tuple[str, ...] = DEFAULT_ACCEPTED_FORMATS
    decode_budget_bytes: int = 512 * 1024 * 1024
    decode_wait: float = 1.0
    heartbeat_ttl: float = 2.0
    reap_interval: float = 0.5
    notifications: str = "auto"
    log_level: str = "INFO"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9100
    flask_debug: bool = False

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
    def redis_url_safe(self) -> str:
        """REDIS_URL with any password replaced by ***, for logs."""
        return hide_password(self.redis_url)


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
    if not value or any(c.isspace() for c in value) or any(c in value for c in "*?[]{}"):
        raise SettingsError(f"{name} must be a non-empty name without spaces, braces or glob characters, got {raw!r}")
    return value


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


# Settings whose empty value is an error rather than the default: set at all, they were meant to hold something.
_EMPTY_IS_AN_ERROR = frozenset({"api_keys", "api_keys_file"})

_PARSERS: dict[str, Callable[[str, str], object]] = {
    "redis_url": _redis_url,
    "image_queue": _queue_name,
    "queue_shards": _int(1, 1024),
    "worker_shards": _auto_or(_shard_list, "all"),
    "batch_size": _int(1, 1024),
    "batch_wait_ms": _float(0.0),
    "prefetch_batches": _auto_or(_int(0, 4)),
    "job_codec": _choice("raw", "zstd", "zstd2", "jpeg", "webp"),  # image_codecs.CODECS
    "job_quality": _int(1, 100),
    "result_ttl": _int(1),
    "request_timeout": _float(0.0, strict=True),
    "model_weights": _weights,
    "web_host": _host,
    "web_port": _int(1, 65535),
    "allowed_origins": _origins,
    "allowed_hosts": _hosts,
    "api_keys": _api_keys,
    "api_keys_file": _api_keys_file,
    "proxy": _choice("auto", "nginx", "off"),
    "proxy_header_timeout": _float(0.0, strict=True),
    "proxy_body_timeout": _float(0.0, strict=True),
    "web_processes": _int(1, 64),
    "web_threads": _int(1, 1024),
    "web_nice": _int(0, 19),
    "max_attempts": _int(1),
    "max_queue": _int(1),
    "max_job_bytes": _int(1024),
    "dead_letter_max": _int(1),
    "max_upload_bytes": _int(1),
    "max_images_per_request": _int(1, 256),
    "max_image_pixels": _int(1),
    "max_decode_bytes": _int(1),
    "accepted_formats": _formats,
    "decode_budget_bytes": _int(1),
    "decode_wait": _float(0.0),
    "heartbeat_ttl": _float(1.0),
    "reap_interval": _float(0.0, strict=True),
    "notifications": _choice("auto", "off"),
    "log_level": _log_level,
    "metrics_host": _host,
    "metrics_port": _int(0, 65535),
    "flask_debug": _bool,
}


def load(env: Mapping[str, str] | None = None, dotenv: bool = True, **overrides: object) -> Settings:
    """Build Settings from `env` (default: os.environ after reading `.env`).

    `overrides` (e.g. from command-line flags) are raw strings keyed by field name and
    win over the environment; None values are ignored.
    """
    if env is None:
        if dotenv:
            load_dotenv(PROJECT_DIR / ".env", override=False)
        env = os.environ
    values: dict[str, object] = {}
    for field in fields(Settings):
        name = field.name.upper()
        raw = overrides.get(field.name)
        raw = env.get(name) if raw is None else str(raw)
        if raw is not None and (raw != "" or field.name in _EMPTY_IS_AN_ERROR):
            values[field.name] = _PARSERS[field.name](name, raw)
    return _checked(Settings(**values))


def _checked(settings: Settings) -> Settings:
    """Rules between settings."""
    if settings.max_decode_bytes > settings.decode_budget_bytes:
        raise SettingsError(
            f"MAX_DECODE_BYTES ({settings.max_decode_bytes:,}) must not exceed DECODE_BUDGET_BYTES "
            f"({settings.decode_budget_bytes:,}): one image must fit in the web process's decode budget"
        )
    beyond = [shard for shard in settings.worker_shards or () if shard >= settings.queue_shards]
    if beyond:
        raise SettingsError(
            f"WORKER_SHARDS names shard(s) {', '.join(map(str, beyond))}, but QUEUE_SHARDS={settings.queue_shards} "
            f"numbers them 0 to {settings.queue_shards - 1}"
        )
    if settings.flask_debug and not is_loopback(settings.web_host):
        raise SettingsError(
            f"FLASK_DEBUG=true is refused with WEB_HOST={settings.web_host}: Flask's debugger runs any code "
            f"its visitors send, so it may only listen on a loopback address (127.0.0.1, ::1, localhost)"
        )
    return settings


def is_loopback(host: str) -> bool:
    """True when `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
