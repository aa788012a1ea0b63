"""Journey definitions: the YAML contract, its validation, and event → stage matching.

Everything here is pure except ``load_journeys``, which reads the file. A bad
file must stop start-up with the file, the line and the problem, so the YAML
is composed into nodes (which keep their marks) and every schema or semantic
error is located by walking those nodes along the error's path.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

Scalar = str | int | float | bool | None
Properties = Mapping[str, Scalar]
DwellFrom = Literal["entered", "last_activity"]
Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in"]
KpiKind = Literal["count", "customers", "sum", "avg", "flow", "survey", "ratio"]
KpiUnit = Literal["number", "percent", "seconds"]
Better = Literal["higher", "lower"]

DEFAULT_SOURCE = "pipeline/data/default_journey.yaml"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^([0-9]+)([smhd])$")


class JourneyFileError(ValueError):
    """A journey file that must not start the pipeline; says where and why."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        where = source if line is None else f"{source}, line {line}"
        super().__init__(f"{where}: {problem}")


def parse_duration(text: str) -> float:
    """Seconds in a ``<n><unit>`` duration (units s, m, h, d), as the file format writes them."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _kind(value: object) -> str | None:
    """Type families that compare meaningfully; bool is not a number here (True != 1)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    return None


def _same(a: object, b: object) -> bool:
    k = _kind(a)
    return k is not None and k == _kind(b) and a == b


@dataclass(frozen=True, slots=True)
class Condition:
    """One comparison on an event property; false (never an error) when it cannot be judged."""

    prop: str
    op: Op
    value: Scalar | tuple[Scalar, ...]

    def holds(self, properties: Properties) -> bool:
        if self.prop not in properties:
            return False
        actual = properties[self.prop]
        expected = self.value
        if self.op == "in":
            assert isinstance(expected, tuple)
            return any(_same(actual, v) for v in expected)
        if isinstance(expected, tuple):
            return False
        kind = _kind(actual)
        if kind is None or kind != _kind(expected):
            return False
        if self.op == "eq":
            return actual == expected
        if self.op == "ne":
            return actual != expected
        if kind not in ("number", "str"):
            return False
        a = cast(float | str, actual)
        b = cast(float | str, expected)
        try:
            if self.op == "gt":
                return a > b  # type: ignore[operator]
            if self.op == "gte":
                return a >= b  # type: ignore[operator]
            if self.op == "lt":
                return a < b  # type: ignore[operator]
            if self.op == "lte":
                return a <= b  # type: ignore[operator]
        except TypeError:
            return False
        return False


