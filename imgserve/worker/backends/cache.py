"""Converted models on disk: one folder per Key, written atomically, checked before use, rebuilt when broken.

An entry is a folder `<cache_dir>/<key>/` holding the backend's files and `manifest.json` (each file's SHA-256,
the versions that wrote it and what the builder reported, e.g. int8 agreement). It is written in a temporary
folder beside it and renamed into place, so a crash mid-write leaves no entry. On load the checksums are
verified and the backend loads the files; if either fails the entry is removed and rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from imgserve import logger

log = logger.get(__name__)

MANIFEST = "manifest.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Key:
    """What a converted file depends on: the model, its weights, the backend, the precision, the input size and
    (int8) the calibration images."""

    model: str
    fingerprint: str  # model.weights_identity(): "none", "imagenet" or "file:<sha256 prefix>"
    backend: str
    precision: str
    input_size: tuple[int, int]
    calibration: str = ""  # int8: a digest of the calibration images

    def folder(self) -> str:
        parts = [self.model, self.fingerprint, self.backend, self.precision, "x".join(map(str, self.input_size))]
        if self.calibration:
            parts.append(f"cal-{self.calibration}")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", "-".join(parts))


def default_dir(weights: str | None = None) -> Path:
    """Next to a weights file (`<its folder>/imgserve-cache`) when that folder is writable, else
    `$XDG_CACHE_HOME/imgserve` (`~/.cache/imgserve`)."""
    if weights and weights not in ("imagenet", "none"):
        beside = Path(weights).expanduser().resolve().parent
        if os.access(beside, os.W_OK):
            return beside / "imgserve-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgserve"


def digest(path: Path) -> str:
    """SHA-256 of a file, in hex."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def load_or_build(
    cache_dir: Path, key: Key, build: Callable[[Path], dict], load: Callable[[Path], T]
) -> tuple[T, Path, str, dict]:
    """(loaded, entry folder, "cache" or "converted", manifest info): the cached entry if it verifies and loads,
    else `build(folder)` writes the files (returning info for the manifest) and they are loaded."""
    entry = cache_dir / key.folder()
    if entry.exists():
        try:
            info = verify(entry)
            return load(entry), entry, "cache", info
        except Exception as exc:  # any failure to read a cached file means: rebuild it
            log.warning("cached model %s is unusable (%s); rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    info = store(entry, build)
    return load(entry), entry, "converted", info


def verify(entry: Path) -> dict:
    """The manifest's info, once every file it lists has its recorded SHA-256; raises ValueError otherwise."""
    manifest = json.loads((entry / MANIFEST).read_text())
    for name, expected in manifest["files"].items():
        if digest(entry / name) != expected:
            raise ValueError(f"{name} does not match its checksum")
    return manifest.get("info", {})


def store(entry: Path, build: Callable[[Path], dict]) -> dict:
    """Build into a temporary folder beside `entry`, write its manifest, rename it into place; return the info."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        info = build(staging) or {}
        files = {p.name: digest(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"files": files, "info": info}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)  # a broken entry, or one another worker just wrote
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / MANIFEST).exists():  # not another worker's finished entry: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted model cached in %s", entry)
    return info
