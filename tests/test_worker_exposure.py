"""What a model worker shows: its log lines with strings read from Redis, and where its metrics listen.
In-process: the Worker runs on a thread against a real Redis, with a stand-in model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from imgserve import logger, settings
from imgserve.protocol import Job, connect
from imgserve.worker import cli
from tests.test_faults import RunningWorker, worker_config
from tools.processes import wait_until
from tools.queues import Queues

pytestmark = pytest.mark.unit

FORGED = "\n[2026-01-01 00:00:00.000] [model] [run_model_server.py] forged"


class StandInModel:
    device = "CPU"


def worker_log_of(redis_url: str, queue_name: str, raws: list[bytes]) -> str:
    """What the worker logs while it takes `raws` (every one a job it dead-letters) off the queue."""
    out = io.StringIO()
    logger.setup("model", "DEBUG", stream=out)
    queue = Queues.on(connect(redis_url), queue_name)
    queue.redis.lpush(queue.keys.queue, *raws)
    with RunningWorker(worker_config(redis_url, queue_name), StandInModel()):
        wait_until(lambda: len(queue.inspect.dead_letters()) == len(raws), 30, "every job dead-lettered")
    return out.getvalue()


def test_strings_read_from_redis_are_logged_escaped_on_one_line(redis_server, queue_name):
    expired = Job.new(np.zeros((224, 224, 3), np.uint8), "0123456789ab", -10.0)
    expired.id = "job" + FORGED  # not an id the web mints: refused at parse, and never echoed
    bad = json.loads(Job.new(np.zeros((224, 224, 3), np.uint8), "0123456789ab", 30.0).to_json())
    bad["codec"] = FORGED  # an unknown codec is named in the reason, escaped
    text = worker_log_of(redis_server.url, queue_name, [expired.to_json(), json.dumps(bad).encode()])
    for line in text.splitlines():
        assert not line.startswith("[2026-01-01"), text
    assert "dead-lettered a job: job has a malformed 'id'" in text and "dropped expired job" not in text
    assert "dead-lettered a job: unknown image codec '\\\\n[2026-01-01" in text, text


@pytest.mark.parametrize(
    "env, bound",
    [({"WEB_HOST": "0.0.0.0"}, "127.0.0.1"), ({"WEB_HOST": "0.0.0.0", "METRICS_HOST": "10.0.0.5"}, "10.0.0.5")],
)
def test_worker_metrics_listen_on_metrics_host_not_web_host(monkeypatch, env, bound):
    calls = []
    monkeypatch.setattr(cli, "start_http_server", lambda port, addr: calls.append((port, addr)))
    cli.serve_metrics(settings.load(env={"METRICS_PORT": "9123", **env}, dotenv=False))
    assert calls == [(9123, bound)]


def test_metrics_port_0_serves_no_metrics(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "start_http_server", lambda port, addr: calls.append((port, addr)))
    cli.serve_metrics(settings.load(env={"METRICS_PORT": "0"}, dotenv=False))
    assert calls == []