@dataclass(frozen=True, slots=True)
class EventRule:
    event_type: str
    conditions: tuple[Condition, ...] = ()

    def holds(self, properties: Properties) -> bool:
        return all(c.holds(properties) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class Kpi:
    """One measure a stage is judged by (``kpis:`` in the file); pipeline/scorecard.py computes it.

    ``kind`` says which fields matter: ``event_types`` for count and customers,
    plus ``prop`` for sum and avg; ``measure`` and ``stage`` for flow and
    survey (``stage`` None on a survey: answers from any stage); ``operands``
    (two other non-ratio KPIs of the stage) for ratio.
    """

    name: str
    kind: KpiKind
    event_types: tuple[str, ...] = ()
    prop: str | None = None
    measure: str | None = None
    stage: str | None = None
    operands: tuple[str, str] | None = None
    unit: KpiUnit = "number"
    better: Better = "higher"


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    index: int
    rules: tuple[EventRule, ...]
    max_dwell: float | None = None
    dwell_from: DwellFrom = "entered"
    # Drop-off ratio above which the generated Prometheus rules alert; None: the
    # generator's default for stages with max_dwell (see pipeline/alerting.py).
    dropoff_alert_ratio: float | None = None
    kpis: tuple[Kpi, ...] = ()


SCORE_COMPONENTS = ("conversion", "dropoff", "time_to_goal", "satisfaction")


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each score component counts; only their proportions matter."""

    conversion: float
    dropoff: float
    time_to_goal: float
    satisfaction: float

    def as_dict(self) -> dict[str, float]:
        return {c: float(getattr(self, c)) for c in SCORE_COMPONENTS}


# Conversion to the goal matters most; the other three share the rest evenly.
DEFAULT_WEIGHTS = Weights(conversion=0.4, dropoff=0.2, time_to_goal=0.2, satisfaction=0.2)


@dataclass(frozen=True, slots=True)
class ScoreSpec:
    """How a journey is scored (``score:`` in the file, defaults filled in by ``Journey.scoring``).

    ``time_limit`` None: the time-to-goal component cannot be judged and is
    left out of the score (its weight goes to the others).
    """

    goal: str
    weights: Weights
    time_limit: float | None


@dataclass(frozen=True, slots=True)
class Journey:
    name: str
    allow_regression: bool
    stages: tuple[Stage, ...]
    # As written in the file (None: no ``score:``); ``scoring`` fills in the defaults.
    score: ScoreSpec | None = None
    # event_type -> (stage, rule), furthest stage first: matching only looks at that type's rules.
    _by_type: Mapping[str, tuple[tuple[Stage, EventRule], ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_name: Mapping[str, Stage] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_type: dict[str, list[tuple[Stage, EventRule]]] = {}
        for stage in self.stages:
            for rule in stage.rules:
                by_type.setdefault(rule.event_type, []).append((stage, rule))
        index = {t: tuple(sorted(pairs, key=lambda p: -p[0].index)) for t, pairs in by_type.items()}
        object.__setattr__(self, "_by_type", index)
        object.__setattr__(self, "_by_name", {s.name: s for s in self.stages})

    def match(self, event_type: str, properties: Properties) -> Stage | None:
        """The furthest stage this event qualifies for, so one event type can serve several."""
        for stage, rule in self._by_type.get(event_type, ()):
            if rule.holds(properties):
                return stage
        return None

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; KeyError if this journey has none."""
        return self._by_name[name]

    def has_stage(self, name: str) -> bool:
        return name in self._by_name

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def scoring(self) -> ScoreSpec:
        """The score's goal, weights and time limit, with the defaults for what the file left out.

        Defaults: the goal is the last stage, the weights are DEFAULT_WEIGHTS,
        and the time limit is the ``max_dwell`` of the stages before the goal
        added up (the longest a customer can take without dropping off); None
        when one of them has no ``max_dwell``.
        """
        given = self.score
        goal = given.goal if given is not None else self.stages[-1].name
        weights = given.weights if given is not None else DEFAULT_WEIGHTS
        limit = given.time_limit if given is not None else None
        if limit is None:
            before = self.stages[: self.stage(goal).index]
            dwells = [s.max_dwell for s in before]
            if before and all(d is not None for d in dwells):
                limit = sum(d for d in dwells if d is not None)
        return ScoreSpec(goal, weights, limit)


# --------------------------------------------------------------------------- parsing


def _packaged(name: str) -> str:
    """A file shipped in ``pipeline/data``, also from a wheel or zip."""
    try:
        return resources.files("pipeline").joinpath("data", name).read_text("utf-8")
    except (NotADirectoryError, FileNotFoundError, TypeError):
        # A stale editable install can make ``pipeline`` a namespace package, which
        # importlib.resources cannot read from on 3.11; the file sits next to us anyway.
        return (Path(__file__).resolve().parent / "data" / name).read_text("utf-8")


@functools.cache
def _validator() -> Draft202012Validator:
    schema = json.loads(_packaged("journey.schema.json"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


PathElem = str | int


def _node_at(root: yaml.Node, path: Sequence[PathElem], key: bool = False) -> yaml.Node:
    """The deepest node along ``path`` (the key node of the last step if ``key``)."""
    node = root
    for i, elem in enumerate(path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == elem:
                    node = k if key and i == len(path) - 1 else v
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(elem, int):
            if elem >= len(node.value):
                return node
            node = node.value[elem]
        else:
            return node
    return node


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _fmt_path(path: Sequence[PathElem]) -> str:
    out = ""
    for elem in path:
        out += f"[{elem}]" if isinstance(elem, int) else (f".{elem}" if out else str(elem))
    return out


_HINTS = {
    "max_dwell": "a whole number and a unit s, m, h or d, e.g. 7d",
    "time_limit": "a whole number and a unit s, m, h or d, e.g. 21d",
    "sum": "a property name: letters, digits and _, not starting with a digit",
    "avg": "a property name: letters, digits and _, not starting with a digit",
    "name": "lower-case letters, digits and _, starting with a letter, at most 64 characters",
}


def _describe(error: ValidationError, root: yaml.Node) -> tuple[int, str]:
    path = list(error.absolute_path)
    node = _node_at(root, path)
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(cast(Mapping[str, Any], error.schema).get("properties", {}))
        extra = sorted(str(k) for k in error.instance if k not in allowed)
        if extra:
            node = _node_at(root, [*path, extra[0]], key=True)
            known = ", ".join(sorted(allowed))
            message = f"unknown key {extra[0]!r} (allowed: {known})"
    elif error.validator == "pattern" and path and path[-1] in _HINTS:
        message = f"{error.instance!r} does not match {error.validator_value!r}: expected "
        message += _HINTS[str(path[-1])]
    elif error.validator == "pattern" and len(path) >= 2 and path[-2] == "events":
        message += f": an event type is {_HINTS['name']}"
    elif error.validator == "maxProperties" and len(path) >= 2 and path[-2] == "events":
        message = "an event entry with conditions names one event type, e.g. "
        message += "`- review_submitted: {rating: {gte: 4}}`"
    elif error.validator == "type" and len(path) >= 4 and path[-4] == "events":
        message += ": a property condition is a mapping of comparisons, e.g. {gte: 4}"
    where = _fmt_path(path)
    return _line(node), f"{where}: {message}" if where else message


def _check_unique_keys(node: yaml.Node, source: str) -> None:
    """YAML silently keeps the last of two equal keys; in a journey file that hides a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    raise JourneyFileError(source, _line(k), f"duplicate key {k.value!r}")
                seen.add(k.value)
            _check_unique_keys(v, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, source)


def _compose(text: str, source: str) -> tuple[yaml.Node, Any]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise JourneyFileError(source, line, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise JourneyFileError(source, None, f"invalid YAML: {e}") from None
    if root is None:
        raise JourneyFileError(
            source, 1, "the file is empty; expected a mapping with a 'journeys' list"
        )
    return root, data


def _conditions(spec: Mapping[str, Mapping[str, Any]]) -> tuple[Condition, ...]:
    out: list[Condition] = []
    for prop, comparisons in spec.items():
        for op, value in comparisons.items():
            v = tuple(value) if op == "in" else value
            out.append(Condition(prop, cast(Op, op), v))
    return tuple(out)


def _rule(entry: str | Mapping[str, Any]) -> EventRule:
    if isinstance(entry, str):
        return EventRule(entry)
    ((event_type, spec),) = entry.items()
    return EventRule(event_type, _conditions(spec))


_MEASURE_KEYS: tuple[KpiKind, ...] = ("count", "customers", "sum", "avg", "flow", "survey", "ratio")
# Keys that only some kinds take: which kinds.
_KPI_ONLY: Mapping[str, tuple[KpiKind, ...]] = {
    "of": ("sum", "avg"),
    "stage": ("flow", "survey"),
    "any_stage": ("survey",),
}

Fail = Callable[[list[PathElem], str], JourneyFileError]


def _kpis(
    spec: Mapping[str, Mapping[str, Any]],
    stage: str,
    stage_names: Sequence[str],
    here: list[PathElem],
    fail: Fail,
) -> tuple[Kpi, ...]:
    """A stage's ``kpis:`` checked beyond the schema: one measure each, operands that exist."""
    kpis: list[Kpi] = []
    for name, kspec in spec.items():
        at: list[PathElem] = [*here, "kpis", name]
        where = _fmt_path(at)
        kinds = [k for k in _MEASURE_KEYS if k in kspec]
        if len(kinds) != 1:
            found = " and ".join(kinds) if kinds else "none"
            raise fail(
                at,
                f"{where}: a KPI names exactly one of {', '.join(_MEASURE_KEYS)} (found {found})",
            )
        kind = kinds[0]
        for key, takers in _KPI_ONLY.items():
            if key in kspec and kind not in takers:
                raise fail(
                    [*at, key],
                    f"{where}.{key}: only a {' or '.join(takers)} KPI takes {key!r}, not {kind}",
                )
        target: str | None = stage
        if kind in ("flow", "survey"):
            if kspec.get("any_stage"):
                if "stage" in kspec:
                    raise fail([*at, "stage"], f"{where}: give stage or any_stage, not both")
                target = None
            elif "stage" in kspec:
                target = kspec["stage"]
                if target not in stage_names:
                    raise fail(
                        [*at, "stage"],
                        f"{where}.stage: {target!r} is not a stage of this journey "
                        f"(stages: {', '.join(stage_names)})",
                    )
        operands: tuple[str, str] | None = None
        if kind == "ratio":
            numerator, denominator = kspec["ratio"]
            operands = (numerator, denominator)
            for i, operand in enumerate(operands):
                if operand not in spec:
                    known = ", ".join(n for n in spec if n != name) or "none"
                    raise fail(
                        [*at, "ratio", i],
                        f"{where}.ratio: {operand!r} is not a KPI of stage {stage!r} "
                        f"(its KPIs: {known})",
                    )
                if "ratio" in spec[operand]:
                    raise fail(
                        [*at, "ratio", i],
                        f"{where}.ratio: {operand!r} is a ratio itself; a ratio divides two "
                        "counts, sums, averages, flows or survey figures",
                    )
        kpis.append(
            Kpi(
                name=name,
                kind=kind,
                event_types=tuple(kspec.get("of", kspec[kind]))
                if kind in ("count", "customers", "sum", "avg")
                else (),
                prop=kspec[kind] if kind in ("sum", "avg") else None,
                measure=kspec[kind] if kind in ("flow", "survey") else None,
                stage=target if kind in ("flow", "survey") else None,
                operands=operands,
                unit=kspec.get("unit", "number"),
                better=kspec.get("better", "higher"),
            )
        )
    return tuple(kpis)


def _score(
    spec: Mapping[str, Any], stage_names: Sequence[str], here: list[PathElem], fail: Fail
) -> ScoreSpec:
    """A journey's ``score:``: a goal after the first stage, weights that are not all zero."""
    where = _fmt_path([*here, "score"])
    goal = spec.get("goal", stage_names[-1])
    if goal not in stage_names:
        raise fail(
            [*here, "score", "goal"],
            f"{where}.goal: {goal!r} is not a stage of this journey "
            f"(stages: {', '.join(stage_names)})",
        )
    if goal == stage_names[0]:
        raise fail(
            [*here, "score", "goal"],
            f"{where}.goal: the goal cannot be the first stage ({goal!r}): everyone is there",
        )
    weights = DEFAULT_WEIGHTS
    if "weights" in spec:
        weights = Weights(**{c: float(spec["weights"].get(c, 0.0)) for c in SCORE_COMPONENTS})
        if not any(weights.as_dict().values()):
            raise fail(
                [*here, "score", "weights"],
                f"{where}.weights: at least one weight must be above zero",
            )
    limit: float | None = None
    if "time_limit" in spec:
        limit = parse_duration(spec["time_limit"])
        if limit <= 0:
            raise fail([*here, "score", "time_limit"], f"{where}.time_limit: must be above zero")
    return ScoreSpec(goal, weights, limit)


def parse_journeys(text: str, source: str = "<journeys>") -> tuple[Journey, ...]:
    """Journeys from a file's text; JourneyFileError names the line of the first problem."""
    root, data = _compose(text, source)
    _check_unique_keys(root, source)
    errors = list(_validator().iter_errors(data))
    if errors:
        described = [_describe(best_match([e]), root) for e in errors]
        line, problem = min(described, key=lambda d: d[0])
        raise JourneyFileError(source, line, problem)

    def fail(path: list[PathElem], problem: str) -> JourneyFileError:
        return JourneyFileError(source, _line(_node_at(root, path)), problem)

    journeys: list[Journey] = []
    names: set[str] = set()
    for j, jspec in enumerate(data["journeys"]):
        if jspec["name"] in names:
            raise fail(
                ["journeys", j, "name"],
                f"journeys[{j}].name: duplicate journey name {jspec['name']!r}",
            )
        names.add(jspec["name"])
        stages: list[Stage] = []
        stage_names: set[str] = set()
        all_names = [s["name"] for s in jspec["stages"]]
        last = len(jspec["stages"]) - 1
        for s, sspec in enumerate(jspec["stages"]):
            here: list[PathElem] = ["journeys", j, "stages", s]
            where = _fmt_path(here)
            if sspec["name"] in stage_names:
                raise fail(
                    [*here, "name"],
                    f"{where}.name: duplicate stage name {sspec['name']!r} "
                    f"in journey {jspec['name']!r}",
                )
            stage_names.add(sspec["name"])
            max_dwell: float | None = None
            if "max_dwell" in sspec:
                if s == last:
                    raise fail(
                        [*here, "max_dwell"],
                        f"{where}.max_dwell: the last stage ({sspec['name']!r}) cannot have "
                        "max_dwell: nobody drops from the last stage",
                    )
                max_dwell = parse_duration(sspec["max_dwell"])
                if max_dwell <= 0:
                    raise fail(
                        [*here, "max_dwell"],
                        f"{where}.max_dwell: must be longer than zero",
                    )
            if "dropoff_alert_ratio" in sspec and s == last:
                raise fail(
                    [*here, "dropoff_alert_ratio"],
                    f"{where}.dropoff_alert_ratio: the last stage ({sspec['name']!r}) cannot "
                    "have dropoff_alert_ratio: nobody drops from the last stage",
                )
            rules = tuple(_rule(e) for e in sspec["events"])
            stages.append(
                Stage(
                    name=sspec["name"],
                    index=s,
                    rules=rules,
                    max_dwell=max_dwell,
                    dwell_from=sspec.get("dwell_from", "entered"),
                    dropoff_alert_ratio=float(sspec["dropoff_alert_ratio"])
                    if "dropoff_alert_ratio" in sspec
                    else None,
                    kpis=_kpis(sspec.get("kpis", {}), sspec["name"], all_names, here, fail),
                )
            )
        score = (
            _score(jspec["score"], all_names, ["journeys", j], fail) if "score" in jspec else None
        )
        journeys.append(
            Journey(jspec["name"], bool(jspec.get("allow_regression", False)), tuple(stages), score)
        )
    return tuple(journeys)


def load_journeys(path: str | Path | None) -> tuple[Journey, ...]:
    """The journeys of ``path``, or the built-in default when no file is configured."""
    if path is None:
        return default_journeys()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JourneyFileError(source, None, "journey file not found") from None
    except UnicodeDecodeError as e:
        raise JourneyFileError(source, None, f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise JourneyFileError(source, None, f"cannot read: {e.strerror or e}") from None
    return parse_journeys(text, source)


@functools.cache
def default_journeys() -> tuple[Journey, ...]:
    """The built-in retail journey (awareness → advocacy) shipped with the package."""
    return parse_journeys(_packaged("default_journey.yaml"), DEFAULT_SOURCE)


__all__ = [
    "DEFAULT_WEIGHTS",
    "SCORE_COMPONENTS",
    "Condition",
    "EventRule",
    "Journey",
    "JourneyFileError",
    "Kpi",
    "ScoreSpec",
    "Stage",
    "Weights",
    "default_journeys",
    "load_journeys",
    "parse_duration",
    "parse_journeys",
]
