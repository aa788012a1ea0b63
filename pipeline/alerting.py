"""The Prometheus rules file (recording rules and alerts), generated from the journeys.

Pure: journeys and windows in, a rules document out. The per-stage drop-off
thresholds live in the journey file (``dropoff_alert_ratio``) and reach
Prometheus as constant recording rules, so the file and the alerts cannot
drift apart: regenerate with ``journey rules`` whenever the journeys change.

Every window and ``for`` duration comes from :class:`RuleWindows`, so tests can
run the very same rules scaled down to seconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.journeys import Journey, default_journeys

RULES_PATH = "deploy/prometheus/rules/journey.rules.yml"
WORKER_JOB = "journey-worker"

_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0, 0.001)


def prometheus_seconds(duration: str) -> float:
    """Seconds in a Prometheus duration such as ``5m``, ``1h30m`` or ``500ms``."""
    m = _DURATION.match(duration)
    if not duration or m is None or not any(m.groups()):
        raise ValueError(f"{duration!r} is not a Prometheus duration like 30s, 5m, 1h or 1d")
    return sum(int(g) * unit for g, unit in zip(m.groups(), _DURATION_UNITS, strict=True) if g)


@dataclass(frozen=True, slots=True)
class RuleWindows:
    """Windows, ``for`` durations and thresholds of the generated rules.

    The defaults suit production traffic; tests scale the windows down to
    seconds. Windows appear in recording rule names (``journey:…:5m``).
    """

    # Recent behaviour that alerts look at.
    short: str = "5m"
    # The consistency window (the gauge's default sliding window is 1 h), and how
    # far back "event lag growing" looks.
    long: str = "1h"
    # "Normal" for a drop-off spike, lingering customers and dead letters: a day
    # covers the daily rhythm of shops and campaigns.
    baseline: str = "1d"
    # How long a customer condition must hold: one bad window is not an incident.
    customer_for: str = "5m"
    # Pipeline conditions page sooner: while they last, customer alerts are inhibited.
    pipeline_for: str = "2m"
    # DESIGN's minimum traffic: a channel with fewer exits in the window is not judged.
    min_exits: int = 20
    # Threshold for stages with max_dwell whose journey file sets no dropoff_alert_ratio.
    default_dropoff_ratio: float = 0.5
    # Spike: short-window ratio above factor × its baseline ratio, and above the floor.
    spike_factor: float = 2.0
    spike_floor: float = 0.1
    # Diverging: a channel's progression ratio below factor × the other channels' mean,
    # and at least gap (absolute) below it, so tiny ratios don't alert on noise.
    divergence_factor: float = 0.5
    divergence_gap: float = 0.1
    # Lingering: time-in-stage p90 above factor × its baseline p90.
    lingering_factor: float = 2.0
    # Event lag: p95 above max, or above the floor and factor × the p95 one long window
    # ago (p95 over a long window would itself be swamped within minutes of a rise).
    event_lag_max_seconds: float = 120.0
    event_lag_floor_seconds: float = 30.0
    # Dead letters: more than this fraction of events rejected, or the rejected rate
    # above spike_factor × its baseline; either only with min_dead_letters in the window.
    dead_letter_ratio_max: float = 0.05
    min_dead_letters: int = 20

    def __post_init__(self) -> None:
        seconds = {
            name: prometheus_seconds(getattr(self, name))
            for name in ("short", "long", "baseline", "customer_for", "pipeline_for")
        }
        if not 0 < seconds["short"] < seconds["long"] <= seconds["baseline"]:
            raise ValueError(
                f"windows must grow: short ({self.short}) < long ({self.long}) "
                f"<= baseline ({self.baseline}), all longer than zero"
            )
        if self.min_exits < 1 or self.min_dead_letters < 1:
            raise ValueError("min_exits and min_dead_letters must be at least 1")
        if not 0 < self.default_dropoff_ratio <= 1:
            raise ValueError("default_dropoff_ratio must be in (0, 1]")


# --------------------------------------------------------------------------- names


def dropoff_ratio(window: str) -> str:
    """Dropped exits / all exits per journey, stage and channel over ``window``."""
    return f"journey:stage_dropoff_ratio:{window}"


def dropoff_ratio_all_channels(window: str) -> str:
    return f"journey:stage_dropoff_ratio_all_channels:{window}"


def stage_exits(window: str) -> str:
    """Exits (advanced + dropped) per journey, stage and channel in ``window``."""
    return f"journey:stage_exits:{window}"


def progression_ratio(window: str) -> str:
    return f"journey:stage_progression_ratio:{window}"


def progression_ratio_qualified(window: str) -> str:
    """Progression ratio of the channels with at least the minimum exits."""
    return f"journey:stage_progression_ratio_qualified:{window}"


def progression_ratio_other_channels(window: str) -> str:
    return f"journey:stage_progression_ratio_other_channels:{window}"


def consistency(window: str) -> str:
    """DESIGN's consistency index computed in PromQL from the exits counters."""
    return f"journey:cross_channel_consistency:{window}"


