"""Rehearsing an incident locally: everything scaled from days to seconds, consistently.

The journey (dwell of seconds), the simulated customers (ten times quicker)
and the alert rules (windows of seconds, more volume required because the
windows hold fewer customers) are scaled together here, so `journey up
--rehearse` and the end-to-end alert test run the same thing.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.alerting import RuleWindows

REHEARSAL_JOURNEY = Path(__file__).parent / "data" / "rehearsal_journey.yaml"
TIME_SCALE = 0.1
# Enough traffic that a healthy channel's ratio over 30 s is steady: calibrated
# on the simulator (no false alert over many seeds at RATE with MIN_EXITS).
RATE = 100.0
WINDOWS = RuleWindows(
    short="30s", long="1m", baseline="2m", customer_for="5s", pipeline_for="10s", min_exits=60
)
ALLOWED_LATENESS_SECONDS = 1.0
SWEEP_SECONDS = 0.5
