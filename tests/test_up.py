"""`journey up`'s live view, rendered from samples as the worker and Prometheus give them."""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console

from pipeline.journeys import default_journeys
from pipeline.up import Samples, render


def sample(name: str, value: float, **labels: str) -> Samples:
    return {(name, tuple(sorted(labels.items()))): value}


def test_view_shows_dropoffs_consistency_and_firing_alerts() -> None:
    stage = {"journey": "retail", "stage": "consideration"}
    before = {
        **sample("journey_dropoffs_total", 10, **stage, channel="app"),
        **sample("journey_stage_entries_total", 0, **stage, channel="web"),
    }
    now = {
        **sample("journey_dropoffs_total", 40, **stage, channel="app"),
        **sample("journey_stage_entries_total", 60, **stage, channel="web"),
        **sample("journey_cross_channel_consistency", 0.4321, **stage),
        **sample("journey_events_total", 100, channel="web", outcome="accepted"),
    }
    history: deque[tuple[float, Samples]] = deque([(time.monotonic() - 60, before)])
    alerts = [{"alertname": "JourneyChannelDiverging", **stage, "channel": "app"}]
    console = Console(width=200, record=True)
    console.print(
        render(
            default_journeys(),
            {("retail", "consideration"): 7},
            now,
            history,
            ["web", "app"],
            "up 60 s",
            alerts,
        )
    )
    text = console.export_text()
    row = next(line for line in text.splitlines() if "consideration" in line and "│" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    # stage, customers now, bar, entries/min, web, app, drop-offs/min, consistency
    assert cells[0] == "consideration" and cells[1] == "7"
    assert cells[-2] == "30" and cells[-1] == "0.43"
    assert "JourneyChannelDiverging journey=retail stage=consideration channel=app" in text
    advocacy = next(line for line in text.splitlines() if "advocacy" in line)
    assert advocacy.rstrip(" │").endswith("–")  # no index, and nobody drops from the last stage


def test_view_without_prometheus_has_no_alert_panel() -> None:
    console = Console(width=200, record=True)
    console.print(render(default_journeys(), {}, None, deque(), ["web"], "waiting", None))
    assert "alerts" not in console.export_text()
