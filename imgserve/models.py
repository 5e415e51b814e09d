"""The models file (MODELS_FILE, default `models.toml`): which classifiers this stack serves, one TOML table each.

    [resnet50]
    source = "keras:ResNet50"   # a keras.applications class, or a path to a .keras file or a SavedModel folder
    weights = "imagenet"        # imagenet | none | a weights file (keras: sources only; MODEL_WEIGHTS if left out)
    labels = "imagenet"         # imagenet | a text file, one label per line
    preprocess = "caffe"        # caffe | tf | torch | none (none: the model does its own)
    input_size = 224            # only for a model whose input size is free; otherwise read from the model
    backend = "openvino"        # tensorflow | onnxruntime | openvino (optional; MODEL_BACKEND if left out)
    precision = "int8"          # fp32 | int8 (optional; MODEL_PRECISION if left out; int8: not with tensorflow)

No file: the one model `resnet50` (ImageNet ResNet50 with MODEL_WEIGHTS), as the stack always served. The first
table is the default model. Paths are relative to the file's folder. What can be checked without loading a model
is checked here, at every process's start-up (ModelsError names the table and the key); the worker checks the rest
when it loads its model (worker/model.py: an unknown keras.applications class, the labels' count).
Read by every role, so it imports nothing heavier than tomllib.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_NAME = "resnet50"  # the model of a stack without a models file; its queue is IMAGE_QUEUE itself
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PREPROCESSING = ("caffe", "tf", "torch", "none")
KERAS_PREFIX = "keras:"
BACKENDS = ("tensorflow", "onnxruntime", "openvino")  # worker/backends runs them; its table keys and settings
PRECISIONS = ("fp32", "int8")
KEYS = frozenset({"source", "weights", "labels", "preprocess", "input_size", "backend", "precision"})


class ModelsError(ValueError):
    """The models file cannot be used; the message names the file, the table and what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """One table of the models file, checked; paths made absolute."""

    name: str
    source: str = "keras:ResNet50"
    weights: str = "imagenet"
    labels: str = "imagenet"
    preprocess: str = "caffe"
    input_size: int | None = None
    backend: str | None = None  # None: MODEL_BACKEND
    precision: str | None = None  # None: MODEL_PRECISION
    folder: Path = field(default=Path("."), compare=False)

    @property
    def keras_class(self) -> str | None:
        """The keras.applications class a `keras:` source names; None for a file or folder."""
        return self.source[len(KERAS_PREFIX) :] if self.source.startswith(KERAS_PREFIX) else None


def default_models(weights: str) -> dict[str, ModelSpec]:
    """What a stack without a models file serves: ResNet50 as MODEL_WEIGHTS says."""
    return {DEFAULT_NAME: ModelSpec(DEFAULT_NAME, weights=weights)}


def load_models(path: Path, weights: str = "imagenet") -> dict[str, ModelSpec]:
    """The models of the file at `path` in its order (the first is the default), or default_models when there
    is no such file. `weights` (MODEL_WEIGHTS) is the weights of a keras: table that names none."""
    if not path.is_file():
        return default_models(weights)
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelsError(f"{path}: cannot read it as TOML: {exc}") from None
    if not tables:
        raise ModelsError(f"{path}: names no model; add a table such as [resnet50] (see models.example.toml)")
    return {name: _spec(path, name, table, weights) for name, table in tables.items()}


def _spec(path: Path, name: str, table: object, weights: str) -> ModelSpec:
    where = f"{path}: [{name}]"
    if not NAME.fullmatch(name):
        raise ModelsError(f"{where}: a model name is 1 to 64 letters, digits, '-' or '_'")
    if not isinstance(table, dict):
        raise ModelsError(f"{where}: must be a table of {', '.join(sorted(KEYS))}")
    if unknown := sorted(set(table) - KEYS):
        raise ModelsError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    text = {key: value for key, value in table.items() if key != "input_size"}
    if bad := [key for key, value in text.items() if not isinstance(value, str) or not value.strip()]:
        raise ModelsError(f"{where}: {bad[0]} must be a non-empty string")
    folder = path.resolve().parent
    source = _source(where, folder, table.get("source", "keras:ResNet50"))
    keras = source.startswith(KERAS_PREFIX)
    if "weights" in table and not keras:
        raise ModelsError(f"{where}: weights is for keras: sources only; a .keras file or SavedModel holds its own")
    spec = ModelSpec(
        name=name,
        source=source,
        weights=_file_or(where, folder, "weights", table.get("weights", weights), ("imagenet", "none")),
        labels=_file_or(where, folder, "labels", table.get("labels", "imagenet"), ("imagenet",)),
        preprocess=_preprocess(where, table.get("preprocess", "caffe" if keras else "none")),
        input_size=_input_size(where, table.get("input_size")),
        backend=_one_of(where, "backend", table.get("backend"), BACKENDS),
        precision=_one_of(where, "precision", table.get("precision"), PRECISIONS),
        folder=folder,
    )
    if spec.precision == "int8" and spec.backend == "tensorflow":
        raise ModelsError(f"{where}: precision int8 needs backend onnxruntime or openvino (TensorFlow runs fp32)")
    return spec


def _source(where: str, folder: Path, source: str) -> str:
    if source.startswith(KERAS_PREFIX):
        if not source[len(KERAS_PREFIX) :].isidentifier():
            raise ModelsError(f"{where}: source {source!r}: after 'keras:' comes a keras.applications class name")
        return source
    resolved = folder / source
    if resolved.is_file() and resolved.suffix == ".keras":
        return str(resolved)
    if resolved.is_dir() and (resolved / "saved_model.pb").is_file():
        return str(resolved)
    raise ModelsError(
        f"{where}: unknown source {source!r}: give 'keras:<a keras.applications class>' (e.g. keras:ResNet50), "
        f"a .keras file or a SavedModel folder (holding saved_model.pb); nothing of these is at {resolved}"
    )


def _file_or(where: str, folder: Path, key: str, value: str, words: tuple[str, ...]) -> str:
    """One of `words`, or the absolute path of an existing file."""
    if value in words:
        return value
    resolved = folder / value
    if not resolved.is_file():
        raise ModelsError(f"{where}: {key} {value!r} is neither {' nor '.join(words)} nor a file (no file {resolved})")
    return str(resolved)


def _preprocess(where: str, value: str) -> str:
    if value not in PREPROCESSING:
        raise ModelsError(f"{where}: preprocess {value!r} is not one of {', '.join(PREPROCESSING)}")
    return value


def _one_of(where: str, key: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise ModelsError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def _input_size(where: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 2048:
        raise ModelsError(f"{where}: input_size must be a whole number of pixels from 8 to 2048, got {value!r}")
    return value


def read_labels(spec: ModelSpec) -> list[str] | None:
    """The labels a labels file lists, one a line (blank lines at the end ignored); None for `imagenet`."""
    if spec.labels == "imagenet":
        return None
    lines = Path(spec.labels).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
