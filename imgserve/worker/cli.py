"""The model worker's command line: settings and flags, the model, the metrics endpoint, then the Worker.

    python run_model_server.py [--model NAME] [--batch-size N] [--batch-wait-ms MS] [--weights imagenet|none|PATH] ...
    python -m imgserve.worker ...            # the same

Settings come from the environment / `.env` (see imgserve/settings.py); flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from prometheus_client import start_http_server

from imgserve import logger, settings
from imgserve.models import DEFAULT_NAME, ModelSpec
from imgserve.protocol import WorkerQueue
from imgserve.worker.pipeline import Worker

log = logger.get("worker")


def serve_metrics(config: settings.Settings) -> None:
    """This worker's Prometheus endpoint on METRICS_HOST:METRICS_PORT; none when the port is 0 or taken.

    Its own host setting, not WEB_HOST: serving the web API to other machines must not publish the metrics.
    """
    if not config.metrics_port:
        return
    try:
        start_http_server(config.metrics_port, addr=config.metrics_host)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
    except OSError as exc:
        log.warning("metrics port %d unavailable (%s); this worker serves no metrics", config.metrics_port, exc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the model of MODELS_FILE to serve (default: DEFAULT_MODEL, or its first)")
    parser.add_argument("--redis-url", help="overrides REDIS_URL")
    parser.add_argument("--queue", dest="image_queue", help="overrides IMAGE_QUEUE")
    parser.add_argument("--shards", dest="worker_shards", help="overrides WORKER_SHARDS: shards to serve, e.g. 0,2")
    parser.add_argument("--batch-size", help="overrides BATCH_SIZE")
    parser.add_argument("--batch-wait-ms", help="overrides BATCH_WAIT_MS")
    parser.add_argument("--weights", dest="model_weights", help="overrides MODEL_WEIGHTS: imagenet, none or a path")
    parser.add_argument("--metrics-port", help="overrides METRICS_PORT (0 turns the metrics endpoint off)")
    parser.add_argument("--log-level", help="overrides LOG_LEVEL")
    return parser.parse_args(argv)


def model_spec(config: settings.Settings, name: str | None, explicit_weights: str | None = None) -> ModelSpec:
    """The table of MODELS_FILE this worker serves: `--model`, else the default model. `--weights` (given on the
    command line) replaces a keras: table's weights."""
    models = config.models()
    name = name or config.default_model_name()
    if name not in models:
        raise settings.SettingsError(
            f"--model {name}: {settings.shown_path(config.models_file)} names no such model (its models: "
            f"{', '.join(models)})"
        )
    spec = models[name]
    if explicit_weights is not None and spec.keras_class is not None:
        spec = dataclasses.replace(spec, weights=config.model_weights)
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if name != "model"}
    try:
        config = settings.load(role=settings.WORKER, **flags)
        spec = model_spec(config, args.model, explicit_weights=args.model_weights)
    except settings.SettingsError as exc:
        print(f"run_model_server.py: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.setup("model", config.log_level)
    from imgserve.worker.backends import BackendError
    from imgserve.worker.model import Classifier, WeightsError

    try:
        classifier = Classifier(
            spec,
            config.model_backend,
            config.model_precision,
            config.model_threads,
            config.model_calibration_dir,
            config.model_cache_dir,
        )
    except (WeightsError, BackendError) as exc:  # ModelError too
        log.error("%s", exc)
        return 3
    log.info(
        "model %s on %s (%s, %d labels, input %d; %s %s, %s threads), weights %s, batch size %d, batch wait %g ms, "
        "Redis %s",
        spec.keras_class if spec.name == DEFAULT_NAME else spec.name,  # "ResNet50", as before there were several
        classifier.device,
        classifier.card["source"],
        classifier.card["labels"],
        classifier.card["input_size"],
        classifier.card["backend"],
        classifier.card["precision"],
        config.model_threads or "all",
        classifier.card["weights"],
        config.batch_size,
        config.batch_wait_ms,
        config.redis_url_safe,
    )
    serve_metrics(config)
    queue = WorkerQueue.from_settings(config, spec.name)
    worker = Worker(config, queue, classifier)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
    return 0
