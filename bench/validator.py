"""Event validator: which schema check decides validity fastest on the real event mix.

Reproduce (from the project root, after ./scripts/setup.sh):

    .venv/bin/python bench/validator.py                    # 20,000 events, 1% bad, best of 5
    .venv/bin/python bench/validator.py --events 100000 --bad 0.01 --rounds 7

The mix is simulator traffic (the same generator `journey simulate` uses)
with about ``--bad`` of it broken the ways real producers break it: a
missing or placeholder id, a timestamp without offset or from the future, an
unknown channel or field, a nested property, a wrong type, bytes that are not
JSON. Every candidate runs in this one process on the same list, so the
ratios hold even though the machine is shared.

Two figures per candidate:

- ``check``: the schema decision alone, on already-parsed events (what the
  candidate would replace of ``best_match(iter_errors(...))``);
- ``decode``: ``Validator.decode`` end to end (bytes → Event or Rejection)
  with the candidate as its fast path, jsonschema still explaining every
  rejection. Candidates that parse bytes themselves have no decode figure.

``disagree`` counts events of the mix on which the candidate's verdict is not
jsonschema's; ``differs``, those whose decode result (Event, or Rejection code
and reason) is not what today's validator returns. Candidates whose package
is not installed are skipped: only fastjsonschema is a project dependency;
``.venv/bin/pip install msgspec pydantic`` to compare the others. Results
are printed and written to bench/results/validator.json.
"""

import argparse
import json
import platform
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import orjson
from jsonschema.exceptions import best_match

from pipeline.events import (
    Rejection,
    Validator,
    _compile_fast_check,
    _ecma_regex,
    load_schema,
)
from pipeline.simulate import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "validator.json"
COMMAND = ".venv/bin/python bench/validator.py"

Check = Callable[[object], bool]


# --- the event mix ------------------------------------------------------------------------


