"""The contenders of bench/throughput.py that need a process of their own.

Run by bench/throughput.py, not by hand:

    python bench/throughput_apps.py peer  --kafka URL --events N --result FILE --state-dir DIR \
        [--envelopes]
    python bench/throughput_apps.py naive --kafka URL --redis URL --chdb DIR --events N \
        --seconds S --result FILE

Both framework runtimes (Quix Streams, Faust) own their event loop and signal
handlers, so each runs in its own child. Each times itself from the first
event it handles to the last one it was asked for, writes
``{"events", "seconds", ...}`` to ``--result`` (atomically: the parent polls
for the file) and then stops or waits to be terminated. Joining the consumer
group (15–35 s on Tansu) happens before the first event and is not timed.

- ``peer``: the default journey's stage assignment on Quix Streams with its own
  RocksDB state per message key (the customer, or the device before login),
  changelog topics on as Quix ships them. Each event is validated by the
  worker's validator and applied by the worker's own pure engine
  (``pipeline.stages.apply_event``), the profile stored as its JSON. It does
  less than the worker: no identity stitching across keys, no duplicate
  detection, no sinks (ClickHouse, transitions topic, metrics). With
  ``--envelopes`` it first opens each envelope and re-keys its events by
  customer through a repartition topic (``group_by``): Quix keeps state per
  message key, and an envelope holds many customers.
- ``naive``: a Faust agent that handles one event at a time, as the framework's
  tutorials do: validate, one awaited Redis call (HSET of the event's stage),
  one awaited ClickHouse insert of its row into the real ``journey.events``
  table (its own chDB directory). It may stop on a sample (``--events``) or
  after ``--seconds`` of processing, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.settings import EVENTS_TOPIC

PEER_GROUP = "bench-quix-peer"
NAIVE_GROUP = "bench-faust-naive"
NAIVE_PREFIX = "bench:naive:"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write then rename, so the parent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(path)


def run_peer(
    kafka_url: str, events: int, result: Path, state_dir: Path, envelopes: bool = False
) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from quixstreams import Application, State

    from pipeline.stages import Profile, apply_event

    validator = Validator()
    journeys = default_journeys()
    app = Application(
        broker_address=kafka_url.split("://", 1)[-1],
        consumer_group=PEER_GROUP,
        auto_offset_reset="earliest",
        state_dir=str(state_dir),
        loglevel="WARNING",
    )
    topic = app.topic(EVENTS_TOPIC, key_deserializer="bytes", value_deserializer="bytes")
    # Tansu's DescribeConfigs answer has no retention.ms, which Quix reads to
    # configure the changelog topic of a stateful step; Kafka always sends it.
    topic.broker_config.extra_config.setdefault("retention.ms", "-1")
    seen = {"count": 0, "accepted": 0, "transitions": 0}
    started: list[float] = []

    def assign(raw: bytes | dict[str, Any], state: State[str, Any]) -> None:
        if not started:
            started.append(time.perf_counter())
        seen["count"] += 1
        decoded = validator.decode(raw) if isinstance(raw, bytes) else validator.validate_dict(raw)
        if isinstance(decoded, Event):
            seen["accepted"] += 1
            stored = state.get("profile")
            profile = (
                Profile.from_json(stored)
                if stored is not None
                else Profile.empty(decoded.key, decoded.customer_id is None)
            )
            step = apply_event(profile, decoded, journeys)
            seen["transitions"] += len(step.transitions)
            state.set("profile", step.profile.to_json().decode())
        if seen["count"] == events:
            seconds = time.perf_counter() - started[0]
            write_result(result, {**seen, "events": seen["count"], "seconds": seconds})
            app.stop()

    sdf = app.dataframe(topic)
    if envelopes:
        # Quix keeps state per message key, and an envelope holds many customers: the
        # idiomatic way is to open it and re-key each event by customer through a
        # repartition topic (group_by), then update that customer's state.
        sdf = sdf.apply(_open_envelope, expand=True)
        sdf = sdf.group_by(_customer_key, name="customer")
    sdf.update(assign, stateful=True)
    app.run()


def _open_envelope(raw: bytes) -> list[Any]:
    doc = orjson.loads(raw)
    if isinstance(doc, dict) and "envelope" in doc:
        return list(doc["events"])
    return [doc]


def _customer_key(doc: Any) -> str:
    if isinstance(doc, dict):
        for name in ("customer_id", "anonymous_id"):
            if isinstance(doc.get(name), str):
                return str(doc[name])
    return ""


def run_naive(
    kafka_url: str, redis_url: str, chdb_dir: Path, events: int, seconds: float, result: Path
) -> None:
    import faust
    import redis.asyncio as aioredis

    from pipeline.embedded import free_port
    from pipeline.sinks.clickhouse import ClickHouseSink, event_row

    validator = Validator()
    journey = default_journeys()[0]
    app = faust.App(
        NAIVE_GROUP,
        broker=kafka_url,
        store="memory://",
        web_port=free_port(),
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        key_serializer="raw",
        value_serializer="raw",
    )
    topic = app.topic(EVENTS_TOPIC, key_serializer="raw", value_serializer="raw")
    redis = aioredis.Redis.from_url(redis_url)
    sink = ClickHouseSink(f"chdb://{chdb_dir}")

    @app.agent(topic, concurrency=1)
    async def naive(stream: Any) -> AsyncIterator[None]:
        await sink.start()
        count = accepted = 0
        first = 0.0
        done = False
        async for value in stream:
            if done:
                continue
            if count == 0:
                first = time.perf_counter()
            # An envelope's events are handled one by one, like lone ones.
            for _, decoded in validator.decode_message(value):
                count += 1
                if isinstance(decoded, Event):
                    accepted += 1
                    stage = journey.match(decoded.event_type, decoded.properties)
                    await redis.hset(
                        NAIVE_PREFIX + decoded.key,
                        mapping={"stage": stage.name if stage else "", "at": decoded.ts},
                    )
                    sink.add_events([event_row(decoded, time.time())])
                    await sink.flush()
                elapsed = time.perf_counter() - first
                if count >= events or elapsed >= seconds:
                    write_result(
                        result, {"events": count, "accepted": accepted, "seconds": elapsed}
                    )
                    done = True
                    break
            yield None

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("contender", choices=("peer", "naive"))
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--redis")
    parser.add_argument("--chdb", type=Path)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--envelopes", action="store_true", help="the topic holds envelopes")
    args = parser.parse_args(argv)
    if args.contender == "peer":
        run_peer(args.kafka, args.events, args.result, args.state_dir, args.envelopes)
    else:
        run_naive(args.kafka, args.redis, args.chdb, args.events, args.seconds, args.result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    main()
