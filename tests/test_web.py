"""The web API's own answers, in-process through Flask's test client, with a stand-in for the queue:
everything that needs no worker and no Redis (the real-process tests cover the rest)."""

from __future__ import annotations

import contextlib
import io
import re
import threading

import pytest
import redis
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgserve import settings
from imgserve.imaging.prepare import DecodeBudget
from imgserve.protocol import SUBMITTED
from imgserve.protocol.keys import OPEN_OWNER
from imgserve.web import security
from imgserve.web.app import create_app
from tests.support.web import MODEL, StandInQueue

pytestmark = pytest.mark.unit


def client_for(queue: StandInQueue, **env: str):
    config = settings.load(env={"MAX_UPLOAD_BYTES": "200000", **env}, dotenv=False)
    app = create_app(config, queue=queue, inspector=queue)
    app.testing = True
    return app.test_client(), app


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def upload(data: bytes, name: str = "image") -> dict:
    return {"data": {name: (io.BytesIO(data), "photo.png")}, "content_type": "multipart/form-data"}


def assert_error(response, status: int, words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["success"] is False and words.lower() in body["error"].lower(), body
    return body


def test_an_upload_is_queued_and_its_result_returned():
    queue = StandInQueue()
    client, _ = client_for(queue)
    response = client.post("/predict", **upload(png(40, 30)))
    assert response.status_code == 200 and response.get_json()["predictions"][0]["label"] == "castle"
    assert len(queue.enqueued) == 1 and queue.enqueued[0].shape == [224, 224, 3]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "field named 'image'"),
        (upload(png(40, 30), name="photo"), "field named 'image'"),
        (upload(b""), "empty"),
        (upload(b"plain text, not a picture"), "not an image"),
        (upload(png(40, 30)[:60]), "damaged or truncated"),
        (upload(png(6300, 6300)), "MAX_DECODE_BYTES"),
    ],
    ids=["no-body", "other-field", "empty", "text", "truncated", "costly-to-decode"],
)
def test_bad_uploads_get_400_json_and_nothing_is_queued(kwargs, words):
    queue = StandInQueue()
    client, _ = client_for(queue)
    assert_error(client.post("/predict", **kwargs), 400, words)
    assert queue.enqueued == []


def test_get_on_predict_is_405_with_allow():
    client, _ = client_for(StandInQueue())
    response = client.get("/predict")
    assert_error(response, 405, "method")
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    "fields, words",
    [
        (
            {f"f{i}": "y" for i in range(5000)},
            "more than 1,000 parts (fields and files); the limit is 1,000 (Flask's MAX_FORM_PARTS)",
        ),
        ({"big": "y" * 600_000}, "non-file fields hold more than 500,000 bytes"),
    ],
    ids=["5000-parts", "large-fields"],
)
def test_a_form_over_a_limit_other_than_the_size_is_413_naming_that_limit(fields, words):
    client, _ = client_for(StandInQueue(), MAX_UPLOAD_BYTES="16777216")
    body, content_type = _client_body({"image": ("a.png", png(40, 30), "image/png")}, fields)
    assert len(body) < 16_777_216
    response = client.post("/predict", data=body, content_type=content_type)
    assert "MAX_UPLOAD_BYTES" not in assert_error(response, 413, words)["error"]


def _client_body(files: dict, fields: dict) -> tuple[bytes, str]:
    """The body and Content-Type that `requests` sends (Werkzeug's test client writes large forms slowly)."""
    prepared = requests.Request("POST", "http://x/predict", files=files, data=fields).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def test_a_body_over_max_upload_bytes_is_413():
    client, _ = client_for(StandInQueue())
    assert_error(client.post("/predict", **upload(b"x" * 300_000)), 413, "MAX_UPLOAD_BYTES")


@pytest.mark.parametrize(
    "queue, words",
    [(StandInQueue(accept=False), "queue full"), (StandInQueue(down=True), "unavailable")],
    ids=["queue-full", "redis-down"],
)
def test_no_room_or_no_redis_is_503_with_retry_after(queue, words):
    client, _ = client_for(queue)
    response = client.post("/predict", **upload(png(40, 30)))
    assert_error(response, 503, words)
    assert response.headers["Retry-After"] == "1"


