"""Client deadlines: a request may lower the server's limit on how long it waits, never raise it.

Two headers say how long the client will wait, as gRPC and Connect carry them:

    Request-Timeout-Ms: 2500     a positive whole number of milliseconds (at most 10 digits)
    grpc-timeout: 2500m          gRPC's form: 1 to 8 digits and a unit, H M S m u n (hours ... nanoseconds)

With both, the smaller wins. The effective limit is the smaller of the client's and the server's own
(REQUEST_TIMEOUT for /predict, RESULT_TTL for /jobs); an unreadable value is a 400 naming its header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from imgserve.web.errors import Refused

TIMEOUT_MS_HEADER = "Request-Timeout-Ms"
GRPC_TIMEOUT_HEADER = "grpc-timeout"
_MS = re.compile(r"[0-9]{1,10}")
_GRPC = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


@dataclass(frozen=True)
class Timeout:
    """How long a request may take, and which limit says so (a setting's name, or the client's header)."""

    seconds: float
    source: str

    @property
    def from_client(self) -> bool:
        return self.source in (TIMEOUT_MS_HEADER, GRPC_TIMEOUT_HEADER)

    def describe(self) -> str:
        """The limit, for a 504: "2.5 s (the client's Request-Timeout-Ms)" or "30 s (REQUEST_TIMEOUT)"."""
        whose = f"the client's {self.source}" if self.from_client else self.source
        return f"{self.seconds:g} s ({whose})"


def client_timeout(headers: Mapping[str, str]) -> Timeout | None:
    """The client's own timeout from its headers (the smaller of the two when both are sent); None when it
    sends neither; Refused 400 naming the header whose value cannot be read."""
    found = []
    raw = headers.get(TIMEOUT_MS_HEADER)
    if raw is not None:
        found.append(Timeout(_milliseconds(raw.strip()) / 1000, TIMEOUT_MS_HEADER))
    raw = headers.get(GRPC_TIMEOUT_HEADER)
    if raw is not None:
        found.append(Timeout(_grpc_seconds(raw.strip()), GRPC_TIMEOUT_HEADER))
    return min(found, key=lambda timeout: timeout.seconds, default=None)


def effective_timeout(headers: Mapping[str, str], seconds: float, setting: str) -> Timeout:
    """The server's limit (`seconds`, the setting `setting`), lowered by the client's if it sent a smaller one."""
    server = Timeout(seconds, setting)
    client = client_timeout(headers)
    return client if client is not None and client.seconds < server.seconds else server


def _milliseconds(raw: str) -> int:
    if not (_MS.fullmatch(raw) and int(raw) > 0):
        raise Refused(400, f"{TIMEOUT_MS_HEADER} must be a positive whole number of milliseconds, got {raw[:40]!r}")
    return int(raw)


def _grpc_seconds(raw: str) -> float:
    match = _GRPC.fullmatch(raw)
    if not (match and int(match[1]) > 0):
        raise Refused(
            400, f"{GRPC_TIMEOUT_HEADER} must be 1 to 8 digits (not all zero) and a unit, one of H M S m u n; "
            f"got {raw[:40]!r}"
        )  # fmt: skip
    return int(match[1]) * _GRPC_UNITS[match[2]]