CONSISTENCY_GAUGE = "journey:cross_channel_consistency:max"
DROPOFF_THRESHOLD = "journey:dropoff_alert_ratio"


def time_in_stage_p90(window: str) -> str:
    return f"journey:time_in_stage_p90_seconds:{window}"


def event_lag_p95(window: str) -> str:
    return f"journey:event_lag_p95_seconds:{window}"


def dead_letter_rate(window: str) -> str:
    return f"journey:dead_letter_rate:{window}"


def dead_letter_ratio(window: str) -> str:
    return f"journey:dead_letter_ratio:{window}"


def dead_letters(window: str) -> str:
    return f"journey:dead_letters:{window}"


# --------------------------------------------------------------------------- helpers

JSC = "journey, stage, channel"
JS = "journey, stage"


def _num(x: float) -> str:
    """A PromQL number literal: ``20``, ``0.5``."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _record(name: str, expr: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def _alert(
    name: str,
    expr: str,
    for_: str,
    labels: dict[str, str],
    summary: str,
    description: str,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if prometheus_seconds(for_) > 0:
        rule["for"] = for_
    rule["labels"] = labels
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _query_value(selector: str, fmt: str) -> str:
    """Template text that shows one series' value, e.g. the threshold of this stage."""
    return f"{{{{ with {selector} | query }}}}{{{{ . | first | value | {fmt} }}}}{{{{ end }}}}"


def _per_channel(metric: str) -> str:
    return (
        f'printf "{metric}{{journey=%q,stage=%q,channel=%q}}" '
        "$labels.journey $labels.stage $labels.channel"
    )


def _per_stage(metric: str) -> str:
    return f'printf "{metric}{{journey=%q,stage=%q}}" $labels.journey $labels.stage'


def _sum_rate(selector: str, window: str, by: str) -> str:
    return f"sum by ({by}) (rate({selector}[{window}]))"


def _ratio(part: str, whole: str, window: str, by: str) -> str:
    """part/whole of exits; 0 (not absent) when ``part`` has no series, absent with no exits."""
    num = _sum_rate(part, window, by)
    den = _sum_rate(whole, window, by)
    return f"(\n  {num}\n  or\n  0 * {den}\n)\n/\n({den} > 0)"


def stage_thresholds(
    journeys: Sequence[Journey], windows: RuleWindows = RuleWindows()
) -> list[tuple[str, str, float]]:
    """(journey, stage, ratio) for every stage that can alert on drop-offs.

    An explicit ``dropoff_alert_ratio`` wins; a stage with ``max_dwell`` gets the
    default; a stage nobody can drop from (no max_dwell, e.g. the last) gets none.
    """
    out: list[tuple[str, str, float]] = []
    for journey in journeys:
        for stage in journey.stages:
            ratio = stage.dropoff_alert_ratio
            if ratio is None and stage.max_dwell is not None:
                ratio = windows.default_dropoff_ratio
            if ratio is not None:
                out.append((journey.name, stage.name, ratio))
    return out


# --------------------------------------------------------------------------- rules