@contextlib.contextmanager
def held_elsewhere(budget: DecodeBudget, cost: int):
    """`cost` bytes of the budget held by another thread (holds nest within one thread)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.hold(cost):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_a_full_decode_budget_is_503_with_retry_after():
    queue = StandInQueue()
    client, app = client_for(queue, DECODE_WAIT="0.1")
    budget: DecodeBudget = app.extensions["imgserve"].decode_budget
    with held_elsewhere(budget, budget.capacity):  # another upload holds as much as the budget allows
        response = client.post("/predict", **upload(png(40, 30)))
    assert_error(response, 503, "busy")
    assert response.headers["Retry-After"] == "1" and queue.enqueued == []


def test_healthz_answers_without_redis():
    client, _ = client_for(StandInQueue(down=True))
    assert client.get("/healthz").get_json() == {"status": "ok"}


# ---- what the server accepts from, and tells, strangers ------------------------------------------


def image_file(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).save(out, fmt)
    return out.getvalue()


def test_a_format_not_accepted_is_400_naming_the_accepted_ones():
    queue = StandInQueue()
    client, _ = client_for(queue)
    assert_error(client.post("/predict", **upload(image_file("EPS"))), 400, "accepted format (JPEG, PNG, GIF, WEBP")
    client, _ = client_for(queue, ACCEPTED_FORMATS="png")
    assert_error(client.post("/predict", **upload(image_file("JPEG"))), 400, "accepted format (PNG)")
    assert client.post("/predict", **upload(png(40, 30))).status_code == 200 and len(queue.enqueued) == 1


def request_counts(client) -> dict[tuple[str, str, str], float]:
    """web_requests_total from /metrics, by (endpoint, method, status)."""
    families = text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    return {
        (s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value
        for family in families
        for s in family.samples
        if s.name == "web_requests_total"
    }


def test_made_up_methods_are_counted_as_other_not_as_new_series():
    client, _ = client_for(StandInQueue())
    before = request_counts(client)
    made_up = ["FOO", "BREW", "PROPFIND", "XYZZYQUUX", "SNEAKY"]
    assert [client.open("/predict", method=m).status_code for m in made_up] == [405] * 5
    after = request_counts(client)
    assert {method for _, method, _ in after} <= {"GET", "HEAD", "POST", "OPTIONS", "other"}
    key = ("unmatched", "other", "405")  # no route takes these methods
    assert after[key] - before.get(key, 0) == 5


def test_readyz_without_redis_does_not_tell_its_address():
    client, _ = client_for(StandInQueue(down=True))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"ready": False, "redis": False, "error": "the job queue (Redis) is unavailable"}
    assert "10.1.2.3" not in response.get_data(as_text=True) and "6379" not in response.get_data(as_text=True)


class UnreachableQueue(StandInQueue):
    """A StandInQueue whose `failing` methods raise `error`, naming Redis's address as redis-py does."""

    def __init__(self, failing: set[str], error: type[Exception]) -> None:
        super().__init__()
        for name in failing:
            setattr(self, name, lambda *args, **kwargs: self.fail())
        self.error = error

    def fail(self):
        raise self.error("Error 111 connecting to 10.1.2.3:6379. Connection refused.")


@pytest.mark.parametrize(
    "failing, method, path, keyed",
    [
        ({"enqueue_many"}, "POST", "/predict", False),
        ({"hold"}, "POST", "/predict", True),
        ({"enqueue_many"}, "POST", "/jobs", False),
        ({"hold"}, "POST", "/jobs", True),
        ({"job_status"}, "GET", f"/jobs/{'a' * 32}", False),
        ({"cancel_submitted"}, "DELETE", f"/jobs/{'a' * 32}", False),
    ],
    ids=["predict", "predict-share", "submit", "submit-share", "status", "cancel"],
)
@pytest.mark.parametrize("error", [redis.ConnectionError, redis.exceptions.ClusterDownError])
def test_redis_unavailable_is_one_503_with_retry_after_that_does_not_tell_its_address(
    failing, method, path, keyed, error, capsys
):
    env = {"API_KEYS": KEY} if keyed else {}
    client, _ = client_for(UnreachableQueue(failing, error), **env)
    response = client.open(path, method=method, headers=bearer(KEY) if keyed else {}, **upload(png(40, 30)))
    assert_error(response, 503, "the job queue (Redis) is unavailable; try again shortly")
    assert response.headers["Retry-After"] == "1"
    assert "10.1.2.3" not in response.get_data(as_text=True) and "6379" not in response.get_data(as_text=True)
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("10.1.2.3:6379") == 1  # the details go to the log, once


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/"),
        ("GET", "/static/app.js"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.yaml"),
        ("GET", "/no/such/page"),
        ("GET", "/predict"),
        ("POST", "/predict"),
    ],
)
def test_every_answer_carries_the_security_headers(method, path):
    client, _ = client_for(StandInQueue())
    response = client.open(path, method=method)
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Frame-Options"] == "DENY"
    policy = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]


