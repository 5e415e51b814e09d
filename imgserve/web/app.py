"""The web API: accepts images, queues them for the model workers, answers with the top-k labels.

This module builds the app (create_app: the views of views.py, errors, metrics, security) and its Service.

    python run_web_server.py                         # development server (threaded)
    gunicorn 'run_web_server:create_app()' ...       # production, see `make run`

Settings come from the environment / `.env` (see settings.py).
"""

from __future__ import annotations

import sys
import uuid

from flask import Flask

from imgserve import logger, settings
from imgserve.imaging.prepare import DecodeBudget
from imgserve.protocol import QueueInspector, ResultListener, WebQueue
from imgserve.protocol.cache import ResultCache
from imgserve.web import errors, metrics, security, views
from imgserve.web.coalescing import InFlight
from imgserve.web.registry import ModelRegistry
from imgserve.web.uploads import UploadRequest

log = logger.get("web")


class Service:
    """What the views need: settings, the default model's queue (its web side, and read-only views for /readyz
    and /metrics), this process's result listener, and every model's (registry.py); the result cache with its
    flights (None when RESULT_CACHE_TTL=0)."""

    def __init__(
        self, config: settings.Settings, queue: WebQueue | None = None, inspector: QueueInspector | None = None
    ) -> None:
        self.config = config
        self.origin = uuid.uuid4().hex[:12]
        # The default model's queue (any model's serves GET and DELETE /jobs/<id>: tickets name their model).
        self.queue = queue or WebQueue.from_settings(config, config.default_model_name())
        self.inspector = inspector or QueueInspector.sharing(self.queue)
        self.decode_budget = DecodeBudget(config.decode_budget_bytes, config.decode_wait)
        self.listener = ResultListener(self.queue, self.origin, config.notifications != "off")
        self.result_cache = None
        if config.result_cache_ttl:
            self.result_cache = ResultCache(self.queue.redis, self.queue.base, config.result_cache_ttl)
        self.in_flight = InFlight()
        self.models = ModelRegistry(config, self.queue, self.inspector, self.listener)


def create_app(
    config: settings.Settings | None = None, queue: WebQueue | None = None, inspector: QueueInspector | None = None
) -> Flask:
    """Application factory: one Service (and one listener thread) per process.

    Tests may pass a stand-in `queue` (and `inspector`): then nothing connects to Redis and no listener
    thread starts (a waiting request polls the stand-in).
    """
    config = config or settings.load(role=settings.WEB)
    logger.setup("web", config.log_level)
    app = Flask(__name__)
    app.request_class = UploadRequest
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    service = Service(config, queue, inspector)
    app.extensions["imgserve"] = service
    if queue is None:
        service.listener.start()
    errors.init_app(app)
    app.register_blueprint(views.bp)
    metrics.init_app(app, service.inspector)
    security.init_hosts(app, config.accepted_hosts)  # first of the refusals: a rebound name learns nothing
    security.init_app(app, config.allowed_origins, config.accepted_api_keys)  # after metrics: refusals counted
    log.info(
        "web process %s ready; Redis %s (%s), queue %r",
        service.origin,
        config.redis_url_safe,
        redis_kind(service.queue),
        config.image_queue,
    )
    return app


def redis_kind(queue: WebQueue) -> str:
    """What the queue runs on, for the log: "Redis Cluster, 3 shards" or "plain Redis, 1 shard"."""
    count = len(getattr(queue, "shards", [None]))
    kind = "Redis Cluster" if getattr(queue, "cluster", False) else "plain Redis"
    return f"{kind}, {count} shard{'s' if count != 1 else ''}"


def main() -> int:
    try:
        config = settings.load(role=settings.WEB)
    except settings.SettingsError as exc:
        print(f"run_web_server.py: configuration error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    app.extensions["imgserve"].listener.wait_ready(3)
    log.info("serving on http://%s:%d (development server; `make run` uses gunicorn)", config.web_host, config.web_port)
    app.run(host=config.web_host, port=config.web_port, debug=config.flask_debug, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