def _break(event: dict[str, Any], rng: random.Random, now: float) -> bytes:
    """One realistic fault in an otherwise good simulator event."""
    bad = dict(event)
    fault = rng.randrange(12)
    if fault == 0:
        bad.pop("customer_id", None)
        bad.pop("anonymous_id", None)
    elif fault == 1:
        bad["customer_id"] = "undefined"
        bad.pop("anonymous_id", None)
    elif fault == 2:
        bad["occurred_at"] = bad["occurred_at"].replace("Z", "").replace("+00:00", "")
    elif fault == 3:
        bad["occurred_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 5 * 86_400))
    elif fault == 4:
        bad["channel"] = "kiosk"
    elif fault == 5:
        bad["customer_email"] = "someone@example.com"
    elif fault == 6:
        bad["properties"] = {**bad.get("properties", {}), "items": [{"sku": "A1", "qty": 2}]}
    elif fault == 7:
        bad["schema_version"] = "1"
    elif fault == 8:
        bad["event_type"] = "Add To Cart"
    elif fault == 9:
        bad["occurred_at"] = int(now)
    elif fault == 10:
        bad["event_id"] = ""
    else:
        return orjson.dumps(bad)[:-7]  # a truncated request body
    return orjson.dumps(bad)


def event_mix(count: int, bad_share: float, seed: int, now: float) -> list[bytes]:
    """``count`` simulator events (the last hour up to ``now``), ``bad_share`` of them broken."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for event, _ in zip(generate(rng, now - 3600, 50, None), range(count), strict=False):
        out.append(_break(event, rng, now) if rng.random() < bad_share else orjson.dumps(event))
    return out


# --- candidates ---------------------------------------------------------------------------

_SCHEMA = load_schema()
_PROPS = _SCHEMA["properties"]
_OCCURRED = _ecma_regex(_PROPS["occurred_at"]["pattern"]).pattern
_EVENT_TYPE = _ecma_regex(_PROPS["event_type"]["pattern"]).pattern


def jsonschema_check() -> Check:
    """What decode does today: collect the errors and pick the best one."""
    validator = Validator(fast=False)._validator
    return lambda obj: best_match(validator.iter_errors(obj)) is None


def jsonschema_is_valid() -> Check:
    """jsonschema's own yes/no (stops at the first error, builds no reason)."""
    return Validator(fast=False)._validator.is_valid  # type: ignore[no-any-return]


def fastjsonschema_check() -> Check:
    """The chosen fast path: fastjsonschema compiled from the packaged schema."""
    check = _compile_fast_check(load_schema())
    assert check is not None
    return check


_REQUIRED = frozenset(_SCHEMA["required"])
_KNOWN = frozenset(_PROPS)
_OCC_RE = re.compile(_OCCURRED)
_TYPE_RE = re.compile(_EVENT_TYPE)
_SCALARS = (str, int, float, bool, type(None))


def hand_check(obj: object) -> bool:
    """A hand-written copy of schema v1 (limits taken from the schema, structure by hand)."""
    if type(obj) is not dict:
        return False
    keys = obj.keys()
    if not keys >= _REQUIRED or not keys <= _KNOWN:
        return False
    if "customer_id" not in obj and "anonymous_id" not in obj:
        return False
    for name in ("event_id", "customer_id", "anonymous_id"):
        if name in obj:
            value = obj[name]
            if type(value) is not str or not 1 <= len(value) <= 128:
                return False
    for name in ("touchpoint", "source"):
        if name in obj:
            value = obj[name]
            if type(value) is not str or len(value) > 128:
                return False
    occurred, event_type, version = obj["occurred_at"], obj["event_type"], obj["schema_version"]
    if type(occurred) is not str or _OCC_RE.search(occurred) is None:
        return False
    if type(event_type) is not str or _TYPE_RE.search(event_type) is None:
        return False
    if type(obj["channel"]) is not str:
        return False
    if type(version) not in (int, float) or version != 1:
        return False
    if "properties" in obj:
        props = obj["properties"]
        if type(props) is not dict or len(props) > 64:
            return False
        for key, value in props.items():
            if type(key) is str and not 1 <= len(key) <= 128:
                return False
            kind = type(value)
            if kind not in _SCALARS or (kind is str and len(value) > 1024):
                return False
    return True


def msgspec_checks() -> tuple[Check, Callable[[bytes], bool]] | None:
    """msgspec Structs written from schema v1 (it cannot read JSON Schema), plus anyOf/const."""
    try:
        import msgspec
    except ImportError:
        return None
    from msgspec import UNSET, Meta, Struct, UnsetType

    id_ = Annotated[str, Meta(min_length=1, max_length=128)]
    short = Annotated[str, Meta(max_length=128)]
    value = Annotated[str, Meta(max_length=1024)] | int | float | bool | None
    props_t = Annotated[dict[id_, value], Meta(max_length=64)]

    class MsEvent(Struct, forbid_unknown_fields=True):  # type: ignore[call-arg,misc,unused-ignore]
        event_id: id_
        occurred_at: Annotated[str, Meta(pattern=_OCCURRED)]
        channel: str
        event_type: Annotated[str, Meta(pattern=_EVENT_TYPE)]
        schema_version: int | float
        customer_id: id_ | UnsetType = UNSET
        anonymous_id: id_ | UnsetType = UNSET
        touchpoint: short | UnsetType = UNSET
        source: short | UnsetType = UNSET
        properties: props_t | UnsetType = UNSET

    def post(event: MsEvent) -> bool:
        has_id = event.customer_id is not UNSET or event.anonymous_id is not UNSET
        return has_id and event.schema_version == 1

    decoder = msgspec.json.Decoder(MsEvent)

    def from_dict(obj: object) -> bool:
        try:
            return post(msgspec.convert(obj, MsEvent, strict=True))
        except (msgspec.ValidationError, TypeError):
            return False

    def from_bytes(raw: bytes) -> bool:
        try:
            return post(decoder.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return False

    return from_dict, from_bytes


def pydantic_checks() -> tuple[Check, Callable[[bytes], bool]] | None:
    """A strict pydantic v2 model written from schema v1, plus anyOf/const."""
    try:
        from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
    except ImportError:
        return None

    id_ = Annotated[str, StringConstraints(min_length=1, max_length=128)]
    short = Annotated[str, StringConstraints(max_length=128)]
    value = Annotated[str, StringConstraints(max_length=1024)] | int | float | bool | None

    class PydEvent(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid", regex_engine="python-re")
        event_id: id_
        occurred_at: Annotated[str, StringConstraints(pattern=_OCCURRED)]
        channel: str
        event_type: Annotated[str, StringConstraints(pattern=_EVENT_TYPE)]
        schema_version: float
        customer_id: id_ | None = Field(default=None)
        anonymous_id: id_ | None = Field(default=None)
        touchpoint: short | None = None
        source: short | None = None
        properties: Annotated[dict[id_, value], Field(max_length=64)] = Field(default_factory=dict)

    def post(event: PydEvent) -> bool:
        fields = event.model_fields_set
        has_id = ("customer_id" in fields and event.customer_id is not None) or (
            "anonymous_id" in fields and event.anonymous_id is not None
        )
        return has_id and event.schema_version == 1

    def from_dict(obj: object) -> bool:
        try:
            return post(PydEvent.model_validate(obj))
        except ValidationError:
            return False

    def from_bytes(raw: bytes) -> bool:
        try:
            return post(PydEvent.model_validate_json(raw))
        except ValidationError:
            return False

    return from_dict, from_bytes


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    check_us: float | None
    decode_us: float | None
    check_speedup: float | None = None
    decode_speedup: float | None = None
    disagree: int = 0
    decode_differs: int = 0
    note: str = ""


def best_us(func: Callable[[Any], object], items: Sequence[Any], rounds: int) -> float:
    """Best of ``rounds`` passes, µs per item: the least disturbed by the other work here."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for item in items:
            func(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def _with_fast_path(check: Check | None) -> Validator:
    """A Validator whose fast path is ``check`` (None: jsonschema alone, as before)."""
    validator = Validator(fast=False)
    validator._fast = check
    return validator


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--bad", type=float, default=0.01, help="share of broken events")
    parser.add_argument("--rounds", type=int, default=5, help="passes per figure; best is kept")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    now = time.time()
    mix = event_mix(args.events, args.bad, args.seed, now)
    loaded = _loads(mix)  # None where the bytes are not JSON (orjson cannot produce a None event)
    parsed = [obj for obj in loaded if obj is not None]
    reference = jsonschema_check()
    truth = [reference(obj) for obj in parsed]
    byte_truth = [obj is not None and reference(obj) for obj in loaded]
    today = Validator(fast=False)
    outcomes = [today.decode(raw, now) for raw in mix]
    rejected = sum(1 for o in outcomes if isinstance(o, Rejection))

    candidates: list[tuple[str, Check, Callable[[bytes], bool] | None, str]] = [
        ("jsonschema (today)", reference, None, "iter_errors + best_match"),
        ("jsonschema is_valid", jsonschema_is_valid(), None, "yes/no only"),
        ("fastjsonschema", fastjsonschema_check(), None, "compiled from the packaged schema"),
        ("hand-written", hand_check, None, "a second copy of the schema's rules"),
    ]
    ms = msgspec_checks()
    if ms is not None:
        candidates.append(("msgspec convert", ms[0], ms[1], "Struct written by hand"))
    pd = pydantic_checks()
    if pd is not None:
        candidates.append(("pydantic strict", pd[0], pd[1], "model written by hand"))

    rows: list[Row] = []
    for name, check, from_bytes, note in candidates:
        disagree = sum(1 for obj, ok in zip(parsed, truth, strict=True) if check(obj) != ok)
        validator = _with_fast_path(None if check is reference else check)
        differs = sum(
            1 for raw, out in zip(mix, outcomes, strict=True) if validator.decode(raw, now) != out
        )
        row = Row(
            name,
            best_us(check, parsed, args.rounds),
            best_us(partial(validator.decode, now=now), mix, args.rounds),
            disagree=disagree,
            decode_differs=differs,
            note=note,
        )
        rows.append(row)
        if from_bytes is not None:
            rows.append(
                Row(
                    name.split()[0] + " parse+check",
                    best_us(from_bytes, mix, args.rounds),
                    None,
                    disagree=sum(
                        1 for raw, ok in zip(mix, byte_truth, strict=True) if from_bytes(raw) != ok
                    ),
                    note="parses bytes itself: replaces orjson, so not a drop-in fast path",
                )
            )
    base = rows[0]
    for row in rows:
        if row.check_us and base.check_us:
            row.check_speedup = base.check_us / row.check_us
        if row.decode_us and base.decode_us:
            row.decode_speedup = base.decode_us / row.decode_us

    print(f"{len(mix)} events, {rejected} rejected by today's validator; reproduce: {COMMAND}")
    header = (
        f"{'candidate':<28}{'check µs':>10}{'×':>7}{'decode µs':>11}{'×':>7}"
        f"{'disagree':>10}{'differs':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row.name:<28}{_fmt(row.check_us, 10, 2)}{_fmt(row.check_speedup, 7, 1)}"
            f"{_fmt(row.decode_us, 11, 2)}{_fmt(row.decode_speedup, 7, 1)}{row.disagree:>10}"
            f"{row.decode_differs:>9}"
        )
    result = {
        "command": COMMAND,
        "events": len(mix),
        "bad_share": args.bad,
        "rejected": rejected,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "versions": {
            dist: _version(dist)
            for dist in ("jsonschema", "fastjsonschema", "msgspec", "pydantic", "orjson")
        },
        "rows": [asdict(row) for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


def _loads(mix: Sequence[bytes]) -> list[object]:
    out: list[object] = []
    for raw in mix:
        try:
            out.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            out.append(None)
    return out


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'–':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


if __name__ == "__main__":
    main()