def _customer_recording(w: RuleWindows) -> list[dict[str, Any]]:
    exits = "journey_stage_exits_total"
    dropped = 'journey_stage_exits_total{outcome="dropped"}'
    advanced = 'journey_stage_exits_total{outcome="advanced"}'
    rules: list[dict[str, Any]] = []
    for window in (w.short, w.long):
        rules.append(_record(stage_exits(window), f"sum by ({JSC}) (increase({exits}[{window}]))"))
    for window in dict.fromkeys((w.short, w.long, w.baseline)):
        rules.append(_record(dropoff_ratio(window), _ratio(dropped, exits, window, JSC)))
    for window in (w.short, w.long):
        rules.append(
            _record(dropoff_ratio_all_channels(window), _ratio(dropped, exits, window, JS))
        )
    for window in (w.short, w.long):
        rules.append(_record(progression_ratio(window), _ratio(advanced, exits, window, JSC)))
        rules.append(
            _record(
                progression_ratio_qualified(window),
                f"{progression_ratio(window)}\n"
                f"and on ({JSC})\n"
                f"({stage_exits(window)} >= {w.min_exits})",
            )
        )
        q = progression_ratio_qualified(window)
        # DESIGN: 1 − σ/μ over the qualified channels (population σ, unweighted μ),
        # clamped to [0, 1], 1 when μ = 0, and no sample with fewer than two channels.
        rules.append(
            _record(
                consistency(window),
                "(\n"
                "  clamp(\n"
                f"    1 - stddev by ({JS}) ({q}) / (avg by ({JS}) ({q}) > 0),\n"
                "    0, 1\n"
                "  )\n"
                f"  or on ({JS})\n"
                f"  (0 * avg by ({JS}) ({q}) + 1)\n"
                ")\n"
                f"and on ({JS})\n"
                f"(count by ({JS}) ({q}) >= 2)",
            )
        )
    q = progression_ratio_qualified(w.short)
    rules.append(
        _record(
            progression_ratio_other_channels(w.short),
            f"(sum by ({JS}) ({q}) - on ({JS}) group_right {q})\n"
            f"/ on ({JS}) group_left ()\n"
            f"(count by ({JS}) ({q}) - 1 > 0)",
        )
    )
    rules.append(_record(CONSISTENCY_GAUGE, f"max by ({JS}) (journey_cross_channel_consistency)"))
    for window in dict.fromkeys((w.short, w.baseline)):
        bucket = f'journey_time_in_stage_seconds_bucket{{outcome="advanced"}}[{window}]'
        count = f'journey_time_in_stage_seconds_count{{outcome="advanced"}}[{window}]'
        rules.append(
            _record(
                time_in_stage_p90(window),
                f"histogram_quantile(0.9, sum by ({JS}, le) (rate({bucket})))\n"
                f"and on ({JS})\n"
                f"(sum by ({JS}) (rate({count})) > 0)",
            )
        )
    return rules


def _customer_alerts(w: RuleWindows) -> list[dict[str, Any]]:
    labels_crit = {"category": "customers", "severity": "critical"}
    labels_warn = {"category": "customers", "severity": "warning"}
    ratio = dropoff_ratio(w.short)
    volume = f"and on ({JSC})\n{stage_exits(w.short)} >= {w.min_exits}"
    where = "{{ $labels.journey }}/{{ $labels.stage }} on {{ $labels.channel }}"
    pct = "{{ $value | humanizePercentage }}"
    threshold = _query_value(_per_stage(DROPOFF_THRESHOLD), "humanizePercentage")
    baseline = _query_value(_per_channel(dropoff_ratio(w.baseline)), "humanizePercentage")
    others = _query_value(
        _per_channel(progression_ratio_other_channels(w.short)), "humanizePercentage"
    )
    p90_base = _query_value(_per_stage(time_in_stage_p90(w.baseline)), "humanizeDuration")
    return [
        _alert(
            "JourneyStageDropoffHigh",
            f"{ratio}\n> on ({JS}) group_left\n{DROPOFF_THRESHOLD}\n{volume}",
            w.customer_for,
            labels_crit,
            f"{where}: {pct} of exits are drop-offs",
            f"Over the last {w.short}, {pct} of the customers leaving stage "
            "{{ $labels.stage }} of journey {{ $labels.journey }} on channel "
            "{{ $labels.channel }} dropped off instead of advancing; this stage alerts above "
            f"{threshold} (dropoff_alert_ratio in the journey file). Look for a broken "
            "{{ $labels.channel }} touchpoint at this stage.",
        ),
        _alert(
            "JourneyStageDropoffSpike",
            f"{ratio}\n> on ({JSC})\n({_num(w.spike_factor)} * {dropoff_ratio(w.baseline)})\n"
            f"and\n{ratio} > {_num(w.spike_floor)}\n{volume}",
            w.customer_for,
            labels_warn,
            f"{where}: drop-offs jumped to {pct} of exits",
            f"Over the last {w.short}, {pct} of the customers leaving stage "
            "{{ $labels.stage }} of journey {{ $labels.journey }} on channel "
            f"{{{{ $labels.channel }}}} dropped off, against {baseline} over the last "
            f"{w.baseline}: more than {_num(w.spike_factor)}× the usual rate.",
        ),
        _alert(
            "JourneyChannelDiverging",
            f"{progression_ratio_qualified(w.short)}\n"
            f"< on ({JSC})\n"
            f"({_num(w.divergence_factor)} * {progression_ratio_other_channels(w.short)})\n"
            f"and on ({JSC})\n"
            f"{progression_ratio_qualified(w.short)}\n"
            f"< on ({JSC})\n"
            f"({progression_ratio_other_channels(w.short)} - {_num(w.divergence_gap)})",
            w.customer_for,
            labels_warn,
            f"{where}: the channel carries far fewer customers forward than the others",
            f"Over the last {w.short}, channel {{{{ $labels.channel }}}} carried {pct} of the "
            "customers leaving stage {{ $labels.stage }} of journey {{ $labels.journey }} "
            f"forward, while the other channels carried {others} on average (channels with at "
            f"least {w.min_exits} exits). Something on {{{{ $labels.channel }}}} is failing "
            "its customers at this stage.",
        ),
        _alert(
            "JourneyCustomersLingering",
            f"{time_in_stage_p90(w.short)}\n"
            f"> on ({JS})\n"
            f"({_num(w.lingering_factor)} * {time_in_stage_p90(w.baseline)})\n"
            f"and on ({JS})\n"
            f"sum by ({JS}) (\n"
            f'  increase(journey_time_in_stage_seconds_count{{outcome="advanced"}}[{w.short}])\n'
            f") >= {w.min_exits}",
            w.customer_for,
            labels_warn,
            "{{ $labels.journey }}/{{ $labels.stage }}: customers take "
            "{{ $value | humanizeDuration }} to move on",
            f"Over the last {w.short}, 90 % of the customers who advanced from stage "
            "{{ $labels.stage }} of journey {{ $labels.journey }} had spent up to "
            f"{{{{ $value | humanizeDuration }}}} in it, against {p90_base} over the last "
            f"{w.baseline}. Customers are stalling at this stage.",
        ),
    ]


