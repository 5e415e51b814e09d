"""openapi.yaml against the live stack: schemathesis generates requests, every answer must fit the schema."""

from __future__ import annotations

import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from imgserve.launch.local_redis import free_port
from imgserve.web.views import WEB_DIR
from tools.processes import live_stack, sample_image_bytes, server_env, start_web, wait_until

pytestmark = pytest.mark.system

SPEC = WEB_DIR / "openapi.yaml"
REQUEST_TIMEOUT = 150  # seconds; generous, so a busy CPU does not turn into a 504


@pytest.fixture(scope="module")
def live_web(redis_server):
    env = server_env(redis_server.url, f"openapi-{uuid.uuid4().hex[:6]}", REQUEST_TIMEOUT=REQUEST_TIMEOUT)
    with live_stack(env) as (_, web):
        yield web


# Loaded from the file (schemathesis.pytest.from_fixture breaks on pytest 9.2); the test below checks
# that the server serves exactly this file.
schema = schemathesis.openapi.from_path(
    SPEC,
    config=schemathesis.Config.from_dict(
        {
            "operations": [
                # A schema-valid `image` is any bytes; most are not an image, and 400 is the right answer. A
                # schema-valid Request-Timeout-Ms or grpc-timeout may be a millisecond: then 504 is. A schema-valid
                # `model` is any name; almost none names a model, and 404 is the answer.
                {
                    "include-operation-id": "predict",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 400, 404, 504]}},
                },
                {
                    "include-operation-id": "submitJob",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [202, 400, 404]}},
                },
                # A schema-valid job id is any string; almost none names a job.
                {
                    "include-operation-id": ["jobStatus", "cancelJob"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 404, 409]}},
                },
            ]
        }
    ),
)


@schema.parametrize()
# Each example is a real HTTP call (some run the model), so no deadline and no "too slow" health checks.
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_openapi(case, live_web):
    response = case.call(base_url=live_web.url, timeout=REQUEST_TIMEOUT + 30)
    excluded = []
    # A client may ask to wait a millisecond (Request-Timeout-Ms, grpc-timeout): the 504 that names its limit is
    # the documented answer, whatever else the generated request holds.
    if response.status_code == 504 and "the client's" in response.json()["error"]:
        excluded += [not_a_server_error, negative_data_rejection]
    # Once an operation declares headers, schemathesis sends an unknown one as invalid data; HTTP ignores it.
    if any(name.lower().startswith("x-schemathesis-unknown") for name in case.headers or {}):
        excluded.append(negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)


def test_served_description_is_the_repository_file(live_web):
    response = requests.get(live_web.url + "/openapi.yaml", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/yaml")
    assert response.content == SPEC.read_bytes()


@pytest.mark.parametrize("images", [1, 2])
def test_real_images_get_a_200_that_fits_the_schema(live_web, images):
    """Real photos through the real model: the 200 answer fits the schema (generated bodies rarely decode)."""
    case = schema["/predict"]["POST"].Case(body={"image": [sample_image_bytes()] * images})
    response = case.call_and_validate(base_url=live_web.url, timeout=REQUEST_TIMEOUT + 30)
    assert response.status_code == 200
    body = response.json()
    assert len(body["predictions"]) == 5 if images == 1 else len(body["results"]) == images


def test_a_submitted_job_and_its_status_fit_the_schema(live_web):
    case = schema["/jobs"]["POST"].Case(body={"image": sample_image_bytes()}, query={"top_k": 2})
    submitted = case.call_and_validate(base_url=live_web.url)
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    status = schema["/jobs/{job_id}"]["GET"].Case(path_parameters={"job_id": job_id})
    wait_until(lambda: status.call_and_validate(base_url=live_web.url).json()["status"] == "done", 60, "the job")
    assert len(status.call_and_validate(base_url=live_web.url).json()["predictions"]) == 2
    cancel = schema["/jobs/{job_id}"]["DELETE"].Case(path_parameters={"job_id": job_id})
    assert cancel.call_and_validate(base_url=live_web.url).status_code == 409


@pytest.fixture(scope="module")
def web_without_redis():
    web = start_web(server_env(f"redis://127.0.0.1:{free_port()}/0", "openapi-no-redis", NOTIFICATIONS="off"))
    yield web
    web.stop()


def test_redis_down_answers_fit_the_schema(web_without_redis):
    """The documented 503s: /readyz without Redis, /predict with Retry-After."""
    readyz = schema["/readyz"]["GET"].Case()
    response = readyz.call_and_validate(base_url=web_without_redis.url, excluded_checks=[not_a_server_error])
    assert response.status_code == 503 and response.json()["redis"] is False

    predict = schema["/predict"]["POST"].Case(body={"image": [sample_image_bytes()]})
    response = predict.call_and_validate(base_url=web_without_redis.url, excluded_checks=[not_a_server_error])
    assert response.status_code == 503 and response.headers["retry-after"] == ["1"]


def test_readyz_without_workers_fits_the_schema(redis_server):
    web = start_web(server_env(redis_server.url, f"openapi-idle-{uuid.uuid4().hex[:6]}"))
    try:
        case = schema["/readyz"]["GET"].Case()
        response = case.call_and_validate(base_url=web.url, excluded_checks=[not_a_server_error])
        assert response.status_code == 503
        assert response.json() == {**response.json(), "ready": False, "redis": True, "workers": 0}
    finally:
        web.stop()
