"""observe_many against prometheus_client's own observe(), value for value."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from pipeline.metrics import LAG_BUCKETS, observe_many

# Values on the bucket bounds themselves, where <= matters, as well as between them.
values = st.lists(
    st.one_of(
        st.sampled_from([b for b in LAG_BUCKETS if math.isfinite(b)] + [0.0]),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
    ),
    max_size=200,
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(values, values)
def test_observe_many_counts_what_observe_counts(first: list[float], second: list[float]) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", ["channel"], buckets=LAG_BUCKETS, registry=one)
    h2 = Histogram("h", "h", ["channel"], buckets=LAG_BUCKETS, registry=many)
    plain1 = Histogram("p", "p", buckets=LAG_BUCKETS, registry=one)
    plain2 = Histogram("p", "p", buckets=LAG_BUCKETS, registry=many)
    for channel, batch in (("web", first), ("app", second)):
        child = h1.labels(channel)
        for v in batch:
            child.observe(v)
            plain1.observe(v)
        observe_many(h2.labels(channel), batch)
        observe_many(plain2, batch)
    got, expected = samples(many), samples(one)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), key
