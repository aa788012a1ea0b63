"""The cross-channel consistency index: pure, so pinned down by properties and examples."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.consistency import MIN_EXITS, consistency_index, progression_ratios

CHANNELS = ["web", "app", "store", "email", "call_center", "social", "kiosk", "partner"]


@st.composite
def channel_counts(draw: st.DrawFn, max_exits: int = 200) -> dict[str, tuple[int, int]]:
    """Per-channel (advanced, exits) with 0 ≤ advanced ≤ exits."""
    names = draw(st.lists(st.sampled_from(CHANNELS), unique=True, max_size=len(CHANNELS)))
    counts = {}
    for name in names:
        exits = draw(st.integers(0, max_exits))
        counts[name] = (draw(st.integers(0, exits)), exits)
    return counts


def test_default_minimum_is_the_design_default() -> None:
    """DESIGN: channels with fewer than 20 exits in the window are left out."""
    assert MIN_EXITS == 20


@given(channel_counts(), st.integers(0, 100))
def test_index_is_within_bounds_or_absent(counts: dict[str, tuple[int, int]], minimum: int) -> None:
    """The index is in [0, 1], or None exactly when fewer than two channels qualify."""
    index = consistency_index(counts, minimum)
    eligible = progression_ratios(counts, minimum)
    if len(eligible) < 2:
        assert index is None
    else:
        assert index is not None
        assert 0.0 <= index <= 1.0


@given(
    st.integers(2, len(CHANNELS)),
    st.integers(1, 50),
    st.integers(0, 50),
    st.integers(1, 20),
)
def test_equal_ratios_give_one(channels: int, scale_step: int, advanced: int, base: int) -> None:
    """Channels that carry people forward equally well are perfectly consistent."""
    exits = advanced + base
    counts = {
        CHANNELS[i]: (advanced * (1 + i * scale_step), exits * (1 + i * scale_step))
        for i in range(channels)
    }
    assert consistency_index(counts, min_exits=0) == 1.0


@given(channel_counts())
def test_all_zero_ratios_give_one(counts: dict[str, tuple[int, int]]) -> None:
    """μ = 0 (nobody advanced anywhere) is consistent, not a division by zero."""
    zeroed = {c: (0, exits) for c, (_, exits) in counts.items()}
    index = consistency_index(zeroed, min_exits=1)
    assert index is None or index == 1.0


@given(channel_counts(), st.integers(1, 100))
def test_fewer_than_two_eligible_channels_have_no_index(
    counts: dict[str, tuple[int, int]], minimum: int
) -> None:
    """Keeping one eligible channel at most leaves the stage without an index."""
    kept = dict(list(progression_ratios(counts, minimum).items())[:1])
    small = {c: counts[c] for c in kept} | {
        c: (min(a, minimum - 1), minimum - 1) for c, (a, e) in counts.items() if c not in kept
    }
    assert consistency_index(small, minimum) is None


@given(channel_counts(), channel_counts(max_exits=19))
def test_channels_under_the_minimum_never_change_the_result(
    counts: dict[str, tuple[int, int]], small: dict[str, tuple[int, int]]
) -> None:
    """Adding channels with fewer exits than the minimum changes nothing."""
    extra = {f"small-{c}": v for c, v in small.items()}
    assert consistency_index({**counts, **extra}) == consistency_index(counts)


@given(channel_counts(), st.randoms(use_true_random=False))
def test_symmetric_under_channel_renaming_and_order(
    counts: dict[str, tuple[int, int]], rnd: random.Random
) -> None:
    """Only the ratios matter, not which channel has which or in what order they come."""
    names = list(counts)
    renamed = list(names)
    rnd.shuffle(renamed)
    items = list(zip(renamed, counts.values(), strict=True))
    rnd.shuffle(items)
    before = consistency_index(counts, min_exits=5)
    after = consistency_index(dict(items), min_exits=5)
    if before is None:
        assert after is None
    else:
        assert after == pytest.approx(before, abs=1e-12)


def test_hand_computed_example() -> None:
    """web 30/40, app 10/40, store 20/25 → ratios 0.75, 0.25, 0.8; email 5 exits left out."""
    counts = {"web": (30, 40), "app": (10, 40), "store": (20, 25), "email": (5, 5)}
    assert progression_ratios(counts, 20) == {"web": 0.75, "app": 0.25, "store": 0.8}
    # μ = 0.6; deviations 0.15, −0.35, 0.2; σ² = (0.0225 + 0.1225 + 0.04) / 3 = 0.185 / 3
    expected = 1 - math.sqrt(0.185 / 3) / 0.6
    assert consistency_index(counts) == pytest.approx(expected, abs=1e-9)
    assert consistency_index(counts) == pytest.approx(0.586120433, abs=1e-9)


@pytest.mark.parametrize(
    ("counts", "minimum", "expected"),
    [
        ({}, 20, None),
        ({"web": (10, 20)}, 20, None),
        ({"web": (10, 20), "app": (10, 19)}, 20, None),
        ({"web": (10, 20), "app": (0, 20)}, 20, 0.0),  # σ = μ = 0.25: the index is 0
        ({"web": (20, 20), "app": (0, 20), "store": (0, 20)}, 20, 0.0),  # 1 − √2 clamped to 0
        ({"web": (0, 20), "app": (0, 30)}, 20, 1.0),  # μ = 0
        ({"web": (0, 0), "app": (0, 0)}, 0, None),  # no exits: no ratio, even at minimum 0
    ],
)
def test_edge_cases(
    counts: dict[str, tuple[int, int]], minimum: int, expected: float | None
) -> None:
    """Clamping, μ = 0, and too few channels, each at its edge."""
    assert consistency_index(counts, minimum) == expected
