"""A job as it travels on the queue (JSON, never pickle), parsed as untrusted input.

Anything can be pushed onto a Redis list, so a worker reads every queued element as input from a
stranger: its size is checked before it is parsed, every field's type and range after. Whatever fails
becomes a JobError, whose message is the dead-letter reason.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np

from imgserve.imaging import IMAGE_DTYPE, IMAGE_SHAPE
from imgserve.imaging.codecs import CODECS, DEFAULT_QUALITY, PayloadError, decode_image, encode_image

from .keys import OPEN_OWNER, SUBMITTED
from .priority import DEFAULT_PRIORITY, PRIORITIES

DEFAULT_MAX_JOB_BYTES = 1_048_576  # a 224x224x3 job is about 200 KB raw, less with the other codecs

# Only what the web mints: an id and an origin become part of a Redis key, so a foreign one (a lone
# surrogate that cannot be encoded, a ':' or '*' that forges another key or pattern, a megabyte of text)
# must never get that far. scripts.py applies the same rules in Lua (VALID_ID, VALID_ORIGIN there).
ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
ORIGIN_PATTERN = re.compile(rf"[0-9a-f]{{12}}|{SUBMITTED}")  # a web process's uuid4().hex[:12], or SUBMITTED
DTYPE_PATTERN = re.compile(r"[a-z]{1,8}[0-9]{0,3}")  # a numpy dtype name: uint8, float32, bool
# A submitted job's owner goes into its ticket: security.owner_id's 16 hex digits, or OPEN_OWNER without keys.
OWNER_PATTERN = re.compile(rf"[0-9a-f]{{16}}|{OPEN_OWNER}")
PRIORITY_PATTERN = re.compile("|".join(PRIORITIES))  # its level names the queue list it returns to (scripts.py)
RULES = {
    "id": (ID_PATTERN, "32 lowercase hex digits"),
    "origin": (ORIGIN_PATTERN, f"12 lowercase hex digits or {SUBMITTED!r}"),
    "dtype": (DTYPE_PATTERN, "a numpy dtype name"),
    "owner": (OWNER_PATTERN, f"16 lowercase hex digits or {OPEN_OWNER!r}"),
    "priority": (PRIORITY_PATTERN, " or ".join(PRIORITIES)),
}
DEFAULT_TOP_K, MAX_TOP_K = 5, 20  # classes in an answer: what clients get unless they ask (?top_k=), and the most


class JobError(ValueError):
    """A queued job that cannot be processed; the message is the dead-letter reason."""


@dataclass
class Job:
    """One image to classify, with where to send its result and until when it is wanted."""

    id: str
    origin: str
    image: str
    shape: list[int]
    dtype: str
    enqueued_at: float
    deadline: float
    attempts: int = 0
    codec: str = "raw"  # how `image` packs the pixels: image_codecs.encode_image
    top_k: int = DEFAULT_TOP_K  # how many classes the answer lists
    owner: str = ""  # a submitted job's owner (keys.py, the ticket), so the worker keeps it in the ticket
    priority: str = DEFAULT_PRIORITY  # its level (priority.py): the queue list it waits in and returns to
    # True when `image` is base64 text made by Job.new: it needs no JSON escaping, so to_json can
    # splice it in instead of having json.dumps scan 200 KB of it.
    _image_is_base64: bool = field(default=False, init=False, repr=False, compare=False)
    # The shard WebQueue.enqueue put it in (its result is written there too); not on the wire.
    shard: int = field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def new(
        cls,
        pixels: np.ndarray,
        origin: str,
        timeout: float,
        codec: str = "raw",
        quality: int = DEFAULT_QUALITY,
        top_k: int = DEFAULT_TOP_K,
        priority: str = DEFAULT_PRIORITY,
    ) -> Job:
        """A job for `pixels`, packed with `codec` (JOB_CODEC; `quality` for a lossy one, JOB_QUALITY), due
        `timeout` seconds from now, answered with the `top_k` most probable classes, queued at `priority`."""
        image, codec = encode_image(pixels, codec, quality)
        now = time.time()
        job = cls(
            id=uuid.uuid4().hex,
            origin=origin,
            image=image,
            shape=list(pixels.shape),
            dtype=str(pixels.dtype),
            enqueued_at=now,
            deadline=now + timeout,
            codec=codec,
            top_k=top_k,
            priority=priority,
        )
        job._image_is_base64 = True
        return job

    def to_json(self) -> bytes:
        """The job as queued: compact JSON, UTF-8, with `id` first and `image` last."""
        wire = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if not self.owner:  # only submitted jobs have one
            del wire["owner"]
        if self.priority == DEFAULT_PRIORITY:  # a default job's wire stays as before levels existed
            del wire["priority"]
        if not self._image_is_base64:
            return json.dumps(wire, separators=(",", ":")).encode()
        del wire["image"]
        head = json.dumps(wire, separators=(",", ":"))
        return b"".join((head[:-1].encode(), b',"image":"', self.image.encode("ascii"), b'"}'))

    @classmethod
    def from_json(cls, raw: bytes | str, max_bytes: int = DEFAULT_MAX_JOB_BYTES) -> Job:
        """Parse a queued job; raises JobError naming what is wrong."""
        data = parse_object(raw, max_bytes)
        missing = [name for name in ("id", "origin", "image", "shape", "dtype", "deadline") if name not in data]
        if missing:
            raise JobError(f"job lacks field(s): {', '.join(missing)}")
        return cls(
            id=_name(data, "id"),
            origin=_name(data, "origin"),
            image=_typed(data, "image", str),
            shape=_shape(data["shape"]),
            dtype=_name(data, "dtype"),
            enqueued_at=_finite(data.get("enqueued_at", 0.0), "enqueued_at"),
            deadline=_finite(data["deadline"], "deadline"),
            attempts=_count(data.get("attempts", 0), "attempts"),
            codec=_codec(data.get("codec", "raw")),
            top_k=_top_k(data.get("top_k", DEFAULT_TOP_K)),
            owner=_name(data, "owner") if "owner" in data else "",
            priority=_name(data, "priority") if "priority" in data else DEFAULT_PRIORITY,
        )

    def pixels(self, shape: tuple[int, ...] = IMAGE_SHAPE) -> np.ndarray:
        """The decoded uint8 image of `shape` (the model's input: (224, 224, 3) for ResNet50); raises JobError
        if it is anything else."""
        if self.dtype != IMAGE_DTYPE or tuple(self.shape) != tuple(shape):
            raise JobError(f"image must be {IMAGE_DTYPE} {tuple(shape)}, got {self.dtype} {tuple(self.shape)}")
        try:
            return decode_image(self.image, self.codec, self.dtype, self.shape)
        except PayloadError as exc:
            raise JobError(str(exc)) from None


def parse_object(raw: bytes | str, max_bytes: int) -> dict:
    """A queued element parsed as a JSON object, its size checked first; JobError otherwise."""
    if len(raw) > max_bytes:
        raise JobError(f"job is {len(raw):,} bytes; the limit is {max_bytes:,} (MAX_JOB_BYTES)")
    try:
        data = _parse_with_image_last(raw)
        if data is None:
            data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        raise JobError(f"job is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobError("job is not a JSON object")
    return data


_IMAGE_LAST = b',"image":"'


def _parse_with_image_last(raw: bytes | str) -> dict | None:
    """Parse a job as Job.to_json writes it, image last, without scanning the image with the JSON parser.

    The image is base64, so between its quotes there is no quote and no backslash: then the text after
    `,"image":"` up to the closing `"}` is the whole string, and the rest is a small JSON object (in
    which a second "image" key would lose to this last one, as in json.loads). None when the job is
    not in that form, for json.loads to read it.
    """
    if not isinstance(raw, bytes) or not raw.endswith(b'"}'):
        return None
    cut = raw.rfind(_IMAGE_LAST)
    image = raw[cut + len(_IMAGE_LAST) : -2]
    if cut < 0 or b'"' in image or b"\\" in image or not image.isascii():
        return None
    try:
        head = json.loads(raw[:cut] + b"}", parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(head, dict):
        return None
    head["image"] = image.decode("ascii")
    return head


_WRONG = "job has a field of the wrong type:"


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _typed(data: dict, name: str, kind: type) -> object:
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JobError(f"{_WRONG} {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _name(data: dict, name: str) -> str:
    """An id, origin, dtype, owner or priority: a string matching its rule (RULES); the value is not echoed."""
    value = _typed(data, name, str)
    pattern, rule = RULES[name]
    if not pattern.fullmatch(value):
        raise JobError(f"job has a malformed {name!r}: it must be {rule}")
    return value


def _codec(value: object) -> str:
    if value not in CODECS:
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise JobError(f"unknown image codec {shown}; known: {', '.join(CODECS)}")
    return value


def valid_name(name: str, value: object) -> bool:
    """Whether `value` is a well-formed job field `name` (a key of RULES)."""
    return isinstance(value, str) and RULES[name][0].fullmatch(value) is not None


def _shape(value: object) -> list[int]:
    if not isinstance(value, list) or len(value) > 8 or not all(_is_int(n) and n >= 0 for n in value):
        raise JobError(f"{_WRONG} 'shape' must be a list of at most 8 whole numbers >= 0")
    return value


def _finite(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise JobError(f"{_WRONG} {name!r} must be a finite number")
    return float(value)


def _count(value: object, name: str) -> int:
    # cjson (the Lua scripts) writes whole numbers as 2, but may write 2.0 after arithmetic.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise JobError(f"{_WRONG} {name!r} must be a whole number >= 0")
    return value


def _top_k(value: object) -> int:
    if isinstance(value, float) and value.is_integer():  # as a Lua script may re-encode it
        value = int(value)
    if not _is_int(value) or not 1 <= value <= MAX_TOP_K:
        raise JobError(f"{_WRONG} 'top_k' must be a whole number from 1 to {MAX_TOP_K}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def job_metadata(raw: bytes | str, max_bytes: int = DEFAULT_MAX_JOB_BYTES) -> dict:
    """What a dead letter keeps of a job: its identity and timing, never its image.

    Only well-formed fields are kept, so a forged job cannot smuggle odd values into the dead letters,
    nor an id or origin that cannot be part of a result key into reply_to: the dead letter is still written.
    """
    meta: dict = {"bytes": len(raw)}
    try:
        data = parse_object(raw, max_bytes)
    except JobError:
        return meta
    for name in ("id", "origin"):
        if valid_name(name, data.get(name)):
            meta[name] = data[name]
    if data.get("codec") in CODECS:
        meta["codec"] = data["codec"]
    if valid_name("priority", data.get("priority")):
        meta["priority"] = data["priority"]
    for name in ("enqueued_at", "deadline", "attempts"):
        value = data.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            meta[name] = value
    return meta


def error_result(message: str, status: int = 500) -> dict:
    """The result a client receives when its job failed."""
    return {"success": False, "error": message, "status": status}


@dataclass
class DeadLetter:
    """A job the worker gives up on, with the reason."""

    raw: bytes | str
    reason: str
    max_bytes: int = DEFAULT_MAX_JOB_BYTES
    status: int = 400  # what its client is told: 400, the job was bad; 500, the worker could not answer it

    @cached_property
    def metadata(self) -> dict:
        """What the dead letter keeps of the job (job_metadata); parsed once, read several times."""
        return job_metadata(self.raw, self.max_bytes)

    @property
    def reply_to(self) -> tuple[str, str] | None:
        """(origin, id) when the job names them readably, so that its client can be told at once."""
        meta = self.metadata
        return (meta["origin"], meta["id"]) if "origin" in meta and "id" in meta else None

    def answer(self) -> dict:
        """The error result its client receives (at reply_to)."""
        prefix = "bad job" if self.status < 500 else "job failed"
        return error_result(f"{prefix}: {self.reason}", self.status)


def unanswerable(job: Job, error: Exception, max_bytes: int = DEFAULT_MAX_JOB_BYTES) -> DeadLetter:
    """The dead letter of a job whose result could not be written (`error`), e.g. one JSON cannot carry."""
    try:
        raw: bytes | str = job.to_json()
    except Exception:  # noqa: BLE001 - a job that cannot even be written: keep its size only
        raw = b"{}"
    reason = f"its result cannot be written ({type(error).__name__}: {str(error)[:200]})"
    return DeadLetter(raw, reason, max_bytes, status=500)
