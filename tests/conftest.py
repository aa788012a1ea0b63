"""Shared fixtures: real local services (Tansu, redis-server) and fresh chDB paths.

Services are session-scoped because starting them is the slow part; tests
isolate themselves by flushing Redis and using their own topics or paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.embedded import Service, start_kafka, start_redis


@pytest.fixture(scope="session")
def kafka_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Tansu on a free loopback port, memory storage, for the whole session."""
    with start_kafka(log_dir=tmp_path_factory.mktemp("kafka")) as service:
        yield service


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """redis-server on a free loopback port, its files in a session tmp dir."""
    data_dir = tmp_path_factory.mktemp("redis")
    with start_redis(data_dir=data_dir, appendonly=True) as service:
        yield service


@pytest.fixture
def redis_client(redis_service: Service) -> Iterator[redis.Redis]:
    """A client on an emptied server, so no test sees another's keys."""
    client = redis.Redis.from_url(redis_service.url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def chdb_path(tmp_path: Path) -> Path:
    """A directory of its own for a ``chdb:///path`` DSN (chDB locks its data dir)."""
    path = tmp_path / "chdb"
    path.mkdir()
    return path
