"""The models a web process serves: each model's queue and result listener (made on first use, so a model added
to the stack needs no web restart), and its card as its live workers announce it (cached for CARD_TTL seconds).

A model is known when the web's own models file names it or a worker registered it (keys.py {q}:models); its
jobs are prepared at the input size its card gives, or the models file's when the web can tell it without a
worker (ResNet50's 224, or a table's `input_size`): then a job waits in the queue for a worker, as ever (and a
scaler that starts workers from the queue's depth sees it); otherwise a model with no live worker is refused.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from imgserve import settings
from imgserve.imaging import IMAGE_SIZE
from imgserve.models import ModelSpec, read_labels
from imgserve.protocol import QueueInspector, ResultListener, WebQueue

CARD_TTL = 3.0  # seconds a model's card and live workers are reused before the heartbeats are read again
IMAGENET_LABELS = 1000
KNOWN_SIZES = {"ResNet50": IMAGE_SIZE[0]}  # keras.applications classes whose input size is fixed and known here


@dataclass(frozen=True)
class ModelState:
    """What the web knows of one model now: its card (None with no live worker), live workers, input size and
    number of labels (None: unknown until a worker announces them)."""

    name: str
    card: dict | None
    workers: int
    input_size: int | None
    labels: int | None


class ModelRegistry:
    """Queues, listeners, inspectors and cached cards per model, for one web process (thread-safe)."""

    def __init__(self, config: settings.Settings, queue: WebQueue, inspector: QueueInspector, listener) -> None:
        """`queue`, `inspector` and `listener` are the default model's (stand-ins in tests)."""
        self.config = config
        self.file_models: dict[str, ModelSpec] = config.models()
        self.default = config.default_model_name()
        self._queues = {self.default: queue}
        self._inspectors = {self.default: inspector}
        self._listeners = {self.default: listener}
        self._states: dict[str, tuple[float, ModelState]] = {}
        self._lock = threading.Lock()

    def known(self) -> list[str]:
        """Every known model: the models file's in its order, then those only workers registered."""
        registered = getattr(self._inspectors[self.default], "registered_models", lambda: set())()
        return [*self.file_models, *sorted(set(registered) - set(self.file_models))]

    def queue(self, model: str) -> WebQueue:
        self._ensure(model)
        return self._queues[model]

    def listener(self, model: str) -> ResultListener:
        self._ensure(model)
        return self._listeners[model]

    def inspector(self, model: str) -> QueueInspector:
        self._ensure(model)
        return self._inspectors[model]

    def _ensure(self, model: str) -> None:
        """Make `model`'s queue, inspector and (started) listener on first use."""
        if model in self._queues:
            return
        with self._lock:
            if model in self._queues:
                return
            base = self._queues[self.default]
            queue = WebQueue.sharing(base, model=model)
            listener = ResultListener(queue, self._listeners[self.default].origin, self.config.notifications != "off")
            listener.start()
            self._inspectors[model] = QueueInspector.sharing(base, model=model)
            self._listeners[model] = listener
            self._queues[model] = queue

    def state(self, model: str, fresh: bool = False) -> ModelState:
        """`model`'s card, live workers, input size and labels, read at most CARD_TTL seconds ago unless `fresh`."""
        cached = self._states.get(model)
        if cached and not fresh and time.monotonic() - cached[0] < CARD_TTL:
            return cached[1]
        alive = self.inspector(model).live_worker_models()
        card = next((card for card in alive.values() if "input_size" in card), None)
        if card is None and alive and model == self.default:
            card = next(iter(alive.values()))  # a worker of before model cards (or a stand-in)
        spec = self.file_models.get(model)
        size, labels = _static_shape(spec) if spec else (None, None)
        state = ModelState(
            model,
            card,
            len(alive),
            _int(card, "input_size") or size,
            _int(card, "labels") or labels,
        )
        self._states[model] = (time.monotonic(), state)
        return state

    def forget_unserved(self, model: str) -> None:
        """Drop a model from the registry: its workers are gone and the models file does not name it."""
        self._inspectors[self.default].forget_model(model)


def _int(card: dict | None, key: str) -> int | None:
    value = (card or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _static_shape(spec: ModelSpec) -> tuple[int | None, int | None]:
    """The input size and number of labels the web can tell from a table alone, without its worker."""
    size = spec.input_size or KNOWN_SIZES.get(spec.keras_class or "")
    if spec.labels == "imagenet":
        return size, IMAGENET_LABELS
    try:
        return size, len(read_labels(spec) or [])
    except OSError:
        return size, None
