"""Shared fixtures: a real Redis server per test session, a fresh queue name per test."""

from __future__ import annotations

import uuid

import pytest

from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol import connect
from tools.queues import Queues

KINDS = ("unit", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is marked either unit or system (pyproject.toml says what each means), never both."""
    wrong = [item.nodeid for item in items if len({m.name for m in item.iter_markers() if m.name in KINDS}) != 1]
    if wrong:
        raise pytest.UsageError("tests marked neither or both of unit and system:\n  " + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def redis_server():
    with LocalRedis() as server:
        yield server


@pytest.fixture
def queue_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def queue(redis_client, queue_name) -> Queues:
    return Queues.on(redis_client, queue_name, result_ttl=60, max_attempts=3)
