"""`journey report`'s funnel, computed by ClickHouse (chDB) from known transitions."""

from __future__ import annotations

from pathlib import Path

import clickhouse_connect
import pytest

from pipeline.journeys import default_journeys
from pipeline.report import REPORT_END, REPORT_START, funnel
from pipeline.sinks.clickhouse import ClickHouseSink, transition_row
from pipeline.stages import Transition

pytestmark = pytest.mark.services


def t(customer: str, from_stage: str | None, to_stage: str, kind: str, channel: str,
      at: float) -> Transition:  # fmt: skip
    return Transition("retail", customer, from_stage, to_stage, kind, channel, f"{customer}-{at}",
                      at, 0.0)  # fmt: skip


async def test_funnel_counts_skips_as_reached_and_splits_by_channel(chdb_path: Path) -> None:
    """A walk-in purchase counts as reaching awareness and consideration too."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    rows = [
        t("a", None, "awareness", "entered", "web", 1_700_000_000),
        t("a", "awareness", "consideration", "advanced", "app", 1_700_000_100),
        t("b", None, "awareness", "entered", "web", 1_700_000_000),
        t("c", None, "purchase", "entered", "store", 1_700_000_000),
        t("d", None, "consideration", "entered", "email", 1_700_000_000),
    ]
    sink.add_transitions([transition_row(r) for r in rows])
    await sink.flush()
    await sink.close()

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}")

    (journey,) = default_journeys()
    result = funnel(client, journey, REPORT_START, REPORT_END)
    by_stage = {s.stage: s for s in result.stages}
    assert [by_stage[n].entered for n in journey.stage_names] == [2, 2, 1, 0, 0]
    assert [by_stage[n].reached for n in journey.stage_names] == [4, 3, 1, 0, 0]
    assert by_stage["awareness"].conversion is None
    assert by_stage["consideration"].conversion == pytest.approx(3 / 4)
    assert by_stage["purchase"].conversion == pytest.approx(1 / 3)
    assert by_stage["retention"].conversion == 0.0
    assert by_stage["consideration"].by_channel == {"app": 1, "email": 1}
    assert by_stage["purchase"].by_channel == {"store": 1}
    client.close()