def test_the_upload_page_has_no_inline_script_or_style():
    """The CSP allows no inline code: the page must keep its script and style in files (the browser test
    checks the page in Chromium under the policy)."""
    client, _ = client_for(StandInQueue())
    page = client.get("/").get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page) and "<style" not in page
    assert not re.search(r"\s(style|on[a-z]+)=", page)


CROSS_SITE = [
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),  # a sandboxed frame, a file:// page
    ({"Origin": "http://localhost.evil.example"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}, 200),  # the upload page itself
    ({"Origin": "https://localhost"}, 200),  # the page served through a TLS proxy in front of this server
    ({}, 200),  # curl, scripts: no Origin
    ({"Sec-Fetch-Site": "none"}, 200),  # typed in by the user
]


@pytest.mark.parametrize("headers, status", CROSS_SITE, ids=[str(h) for h, _ in CROSS_SITE])
def test_posts_from_other_sites_are_refused(headers, status):
    queue = StandInQueue()
    client, _ = client_for(queue)  # the test client's host is "localhost"
    response = client.post("/predict", headers=headers, **upload(png(40, 30)))
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 403:
        assert_error(response, 403, "ALLOWED_ORIGINS")
        assert queue.enqueued == []
        assert request_counts(client)[("/predict", "POST", "403")] >= 1


def test_allowed_origins_may_post_and_read_the_answer():
    queue = StandInQueue()
    client, _ = client_for(queue, ALLOWED_ORIGINS="https://app.example")
    response = client.post("/predict", headers={"Origin": "https://app.example"}, **upload(png(40, 30)))
    assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in response.headers["Vary"]
    response = client.post("/predict", headers={"Origin": "https://other.example"}, **upload(png(40, 30)))
    assert response.status_code == 403 and "Access-Control-Allow-Origin" not in response.headers


