"""Helpers for tests that run `journey` commands as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import redis
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from pipeline.embedded import Service, create_topics, start_kafka
from pipeline.engine import Reference
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextmanager
def broker(log_dir: Path, partitions: int) -> Iterator[Service]:
    """Tansu of a module's own: journey.events and journey.transitions with ``partitions``."""
    service = start_kafka(log_dir=log_dir)
    try:
        topics = {EVENTS_TOPIC: partitions, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: partitions}
        create_topics(service.url, topics)
        yield service
    finally:
        service.stop()


def journey(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `journey` subcommand to completion with these settings."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=300,
    )


class WorkerProcess:
    """`journey worker` in a child process, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "info"],
            env={**os.environ, **settings.to_env()},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics(self) -> Samples:
        """The worker's /metrics now; empty while its web server is not up yet."""
        assert self.process.poll() is None, self.log_tail()
        url = f"http://127.0.0.1:{self.settings.web_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        """SIGTERM and wait: Faust commits offsets and chDB releases its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll: group joins on Tansu take 15–35 s, so never sleep a fixed time instead."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def health(port: int) -> tuple[int, dict[str, Any]]:
    """A worker's /healthz: status code and body; (0, {}) while its web server is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def consume_all(url: str, topic: str, expected: int, timeout: float = 90) -> list[bytes]:
    """Read a topic from the start until ``expected`` records arrived (or the timeout)."""

    async def run() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=url.split("://", 1)[1],
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while len(values) < expected and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    values.extend(r.value for r in records if r.value is not None)
        finally:
            await consumer.stop()
        return values

    return asyncio.run(run())


def marks_and_owed(client: redis.Redis) -> tuple[int, int]:
    """Events applied (their duplicate marks) and outbox entries still owed, in Redis."""
    marks = sum(1 for _ in client.scan_iter("jt:e:*", count=1000))
    owed = sum(client.hlen(k) for k in client.scan_iter("jt:outbox:*"))
    return marks, owed


def assert_profiles(client: redis.Redis, expected: Reference) -> None:
    """Redis holds exactly the reference's profiles (compared as data, not bytes)."""
    for ref, slot in expected.slots.items():
        stored = client.hget(f"jt:{{{ref}}}:p", "d")
        want = None if slot.profile is None else orjson.loads(slot.profile.to_json())
        assert (ref, None if stored is None else orjson.loads(stored)) == (ref, want)
