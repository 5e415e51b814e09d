"""What a new user meets on a fresh clone (issue 27): the sample image, `python -m local_redis`, the worker's
start-up output, the web log's ready line, the page's icon, the random-weights warning."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import requests

from imgserve import settings
from imgserve.launch import serve
from imgserve.launch.local_redis import free_port
from imgserve.web.app import create_app, redis_kind
from imgserve.worker import model
from tools.processes import PROJECT, Child, Stack, live_stack, server_env, wait_until

SAMPLE = PROJECT / "examples" / "sample.jpg"


@pytest.fixture(scope="module")
def stack(redis_server):
    env = server_env(redis_server.url, f"first-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5)
    with live_stack(env) as (worker, web):
        yield worker, web


@pytest.mark.system
def test_the_readmes_sample_image_exists_and_is_classified(stack):
    assert "examples/sample.jpg" in (PROJECT / "README.md").read_text()
    assert SAMPLE.stat().st_size < 30_000
    _, web = stack
    with SAMPLE.open("rb") as image:
        response = requests.post(web.url + "/predict", files={"image": image}, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


@pytest.mark.system
def test_a_worker_on_this_cpu_only_machine_prints_no_cuinit_error(stack):
    worker, _ = stack
    assert "model ResNet50 on CPU" in worker.log  # the worker got past TensorFlow's start-up
    assert "cuInit" not in worker.log


@pytest.mark.system
def test_the_web_log_says_plain_redis_and_its_shard_count(stack):
    _, web = stack
    assert re.search(r"web process \w+ ready; Redis \S+ \(plain Redis, 1 shard\)", web.log), web.log[-2000:]


@pytest.mark.unit
def test_redis_kind_names_a_cluster_and_its_shards():
    class ClusterQueue:
        cluster, shards = True, [object()] * 3

    assert redis_kind(ClusterQueue()) == "Redis Cluster, 3 shards"


@pytest.mark.parametrize(
    ("visible", "device_file", "quiet"),
    [(None, False, True), (None, True, False), ("", True, True), ("-1", True, True), ("0", False, False)],
)
@pytest.mark.unit
def test_tensorflows_cuda_errors_are_hidden_only_where_no_gpu_is_meant(monkeypatch, visible, device_file, quiet):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(model.os.path, "exists", lambda path: device_file and path == "/dev/nvidia0")
    assert model._no_gpu_meant() is quiet


@pytest.mark.unit
def test_the_random_weights_warning_does_not_advise_what_the_user_did(caplog):
    with caplog.at_level(logging.WARNING):
        built = model._build(lambda weights: ("resnet50", weights), "none")
    assert built == ("resnet50", None)
    text = caplog.text
    assert "RANDOM weights, as MODEL_WEIGHTS=none asks" in text
    assert "MODEL_WEIGHTS=none for random weights" not in text and "or MODEL_WEIGHTS=none" not in text
    assert "MODEL_WEIGHTS=imagenet" in text


@pytest.mark.unit
def test_failed_imagenet_weights_explain_the_download_and_the_way_out():
    def offline(weights):
        raise Exception("URL fetch failure")

    with pytest.raises(model.WeightsError) as failure:
        model._build(offline, "imagenet")
    message = str(failure.value)
    assert "could not get the ImageNet weights" in message and "URL fetch failure" in message
    assert "MODEL_WEIGHTS=none" in message  # the user asked for imagenet: random weights are news to them


@pytest.mark.unit
def test_favicon_is_an_icon_open_without_a_key():
    from tests.support.web import StandInQueue

    config = settings.load(env={"API_KEYS": "k" * 24}, dotenv=False)
    queue = StandInQueue()
    app = create_app(config, queue=queue, inspector=queue)
    response = app.test_client().get("/favicon.ico")
    assert response.status_code == 200
    assert response.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
    assert response.data[:4] == b"\x00\x00\x01\x00"  # the ICO header
    assert app.test_client().post("/predict").status_code == 401  # the key still guards the API


@pytest.mark.system
def test_python_m_local_redis_serves_until_ctrl_c():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "imgserve.launch.local_redis", str(port)], cwd=PROJECT, stdout=subprocess.PIPE, text=True
    )
    try:
        first = server.stdout.readline()
        assert f"redis://127.0.0.1:{port}/0" in first and "Ctrl-C" in first
        with redis.Redis(port=port) as client:
            assert wait_until(lambda: _pings(client), 10, "PING")
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0
        assert "stopped" in server.stdout.read()
        with redis.Redis(port=port, socket_connect_timeout=1) as client, pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


# ---- serve.py (`make run`): ports checked first, the curl line only once a worker is ready ----------------


def processes_with(marker: str) -> list[int]:
    """The processes whose environment holds `marker`, from /proc."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


@pytest.mark.system
def test_a_taken_web_port_stops_make_run_before_it_starts_anything(redis_server):
    queue = f"taken-{uuid.uuid4().hex[:6]}"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = server_env(redis_server.url, queue, WEB_PORT=port, WEB_HOST="127.0.0.1")
        serve = Child([sys.executable, "-m", "imgserve.launch.serve"], env)
        assert serve.process.wait(60) == 1
    log = serve.log
    assert f"port {port} on 127.0.0.1 is taken (WEB_PORT); set WEB_PORT=" in log
    assert "in .env or the environment" in log and "Traceback" not in log
    assert "starting the web server" not in log and "nginx (" not in log
    assert processes_with(f"IMAGE_QUEUE={queue}") == []  # no worker, gunicorn or nginx left behind


@pytest.mark.unit
def test_a_taken_redis_port_names_redis_url(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setattr(serve, "LOCAL_REDIS_PORT", holder.getsockname()[1])
        config = settings.load(env={"WEB_PORT": str(free_port())}, dotenv=False)
        message = serve.taken_port(config, own_redis=True)
        assert serve.taken_port(config, own_redis=False) is None  # REDIS_URL set: that port is not ours to take
    assert f"port {serve.LOCAL_REDIS_PORT} on 127.0.0.1 is taken" in message and "REDIS_URL=redis://" in message


@pytest.mark.system
def test_make_run_says_try_curl_only_once_a_worker_is_ready(redis_server):
    env = server_env(redis_server.url, f"serve-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5)
    stack = Stack(env)
    try:
        stack.wait_ready()
        wait_until(lambda: "try: curl" in stack.log, 30, "the curl line")
        log = stack.log
        assert log.index("the worker is loading the model") < log.index("ready: a worker has loaded its model")
        assert log.index("ready: a worker") < log.index("try: curl -F image=@examples/sample.jpg")
        assert "model ResNet50 on CPU" in log[: log.index("try: curl")]  # the worker's own ready line came first
    finally:
        assert stack.stop(signal.SIGINT) == 0


@pytest.mark.system
def test_make_run_without_weights_says_the_worker_failed_and_never_try_curl(redis_server, tmp_path):
    env = server_env(
        redis_server.url,
        f"serve-{uuid.uuid4().hex[:6]}",
        MODEL_WEIGHTS="imagenet",
        KERAS_HOME=str(tmp_path),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    stack = Stack(env)
    try:
        assert stack.process.wait(120) == 3
    finally:
        stack.stop()
    log = stack.log
    assert "could not get the ImageNet weights" in log
    assert "the model worker exited with code 3 before the stack was ready" in log
    assert "try: curl" not in log and "ready: a worker" not in log
