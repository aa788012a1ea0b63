"""`journey up`: the embedded default, every part local, with a live funnel view.

Starts Tansu (Kafka protocol, memory storage), redis-server, a worker that
owns an embedded chDB, the HTTP collector (a fresh key each run), optionally
the simulator, and Prometheus with the
project's alert rules where Debian's prometheus is installed. It then redraws
the funnel once a second from Redis (customers now per stage), the worker's
/metrics (entries and drop-offs per minute, consistency, rejected events) and
Prometheus (alerts firing). Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from pipeline import rehearsal
from pipeline.alerting import RuleWindows, render_rules
from pipeline.collector.keys import hash_key, new_key
from pipeline.embedded import (
    Service,
    create_topics,
    die_with_parent,
    prometheus_binary,
    start_kafka,
    start_prometheus,
    start_redis,
    stop_process,
)
from pipeline.journeys import Journey
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from pipeline.simulate import Incident
from pipeline.state.redis_store import RedisStore

WINDOW_SECONDS = 60.0
LOCAL_SOURCE = "local"  # the source name of events posted to `journey up`'s collector


class Child:
    """A `journey` subcommand run as a child process, its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: Ctrl-C reaches only `journey up`, which stops the children
            # in order (simulator, then worker); they still die if it is killed.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.process, timeout)
        self._log.close()


def firing_alerts(prometheus_url: str) -> list[dict[str, str]] | None:
    """Alerts Prometheus has firing now (labels), None if it cannot be asked."""
    try:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/alerts", timeout=2) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [a["labels"] for a in body["data"]["alerts"] if a.get("state") == "firing"]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """Samples of a /metrics endpoint keyed by (name, sorted labels); None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _sum(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **match: str
) -> float:
    total = 0.0
    for (sample_name, labels), value in samples.items():
        if sample_name == name and all(dict(labels).get(k) == v for k, v in match.items()):
            total += value
    return total


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _per_minute(
    samples: Samples | None, oldest: tuple[float, Samples] | None, name: str, **labels: str
) -> float:
    if samples is None or oldest is None:
        return 0.0
    span = max(1.0, time.monotonic() - oldest[0])
    return (_sum(samples, name, **labels) - _sum(oldest[1], name, **labels)) * 60.0 / span


def render(
    journeys: Sequence[Journey],
    customers: dict[tuple[str, str], int],
    samples: Samples | None,
    history: deque[tuple[float, Samples]],
    channels: Sequence[str],
    status: str,
    alerts: list[dict[str, str]] | None = None,
) -> Group:
    """The live view: per stage, customers now, entries and drop-offs per minute, consistency.

    ``alerts`` None means no Prometheus evaluates the rules in this run.
    """
    parts: list[Panel | Table] = []
    oldest = history[0] if history else None
    for journey in journeys:
        table = Table(title=f"journey {journey.name}: live funnel", title_justify="left")
        table.add_column("stage")
        table.add_column("customers now", justify="right")
        table.add_column("", min_width=20)
        table.add_column("entries/min", justify="right")
        for c in channels:
            table.add_column(c, justify="right")
        table.add_column("drop-offs/min", justify="right")
        table.add_column("consistency", justify="right")
        peak = max([customers.get((journey.name, s.name), 0) for s in journey.stages] + [1])
        for stage in journey.stages:
            now = customers.get((journey.name, stage.name), 0)
            bar = "█" * round(20 * now / peak)
            labels = {"journey": journey.name, "stage": stage.name}
            per_channel = [
                _per_minute(samples, oldest, "journey_stage_entries_total", **labels, channel=c)
                for c in channels
            ]
            dropoffs = _per_minute(samples, oldest, "journey_dropoffs_total", **labels)
            index = [
                v
                for (name, ls), v in (samples or {}).items()
                if name == "journey_cross_channel_consistency" and dict(ls) == labels
            ]
            table.add_row(
                stage.name,
                str(now),
                bar,
                f"{sum(per_channel):.0f}",
                *(f"{r:.0f}" for r in per_channel),
                f"{dropoffs:.0f}" if stage.max_dwell is not None else "–",
                f"{index[0]:.2f}" if index else "–",
            )
        parts.append(table)
    if alerts is not None:
        lines = [
            f"[bold red]{a.get('alertname')}[/] "
            + " ".join(f"{k}={a[k]}" for k in ("journey", "stage", "channel") if k in a)
            for a in alerts
        ]
        parts.append(Panel("\n".join(lines) or "none firing", title="alerts (Prometheus)"))
    if samples is not None:
        accepted = _sum(samples, "journey_events_total", outcome="accepted")
        rejected = _sum(samples, "journey_events_total", outcome="rejected")
        duplicate = _sum(samples, "journey_events_total", outcome="duplicate")
        parts.append(
            Panel(
                f"events accepted {accepted:.0f}   duplicates {duplicate:.0f}   "
                f"rejected {rejected:.0f} (see journey.events.rejected)\n{status}",
                title="pipeline",
            )
        )
    else:
        parts.append(Panel(status, title="pipeline"))
    return Group(*parts)