def _pipeline_recording(w: RuleWindows) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    rules.append(
        _record(
            event_lag_p95(w.short),
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(journey_event_lag_seconds_bucket[{w.short}])))\n"
            "and on ()\n"
            f"(sum(rate(journey_event_lag_seconds_count[{w.short}])) > 0)",
        )
    )
    for window in dict.fromkeys((w.short, w.baseline)):
        rules.append(
            _record(dead_letter_rate(window), f"sum(rate(journey_rejected_events_total[{window}]))")
        )
    rules.append(
        _record(dead_letters(w.short), f"sum(increase(journey_rejected_events_total[{w.short}]))")
    )
    rules.append(
        _record(
            dead_letter_ratio(w.short),
            f'(\n  sum(rate(journey_events_total{{outcome="rejected"}}[{w.short}]))\n'
            "  or\n  vector(0)\n)\n"
            f"/\n(sum(rate(journey_events_total[{w.short}])) > 0)",
        )
    )
    return rules


def _pipeline_alerts(w: RuleWindows) -> list[dict[str, Any]]:
    crit = {"category": "pipeline", "severity": "critical"}
    warn = {"category": "pipeline", "severity": "warning"}
    lag = event_lag_p95(w.short)
    by = "job, instance"
    worker = "{{ with $labels.instance }}worker {{ . }}{{ else }}every worker{{ end }}"
    return [
        _alert(
            "JourneyPipelineStalled",
            f"max by ({by}) (journey_consumer_lag_messages) > 0\n"
            f"and on ({by})\n"
            "(\n"
            f"  max by ({by}) (changes(journey_last_batch_timestamp_seconds[{w.short}])) == 0\n"
            f"  or on ({by})\n"
            f"  max by ({by}) (journey_consumer_lag_messages)\n"
            f"  unless on ({by}) journey_last_batch_timestamp_seconds\n"
            ")",
            w.pipeline_for,
            crit,
            "Worker {{ $labels.instance }} has {{ $value }} messages waiting and processes none",
            "Worker {{ $labels.instance }} has {{ $value }} unconsumed messages on its "
            f"partitions but processed no batch in the last {w.short}. It is probably "
            "retrying a service that is down (see journey_sink_errors_total) or stuck; "
            "customer alerts are held back while this fires.",
        ),
        _alert(
            "JourneyEventLagHigh",
            f"{lag} > {_num(w.event_lag_max_seconds)}\n"
            "or\n"
            "(\n"
            f"  {lag} > {_num(w.spike_factor)} * ({lag} offset {w.long})\n"
            "  and\n"
            f"  {lag} > {_num(w.event_lag_floor_seconds)}\n"
            ")",
            w.pipeline_for,
            warn,
            "Events reach the journey state {{ $value | humanizeDuration }} after they happen "
            "(p95)",
            f"The 95th percentile of event time → processed over the last {w.short} is "
            "{{ $value | humanizeDuration }} (alert above "
            f"{_num(w.event_lag_max_seconds)}s, or above {_num(w.event_lag_floor_seconds)}s "
            f"and {_num(w.spike_factor)}× what it was {w.long} ago). Drop-offs are noticed late; "
            "a replay of old events also raises it.",
        ),
        _alert(
            "JourneyDeadLettersRising",
            "(\n"
            f"  {dead_letter_ratio(w.short)} > {_num(w.dead_letter_ratio_max)}\n"
            "  or\n"
            f"  {dead_letter_rate(w.short)} > {_num(w.spike_factor)} * "
            f"{dead_letter_rate(w.baseline)}\n"
            ")\n"
            "and on ()\n"
            f"{dead_letters(w.short)} >= {w.min_dead_letters}",
            w.pipeline_for,
            warn,
            "Rejected events are rising: "
            + _query_value(f'"{dead_letter_ratio(w.short)}"', "humanizePercentage")
            + " of events",
            f"Over the last {w.short}, "
            + _query_value(f'"{dead_letters(w.short)}"', 'printf "%.0f"')
            + " events went to journey.events.rejected ("
            + _query_value(f'"{dead_letter_ratio(w.short)}"', "humanizePercentage")
            + " of all events; alert above "
            + f"{_num(w.dead_letter_ratio_max * 100)} % or {_num(w.spike_factor)}× the rate of "
            + f"the last {w.baseline}). journey_rejected_events_total and ClickHouse "
            + "journey.rejected_events say which reason; a producer probably changed its "
            + "payloads.",
        ),
        _alert(
            "JourneyDependencyDown",
            f"min by ({by}, service) (journey_dependency_up) == 0",
            w.pipeline_for,
            crit,
            "Worker {{ $labels.instance }} is waiting for {{ $labels.service }}",
            "Calls from worker {{ $labels.instance }} to {{ $labels.service }} fail and are "
            "being retried: it consumes nothing meanwhile (no event is dropped; they wait in "
            "Kafka). Its /healthz names the service and since when; journey_sink_errors_total "
            "counts the attempts. Customer alerts are held back while this fires.",
        ),
        _alert(
            "JourneyWorkerDown",
            f'up{{job="{WORKER_JOB}"}} == 0\nor\nabsent(up{{job="{WORKER_JOB}"}})',
            w.pipeline_for,
            crit,
            f"{worker} of {WORKER_JOB} cannot be scraped",
            f"Prometheus cannot scrape {worker} of job {WORKER_JOB}. Its partitions "
            "are not processed until Kafka's group moves them to another worker; "
            "customer alerts are held back while this fires.",
        ),
    ]


