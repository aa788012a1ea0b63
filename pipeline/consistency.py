"""The cross-channel consistency index of a stage (DESIGN, "Cross-channel consistency").

Pure on purpose: the live gauge, the ClickHouse report and the tests compute
the index from the same per-channel counts with the same code. The report's
pure-SQL twin (``pipeline.report.CONSISTENCY_SQL``) is tested against this.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

# Fewer exits than this in the window and a channel's ratio is noise, not signal.
MIN_EXITS = 20


def progression_ratios(counts: Mapping[str, tuple[int, int]], min_exits: int) -> dict[str, float]:
    """Advanced / all exits per channel, for channels with at least ``min_exits`` exits.

    ``counts`` maps a channel to ``(advanced, exits)``. A channel with no exits
    has no ratio even when ``min_exits`` is 0, rather than a division by zero.
    """
    return {
        channel: advanced / exits
        for channel, (advanced, exits) in counts.items()
        if exits >= min_exits and exits > 0
    }


def consistency_index(
    counts: Mapping[str, tuple[int, int]], min_exits: int = MIN_EXITS
) -> float | None:
    """``1 − σ/μ`` of the eligible channels' ratios, clamped to [0, 1]; 1 when μ = 0.

    None with fewer than two eligible channels: one channel cannot be
    inconsistent with itself, and a made-up value would look like a measurement.
    """
    ratios = list(progression_ratios(counts, min_exits).values())
    if len(ratios) < 2:
        return None
    mean = statistics.fmean(ratios)
    if mean == 0:
        return 1.0
    # pstdev works on exact fractions: equal ratios give exactly 0, never a float crumb.
    index = 1.0 - statistics.pstdev(ratios) / mean
    return min(1.0, max(0.0, index))