def test_reading_from_another_site_is_not_refused():
    client, _ = client_for(StandInQueue())
    response = client.get("/healthz", headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("path", ["/predict", "/jobs", "/jobs/" + "a" * 32])
def test_an_allowed_origins_preflight_may_send_a_key_and_delete(path):
    client, _ = client_for(StandInQueue(), ALLOWED_ORIGINS="https://app.example", API_KEYS=KEY)
    asking = {"Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "authorization"}
    response = client.options(path, headers={"Origin": "https://app.example", **asking})
    assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert {"GET", "POST", "DELETE"} <= set(response.headers["Access-Control-Allow-Methods"].split(", "))
    assert {"Authorization", "Content-Type"} <= set(response.headers["Access-Control-Allow-Headers"].split(", "))
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    other = client.options(path, headers={"Origin": "https://other.example", **asking})
    assert not any(name.startswith("Access-Control-") for name in other.headers.keys())


HOSTS = [
    ({}, "localhost", 200),
    ({}, "127.0.0.1:5000", 200),
    ({}, "[::1]:8080", 200),
    ({}, "evil.example", 400),  # DNS rebinding: another site's name for this loopback server
    ({}, "localhost.evil.example:5000", 400),
    ({"WEB_HOST": "0.0.0.0"}, "evil.example", 200),  # not loopback, no ALLOWED_HOSTS: any (README: set it)
    ({"ALLOWED_HOSTS": "api.example.com, 10.0.0.5:8080"}, "API.example.com:443", 200),
    ({"ALLOWED_HOSTS": "api.example.com, 10.0.0.5:8080"}, "10.0.0.5:8080", 200),
    ({"ALLOWED_HOSTS": "api.example.com, 10.0.0.5:8080"}, "10.0.0.5:9090", 400),
    ({"ALLOWED_HOSTS": "api.example.com"}, "localhost", 400),
    ({"ALLOWED_HOSTS": "*"}, "evil.example", 200),
]


@pytest.mark.parametrize("env, host, status", HOSTS, ids=[f"{e}-{h}" for e, h, _ in HOSTS])
def test_a_host_header_outside_allowed_hosts_is_400_json(env, host, status):
    queue = StandInQueue()
    client, _ = client_for(queue, **env)
    for path in ("/healthz", "/predict"):
        response = client.post(path, headers={"Host": host}, **upload(png(40, 30))) if path == "/predict" else (
            client.get(path, headers={"Host": host}))  # fmt: skip
        assert response.status_code == status, (path, response.get_data(as_text=True))
        if status == 400:
            assert_error(response, 400, "ALLOWED_HOSTS")
            assert response.headers["X-Frame-Options"] == "DENY"
    assert len(queue.enqueued) == (1 if status == 200 else 0)


class FailingQueue(StandInQueue):
    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict:
        return {"success": False, "status": 500, "error": "boom\n[2026-01-01 00:00:00.000] [web] forged"}


def test_a_result_error_from_redis_is_logged_on_one_line(capsys):
    client, _ = client_for(FailingQueue())
    assert_error(client.post("/predict", **upload(png(40, 30))), 500, "boom")
    lines = [line for line in capsys.readouterr().err.splitlines() if "boom" in line or "forged" in line]
    assert len(lines) == 1 and lines[0].endswith("boom\\n[2026-01-01 00:00:00.000] [web] forged"), lines


# ---- several images, top_k, submitted jobs, model identity --------------------------------------


def uploads(*files: tuple[bytes, str]) -> dict:
    return {
        "data": {"image": [(io.BytesIO(data), name) for data, name in files]},
        "content_type": "multipart/form-data",
    }


def test_the_single_image_answer_keeps_its_fields_and_names_the_model():
    client, _ = client_for(StandInQueue())
    body = client.post("/predict", **upload(png(40, 30))).get_json()
    assert body == {"success": True, "predictions": [{"label": "castle", "probability": 0.5}], **MODEL}


def test_several_images_are_queued_together_and_answered_in_order():
    queue = StandInQueue()
    client, _ = client_for(queue)
    response = client.post("/predict", **uploads(*[(png(40 + i, 30), f"{i}.png") for i in range(3)]))
    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True and len(body["results"]) == 3
    assert all(entry["predictions"][0]["label"] == "castle" and entry["weights"] == "none" for entry in body["results"])
    assert len(queue.enqueued) == 3 and len({job.id for job in queue.enqueued}) == 3


def test_one_bad_image_among_several_is_named_and_nothing_is_queued():
    queue = StandInQueue()
    client, _ = client_for(queue)
    response = client.post("/predict", **uploads((png(40, 30), "good.png"), (b"not a picture", "bad.png")))
    assert_error(response, 400, "image 2 ('bad.png')")
    assert queue.enqueued == []


def test_more_images_than_the_limit_is_400_naming_the_setting():
    queue = StandInQueue()
    client, _ = client_for(queue, MAX_IMAGES_PER_REQUEST="2")
    response = client.post("/predict", **uploads(*[(png(40, 30), f"{i}.png") for i in range(3)]))
    assert_error(response, 400, "MAX_IMAGES_PER_REQUEST")
    assert queue.enqueued == []


@pytest.mark.parametrize("path", ["/predict", "/jobs"])
def test_top_k_is_carried_by_the_job(path):
    queue = StandInQueue()
    client, _ = client_for(queue)
    client.post(path, **upload(png(40, 30)))
    client.post(path + "?top_k=20", **upload(png(40, 30)))
    assert [job.top_k for job in queue.enqueued] == [5, 20]


@pytest.mark.parametrize("path", ["/predict", "/jobs"])
@pytest.mark.parametrize("value", ["0", "21", "-1", "3.5", "x", "", "٣"])
def test_top_k_out_of_range_is_400_and_nothing_is_queued(path, value):
    queue = StandInQueue()
    client, _ = client_for(queue)
    assert_error(client.post(f"{path}?top_k={value}", **upload(png(40, 30))), 400, "top_k must be")
    assert queue.enqueued == []


def test_a_submitted_job_is_answered_at_once_with_where_to_collect_it():
    queue = StandInQueue()
    client, _ = client_for(queue, RESULT_TTL="600")
    response = client.post("/jobs", **upload(png(40, 30)))
    body = response.get_json()
    assert response.status_code == 202 and body["success"] is True
    assert body["status_url"] == f"/jobs/{body['id']}" and response.headers["Location"] == body["status_url"]
    [job] = queue.enqueued
    assert job.id == body["id"] and job.origin == SUBMITTED and 590 < job.deadline - job.enqueued_at <= 600
    assert client.get(body["status_url"]).get_json() == {"id": job.id, "status": "queued"}


def test_a_submitted_job_takes_one_image():
    client, _ = client_for(StandInQueue())
    assert_error(client.post("/jobs", **uploads((png(40, 30), "a.png"), (png(40, 30), "b.png"))), 400, "limit is 1")


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "A" * 32, "0" * 33])
def test_an_unknown_job_is_404_json(method, job_id):
    client, _ = client_for(StandInQueue())
    assert_error(getattr(client, method)(f"/jobs/{job_id}"), 404, "no job")