def generate_rules(
    journeys: Sequence[Journey], windows: RuleWindows = RuleWindows()
) -> dict[str, Any]:
    """The rules document: customer rules (thresholds first) and pipeline rules.

    Recording rules come before the alerts that read them in the same group,
    because a group evaluates its rules in order.
    """
    thresholds = [
        _record(
            DROPOFF_THRESHOLD,
            f"vector({_num(ratio)})",
            {"journey": journey, "stage": stage},
        )
        for journey, stage, ratio in stage_thresholds(journeys, windows)
    ]
    return {
        "groups": [
            {
                "name": "journey-customers",
                "rules": [
                    *thresholds,
                    *_customer_recording(windows),
                    *_customer_alerts(windows),
                ],
            },
            {
                "name": "journey-pipeline",
                "rules": [*_pipeline_recording(windows), *_pipeline_alerts(windows)],
            },
        ]
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL as literal blocks, and no anchors for repeated label maps."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_str(data)


_Dumper.add_representer(str, _represent_str)


def render_rules(
    journeys: Sequence[Journey] | None = None, windows: RuleWindows = RuleWindows()
) -> str:
    """The rules file's text: a header, then the document in a stable order."""
    journeys = default_journeys() if journeys is None else journeys
    header = (
        "# Generated by `journey rules` from the journey definitions: do not edit by hand.\n"
        f"# Regenerate: journey rules [--journeys FILE] -o {RULES_PATH}\n"
        f"# Windows: short {windows.short}, long {windows.long}, baseline {windows.baseline}; "
        f"a channel counts with at least {windows.min_exits} exits.\n"
    )
    body = yaml.dump(
        generate_rules(journeys, windows),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=1000,
    )
    return header + body


__all__ = [
    "CONSISTENCY_GAUGE",
    "DROPOFF_THRESHOLD",
    "RULES_PATH",
    "RuleWindows",
    "consistency",
    "dead_letter_rate",
    "dead_letter_ratio",
    "dropoff_ratio",
    "dropoff_ratio_all_channels",
    "event_lag_p95",
    "generate_rules",
    "progression_ratio",
    "progression_ratio_other_channels",
    "progression_ratio_qualified",
    "prometheus_seconds",
    "render_rules",
    "stage_exits",
    "stage_thresholds",
    "time_in_stage_p90",
]