def run_up(
    data_dir: Path,
    journeys: tuple[Journey, ...],
    journeys_path: Path | None,
    with_simulator: bool,
    rate: float,
    incidents: Sequence[Incident],
    web_port: int,
    partitions: int,
    console: Console,
    rehearse: bool = False,
    collector_port: int = 6067,
) -> None:
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    children: list[Child] = []
    try:
        with console.status("starting the Kafka-compatible broker (Tansu)…"):
            services.append(start_kafka(log_dir=log_dir))
        kafka = services[-1]
        with console.status("starting redis-server…"):
            services.append(start_redis(data_dir=data_dir / "redis", appendonly=True))
        redis_service = services[-1]
        create_topics(
            kafka.url, {EVENTS_TOPIC: partitions, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: partitions}
        )
        base = Settings.from_env()
        settings = Settings(
            kafka_url=kafka.url,
            redis_url=redis_service.url,
            clickhouse_dsn=f"chdb://{data_dir / 'chdb'}",
            journeys_path=journeys_path,
            web_port=web_port,
            channels=base.channels,
            allowed_lateness_seconds=(
                rehearsal.ALLOWED_LATENESS_SECONDS if rehearse else base.allowed_lateness_seconds
            ),
            sweep_seconds=rehearsal.SWEEP_SECONDS if rehearse else base.sweep_seconds,
            collector_port=collector_port,
            collector_cors_origins=base.collector_cors_origins or ("*",),
        )
        collector_key = new_key()
        key_file = data_dir / "collector.key"
        key_file.write_text(collector_key + "\n")
        key_file.chmod(0o600)
        settings = replace(settings, collector_keys=f"{LOCAL_SOURCE}:{hash_key(collector_key)}")
        prometheus_url = None
        if prometheus_binary() is not None:
            prom_dir = data_dir / "prometheus"
            prom_dir.mkdir(parents=True, exist_ok=True)
            rules = prom_dir / "journey.rules.yml"
            rules.write_text(
                render_rules(journeys, rehearsal.WINDOWS if rehearse else RuleWindows())
            )
            interval = "1s" if rehearse else "5s"
            with console.status("starting Prometheus with the alert rules…"):
                services.append(
                    start_prometheus(
                        scrape_targets=[f"127.0.0.1:{web_port}"],
                        rule_files=[rules],
                        data_dir=prom_dir,
                        scrape_interval=interval,
                        evaluation_interval=interval,
                        log_dir=log_dir,
                    )
                )
            prometheus_url = services[-1].url
        env = settings.to_env()
        children.append(Child("worker", ["worker", "--loglevel", "warning"], env, log_dir))
        children.append(Child("collector", ["collector", "--loglevel", "warning"], env, log_dir))
        if with_simulator:
            args = ["simulate", "--rate", str(rate)]
            if rehearse:
                args += ["--time-scale", str(rehearsal.TIME_SCALE)]
            for i in incidents:
                args += ["--incident", f"{i.channel}:{i.stage}:{i.failure_rate}@{i.start_after}s"]
            children.append(Child("simulate", args, env, log_dir))
        console.print(
            f"broker {kafka.url}  redis {redis_service.url}  chDB {data_dir / 'chdb'}\n"
            f"metrics http://127.0.0.1:{web_port}/metrics  logs {log_dir}\n"
            f"collector http://127.0.0.1:{collector_port}/v1/events  key in {key_file}: "
            f'(curl -H "Authorization: Bearer $(cat {key_file})" -d @event.json …)\n'
            + (
                f"Prometheus {prometheus_url} (alert rules loaded)\n"
                if prometheus_url
                else "No Prometheus installed (scripts/setup.sh installs it): no alerts.\n"
            )
            + "The worker joins its consumer group first (15–35 s on Tansu). Ctrl-C stops all."
        )
        asyncio.run(_live(journeys, settings, children, console, prometheus_url))
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping…")
        for child in reversed(children):
            child.stop()
        for service in reversed(services):
            service.stop()
        console.print(
            f"stopped. Data kept in {data_dir}: ClickHouse (chDB) in {data_dir / 'chdb'}, Redis "
            f"in {data_dir / 'redis'}, logs in {log_dir}. Kafka (Tansu) kept its data in memory "
            f"only. Query history with: JOURNEY_CLICKHOUSE_DSN=chdb://{data_dir / 'chdb'} "
            "journey report"
        )


async def _live(
    journeys: tuple[Journey, ...],
    settings: Settings,
    children: list[Child],
    console: Console,
    prometheus_url: str | None = None,
) -> None:
    store = RedisStore(settings.redis_url, settings.dedupe_ttl_seconds)
    metrics_url = f"http://127.0.0.1:{settings.web_port}/metrics"
    history: deque[tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = deque()
    started = time.monotonic()
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while True:
                for child in children:
                    if child.process.poll() is not None:
                        raise RuntimeError(
                            f"{child.name} exited with code {child.process.returncode}; "
                            f"see {child.log_path}"
                        )
                customers = await store.all_stage_customers()
                samples = await asyncio.to_thread(scrape, metrics_url)
                now = time.monotonic()
                if samples is not None:
                    history.append((now, samples))
                    while history and now - history[0][0] > WINDOW_SECONDS:
                        history.popleft()
                status = (
                    f"up {now - started:.0f} s"
                    if samples is not None
                    else f"waiting for the worker ({now - started:.0f} s)…"
                )
                alerts = (
                    await asyncio.to_thread(firing_alerts, prometheus_url)
                    if prometheus_url
                    else None
                )
                live.update(
                    render(journeys, customers, samples, history, settings.channels, status, alerts)
                )
                await asyncio.sleep(1.0)
    finally:
        await store.close()