def test_a_full_queue_refuses_a_submitted_job():
    client, _ = client_for(StandInQueue(accept=False))
    response = assert_error(client.post("/jobs", **upload(png(40, 30))), 503, "queue full")
    assert response["success"] is False


def test_readyz_names_the_workers_models():
    client, _ = client_for(StandInQueue())
    assert client.get("/readyz").get_json()["models"] == [MODEL]


# ---- API keys -----------------------------------------------------------------------------------

KEY, OTHER_KEY = "k-" + "a1" * 12, "k-" + "b2" * 12


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("k-" + "a1" * 11 + "a0"), {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}, bearer("")],
    ids=["none", "wrong-key", "other-scheme", "no-scheme", "empty"],
)
def test_with_api_keys_predict_without_a_valid_key_is_401_json(headers):
    queue = StandInQueue()
    client, _ = client_for(queue, API_KEYS=f"{KEY},{OTHER_KEY}")
    refused_before = request_counts(client).get(("/predict", "POST", "401"), 0)
    response = client.post("/predict", headers=headers, **upload(png(40, 30)))
    assert_error(response, 401, "API key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert queue.enqueued == [] and request_counts(client)[("/predict", "POST", "401")] == refused_before + 1


def test_with_api_keys_every_listed_key_may_predict_and_open_routes_stay_open(tmp_path):
    (tmp_path / "keys").write_text(f"# the partner's key\n{OTHER_KEY}\n\n")
    queue = StandInQueue()
    client, _ = client_for(queue, API_KEYS=KEY, API_KEYS_FILE=str(tmp_path / "keys"))
    for key in (KEY, OTHER_KEY):
        assert client.post("/predict", headers=bearer(key), **upload(png(40, 30))).status_code == 200
    loose = {"Authorization": f"bearer  {KEY} "}  # the scheme is case-insensitive (RFC 9110)
    assert client.post("/predict", headers=loose, **upload(png(40, 30))).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.yaml", "/favicon.ico", "/static/app.js"):
        assert client.get(path).status_code == 200, path
    assert client.get("/no-such-page").status_code == 404
    assert len(queue.enqueued) == 3


def test_a_route_added_later_is_closed_until_listed_as_open():
    client, app = client_for(StandInQueue(), API_KEYS=KEY)
    app.add_url_rule("/later/<item>", "later", lambda item: {"item": item})
    assert_error(client.get("/later/1"), 401, "API key")
    assert client.get("/later/1", headers=bearer(KEY)).get_json() == {"item": "1"}


def test_api_keys_never_reach_the_log_or_the_metrics(capsys):
    client, _ = client_for(StandInQueue(), API_KEYS=KEY, LOG_LEVEL="DEBUG")
    client.post("/predict", headers=bearer(KEY), **upload(png(40, 30)))
    client.post("/predict", headers=bearer(KEY[:-1] + "x"), **upload(png(40, 30)))
    metrics_page = client.get("/metrics").get_data(as_text=True)
    output = capsys.readouterr()
    for text in (output.out, output.err, metrics_page):
        assert KEY[4:20] not in text and KEY[4:-1] not in text


def test_without_api_keys_the_api_is_open():
    client, _ = client_for(StandInQueue())  # API_KEYS unset: set but empty is refused at start-up
    assert client.post("/predict", headers=bearer("anything"), **upload(png(40, 30))).status_code == 200


@pytest.mark.parametrize("method, path", [("POST", "/jobs"), ("GET", "/jobs/abc"), ("DELETE", "/jobs/abc")])
def test_with_api_keys_the_job_routes_need_a_key_too(method, path):
    client, _ = client_for(StandInQueue(), API_KEYS=KEY)
    assert_error(client.open(path, method=method, **upload(png(40, 30))), 401, "API key")
    assert client.open(path, method=method, headers=bearer(KEY), **upload(png(40, 30))).status_code != 401


# ---- each key's own jobs and share of the queue -------------------------------------------------


def test_a_key_over_its_share_gets_429_while_another_key_still_queues_and_sees_only_its_own_jobs():
    queue = StandInQueue()
    client, _ = client_for(queue, API_KEYS=f"{KEY},{OTHER_KEY}", MAX_QUEUE_PER_KEY="2")
    flood = [client.post("/jobs", headers=bearer(OTHER_KEY), **upload(png(40, 30))) for _ in range(3)]
    assert [r.status_code for r in flood] == [202, 202, 429]
    assert flood[2].headers["Retry-After"] == "1" and "MAX_QUEUE_PER_KEY" in flood[2].get_json()["error"]
    assert_error(client.post("/predict", headers=bearer(OTHER_KEY), **upload(png(40, 30))), 429, "MAX_QUEUE_PER_KEY")
    mine = client.post("/jobs", headers=bearer(KEY), **upload(png(40, 30)))
    assert mine.status_code == 202 and len(queue.enqueued) == 3
    url = mine.headers["Location"]
    assert client.get(url, headers=bearer(KEY)).get_json() == {"id": mine.get_json()["id"], "status": "queued"}
    for method in ("get", "delete"):  # the same answer as for an unknown job: no oracle
        assert_error(getattr(client, method)(url, headers=bearer(OTHER_KEY)), 404, "no job")
    assert client.delete(url, headers=bearer(KEY)).status_code == 200
    assert client.delete(flood[0].headers["Location"], headers=bearer(OTHER_KEY)).status_code == 200
    assert client.post("/jobs", headers=bearer(OTHER_KEY), **upload(png(40, 30))).status_code == 202  # room again


def test_predict_counts_against_the_share_only_while_it_waits():
    queue = StandInQueue()
    client, _ = client_for(queue, API_KEYS=KEY, MAX_QUEUE_PER_KEY="1")
    for _ in range(3):
        assert client.post("/predict", headers=bearer(KEY), **upload(png(40, 30))).status_code == 200
    assert queue.held == {security.owner_id(KEY): set()}


def test_without_api_keys_there_is_no_per_key_share():
    queue = StandInQueue()
    client, _ = client_for(queue, MAX_QUEUE_PER_KEY="1")
    assert [client.post("/jobs", **upload(png(40, 30))).status_code for _ in range(3)] == [202] * 3
    assert queue.held == {}


class FailedJobsQueue(StandInQueue):
    def job_status(self, job_id: str, owner: str = OPEN_OWNER) -> dict | None:
        return {"status": "failed", "error": "job failed: out of attempts"}


def test_a_failed_job_is_shown_as_failed_with_its_error():
    client, _ = client_for(FailedJobsQueue())
    body = client.get("/jobs/" + "0" * 32).get_json()
    assert body == {"id": "0" * 32, "status": "failed", "error": "job failed: out of attempts"}


@pytest.mark.parametrize("path", ["/predict", "/jobs"])
def test_priority_is_read_from_the_query_and_a_full_level_is_named(path):
    queue = StandInQueue()
    client, _ = client_for(queue)
    client.post(path, **upload(png(40, 30)))
    client.post(f"{path}?priority=low", **upload(png(40, 30)))
    assert [job.priority for job in queue.enqueued] == ["normal", "low"]
    for bad in ("urgent", "HIGH", ""):
        assert_error(client.post(f"{path}?priority={bad}", **upload(png(40, 30))), 400, "priority must be one of")
    client, _ = client_for(StandInQueue(accept=False))
    assert_error(client.post(f"{path}?priority=high", **upload(png(40, 30))), 503, "queue full at priority high")
