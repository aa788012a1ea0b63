"""Grafana dashboards: generated, and free of what Grafana itself would reject.

No Grafana binary here, so the checks Grafana does at provisioning and render
time are done on the JSON: the committed files are the generator's output,
panel ids are unique, panels fit the 24-column grid without overlapping, every
datasource uid is one the provisioning defines, every variable a query uses is
defined (or one of Grafana's), every recording rule and metric a query reads
exists. That the queries run and return data is
tests/integration/test_dashboard_queries.py.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipeline import rehearsal
from pipeline.alerting import RULES_PATH, RuleWindows, generate_rules
from pipeline.dashboards import (
    ALL,
    DASHBOARDS_DIR,
    GRID_WIDTH,
    clickhouse_query,
    consistency_sql,
    generate_dashboards,
    inline_parameters,
    interpolate,
    iter_targets,
    kpi_sql,
    prometheus_query,
    render,
    stages_sql,
)
from pipeline.journeys import default_journeys, load_journeys, parse_journeys
from pipeline.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / DASHBOARDS_DIR
PROVISIONING = ROOT / "grafana" / "provisioning"
GENERATED = generate_dashboards(default_journeys())
BOARDS = [pytest.param(board, id=name) for name, board in GENERATED.items()]

# Grafana's own variables and the ClickHouse plugin's macros these dashboards may use.
BUILTINS = {
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__range",
    "__range_s",
    "__range_ms",
    "__field",
    "__conditionalAll",
    "__timeFilter",
    "__timeFilter_ms",
    "__fromTime",
    "__toTime",
    "__timeInterval",
    "__interval_s",
}
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::\w+)?\]\]|\$\{(\w+)(?:\.[^:^}]+)?(?::[^}]+)?\}")


def strings(node: Any) -> Iterator[str]:
    """Every string inside a JSON value."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def provisioned_datasources() -> dict[str, str]:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    return {d["uid"]: d["type"] for d in doc["datasources"]}


# ------------------------------------------------------------------ generated


def test_committed_dashboards_are_the_generators_output() -> None:
    """Regenerate with `python -m pipeline.dashboards` after changing the generator."""
    committed = {p.name for p in DASHBOARDS.glob("*.json")}
    assert committed == set(GENERATED), "stale or missing files in grafana/dashboards"
    for name, board in GENERATED.items():
        assert (DASHBOARDS / name).read_text() == render(board), (
            f"{name} differs from the generator: run `python -m pipeline.dashboards`"
        )


def test_the_five_dashboards_and_their_uids() -> None:
    titles = {b["uid"]: b["title"] for b in GENERATED.values()}
    assert titles == {
        "journey-live": "Journey live",
        "journey-channels": "Channels and consistency",
        "journey-funnels": "Funnels and time in stage",
        "journey-scorecard": "Journey scorecard",
        "journey-pipeline": "Pipeline health",
    }
    assert all(len(uid) <= 40 for uid in titles)  # Grafana's limit


def test_the_cli_writes_what_is_committed(tmp_path: Path) -> None:
    from pipeline.dashboards import main

    main(["-o", str(tmp_path)])
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (DASHBOARDS / name).read_text()


# ------------------------------------------------------------------ what Grafana rejects


@pytest.mark.parametrize("board", BOARDS)
def test_panel_ids_are_unique(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(board)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("board", BOARDS)
def test_panels_fit_the_grid_without_overlapping(board: dict[str, Any]) -> None:
    boxes = []
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), panel["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, panel["title"]
        assert g["x"] + g["w"] <= GRID_WIDTH, panel["title"]
        boxes.append((panel["title"], g))
    for (a, p), (b, q) in itertools.combinations(boxes, 2):
        apart = (
            p["x"] + p["w"] <= q["x"]
            or q["x"] + q["w"] <= p["x"]
            or p["y"] + p["h"] <= q["y"]
            or q["y"] + q["h"] <= p["y"]
        )
        assert apart, f"{a!r} overlaps {b!r}"


@pytest.mark.parametrize("board", BOARDS)
def test_every_datasource_is_one_the_provisioning_defines(board: dict[str, Any]) -> None:
    defined = provisioned_datasources()
    refs = [v["datasource"] for v in board["templating"]["list"]]
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        refs.append(panel["datasource"])
        refs += [t["datasource"] for t in panel["targets"]]
        assert {t["datasource"]["uid"] for t in panel["targets"]} == {panel["datasource"]["uid"]}, (
            f"{panel['title']}: targets on another datasource than the panel"
        )
    for ref in refs:
        assert defined.get(ref["uid"]) == ref["type"], ref


@pytest.mark.parametrize("board", BOARDS)
def test_every_variable_a_query_uses_is_defined(board: dict[str, Any]) -> None:
    """A variable used before it is defined, or not at all, shows raw `$name` in a query."""
    defined: list[str] = []
    for var in board["templating"]["list"]:
        for m in VARIABLE.finditer(var["query"]):
            name = next(g for g in m.groups() if g)
            assert name in defined or name in BUILTINS, f"${var['name']} uses ${name}"
        defined.append(var["name"])
    for text in strings({"panels": board["panels"], "title": board["title"]}):
        for m in VARIABLE.finditer(text):
            name = next(g for g in m.groups() if g)
            assert name in defined or name in BUILTINS, f"undefined ${name} in {text!r}"


@pytest.mark.parametrize("board", BOARDS)
def test_targets_have_their_datasources_fields(board: dict[str, Any]) -> None:
    for panel, target in iter_targets(board):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        if target["datasource"]["type"] == "prometheus":
            assert target["expr"].strip()
            assert target["instant"] != target["range"]
            if panel["type"] == "timeseries":
                assert target["range"], panel["title"]
        else:
            assert target["rawSql"].strip() and target["editorType"] == "sql"
            # sqlds: 0 turns long rows into time series, 1 keeps a table.
            assert target["format"] == (0 if panel["type"] == "timeseries" else 1)
            # A report query's {name:Type} parameter left in: Grafana has no value for it.
            assert not re.search(r"(?<!\$)\{\w+:[A-Z]", target["rawSql"]), target["rawSql"]


def test_panels_read_only_recording_rules_that_exist() -> None:
    """Every `journey:…` a panel reads is recorded by the committed rules file."""
    rules = yaml.safe_load((ROOT / RULES_PATH).read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    used = {
        name
        for board in GENERATED.values()
        for _, target in iter_targets(board)
        for name in re.findall(r"journey:[\w:]+", target.get("expr", ""))
    }
    assert used, "the dashboards read no recording rule"
    assert used <= recorded, sorted(used - recorded)


def test_rehearsal_dashboards_read_the_rehearsal_rules() -> None:
    """The query test's dashboards (rules scaled to seconds) name rules that exist too."""
    journeys = load_journeys(rehearsal.REHEARSAL_JOURNEY)
    rules = generate_rules(journeys, rehearsal.WINDOWS)
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for board in generate_dashboards(journeys, rehearsal.WINDOWS).values():
        for _, target in iter_targets(board):
            assert set(re.findall(r"journey:[\w:]+", target.get("expr", ""))) <= recorded


def test_panels_read_only_metrics_the_worker_exports() -> None:
    registry = CollectorRegistry()
    Metrics(lambda: iter([("retail", "awareness")]), registry=registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    used = {
        name
        for board in GENERATED.values()
        for _, target in iter_targets(board)
        for name in re.findall(r"\bjourney_[a-z_]+", target.get("expr", ""))
    }
    assert used <= exported, sorted(used - exported)


def test_clickhouse_panels_read_tables_the_ddl_creates() -> None:
    ddl = "\n".join(p.read_text() for p in (ROOT / "deploy" / "clickhouse").glob("*.sql"))
    tables = set(re.findall(r"CREATE TABLE IF NOT EXISTS (journey\.\w+)", ddl))
    for board in GENERATED.values():
        queries = [t.get("rawSql", "") for _, t in iter_targets(board)]
        queries += [v["query"] for v in board["templating"]["list"]]
        for query in queries:
            assert set(re.findall(r"\bjourney\.\w+", query)) <= tables, query


# ------------------------------------------------------------------ provisioning


def test_provisioning_defines_each_datasource_once_with_a_fixed_uid() -> None:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    uids = [d["uid"] for d in doc["datasources"]]
    assert len(uids) == len(set(uids))
    assert [d["name"] for d in doc["datasources"] if d.get("isDefault")] == ["Prometheus"]
    clickhouse = next(d for d in doc["datasources"] if d["uid"] == "clickhouse")
    assert clickhouse["type"] == "grafana-clickhouse-datasource"
    # A secret from the environment, never written here.
    assert re.fullmatch(r"\$\{\w+\}", clickhouse["secureJsonData"]["password"])


def test_dashboards_provider_forbids_saving_from_the_ui() -> None:
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False


# ------------------------------------------------------------------ generator pieces


def test_stage_order_comes_from_each_journey() -> None:
    journeys = parse_journeys(
        "journeys:\n"
        "  - name: a\n    stages:\n"
        "      - {name: x, events: [e1]}\n      - {name: y, events: [e2]}\n"
        "  - name: b\n    stages:\n"
        "      - {name: y, events: [e1]}\n      - {name: z, events: [e2]}\n"
    )
    assert stages_sql(journeys) == (
        "multiIf('${journey}' = 'a', ['x', 'y'], '${journey}' = 'b', ['y', 'z'], [])"
    )


def test_consistency_panel_is_reports_sql_with_grafanas_macros() -> None:
    text = consistency_sql()
    assert "$__timeFilter(occurred_at)" in text and "'${journey}'" in text
    assert "{" not in text.replace("${journey}", "")


# ------------------------------------------------------------------ interpolation


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ('x{journey="$journey"}', {"journey": "retail"}, 'x{journey="retail"}'),
        ('x{c=~"${channel}"}', {"channel": ".*"}, 'x{c=~".*"}'),
        ('x{c=~"$channel"}', {"channel": ["web", "app"]}, 'x{c=~"(web|app)"}'),
        ("rate(x[$__rate_interval])", {"__rate_interval": "1m"}, "rate(x[1m])"),
        ("increase(x[$__range])", {"__range": "3600s"}, "increase(x[3600s])"),
    ],
)
def test_prometheus_query_expands_as_grafana(
    text: str, values: dict[str, Any], expected: str
) -> None:
    assert prometheus_query(text, values) == expected


def test_prometheus_query_refuses_to_leave_a_variable() -> None:
    with pytest.raises(ValueError, match="unexpanded"):
        prometheus_query('x{journey="$journey"}', {})


def test_unknown_variables_stay_for_the_datasource() -> None:
    assert interpolate("$__timeFilter(t) AND $a", {"a": "1"}) == "$__timeFilter(t) AND 1"


START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 11, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (ALL, "WHERE 1=1 AND j = 'retail'"),
        (["web", "app"], "WHERE c IN ('web','app') AND j = 'retail'"),
        ("web", "WHERE c IN ('web') AND j = 'retail'"),
    ],
)
def test_conditional_all_drops_the_condition_for_all(channel: Any, expected: str) -> None:
    """The ClickHouse plugin's $__conditionalAll, then ${var:singlequote}."""
    sql = "WHERE $__conditionalAll(c IN (${channel:singlequote}), $channel) AND j = '${journey}'"
    values = {"channel": channel, "journey": "retail"}
    assert clickhouse_query(sql, values, START, END, 60) == expected


def test_clickhouse_time_macros_expand_as_the_plugin_backend() -> None:
    sql = "SELECT $__timeInterval(t) WHERE $__timeFilter(t) AND t >= $__fromTime AND $__interval_s"
    t0, t1 = int(START.timestamp()), int(END.timestamp())
    assert clickhouse_query(sql, {}, START, END, 300) == (
        "SELECT toStartOfInterval(toDateTime(t), INTERVAL 300 second) "
        f"WHERE t >= toDateTime({t0}) AND t <= toDateTime({t1}) "
        f"AND t >= toDateTime({t0}) AND 300"
    )


def test_clickhouse_query_refuses_unknown_macros() -> None:
    with pytest.raises(ValueError, match="not one these dashboards use"):
        clickhouse_query("SELECT $__dateFilter(d)", {}, START, END, 60)


def test_every_committed_query_expands_completely() -> None:
    """Nothing is left for Grafana to choke on once variables and macros are in."""
    prom_values = {
        "journey": "retail",
        "channel": ".*",
        "instance": ".*",
        "__interval": "15s",
        "__rate_interval": "1m",
        "__range": "3600s",
    }
    for board in GENERATED.values():
        for var in board["templating"]["list"]:
            if var["datasource"]["type"] == "prometheus":
                prometheus_query(var["query"], prom_values)
            else:
                clickhouse_query(var["query"], {"journey": "retail"}, START, END, 60)
        for _, target in iter_targets(board):
            if "expr" in target:
                prometheus_query(target["expr"], prom_values)
            else:
                clickhouse_query(target["rawSql"], {"journey": "r", "channel": ALL}, START, END, 60)


def test_default_windows_are_the_rules_files() -> None:
    """The committed dashboards read the windows the committed rules were generated with."""
    header = (ROOT / RULES_PATH).read_text().splitlines()[2]
    w = RuleWindows()
    assert f"short {w.short}, long {w.long}, baseline {w.baseline}" in header
    assert json.loads((DASHBOARDS / "journey-live.json").read_text())["uid"] == "journey-live"


def test_kpi_panel_lists_every_kpi_with_its_journey_file_names_quoted() -> None:
    """One row per KPI in file order; names become quoted literals, never raw SQL."""
    journeys = parse_journeys(
        "journeys:\n  - name: a\n    stages:\n"
        "      - name: x\n        events: [e1]\n        kpis:\n"
        "          n: {count: [e1]}\n          v: {sum: it_s, of: [e1]}\n"
        "          r: {ratio: [v, n]}\n"
        "      - {name: y, events: [e2]}\n"
    )
    text = kpi_sql(journeys)
    assert text.index("'n' AS kpi") < text.index("'v' AS kpi") < text.index("'r' AS kpi")
    assert "event_type IN ['e1']" in text and "JSONType(properties, 'it_s')" in text
    assert "WHERE '${journey}' = 'a'" in text
    assert "$__timeFilter(occurred_at)" in text and "{since:" not in text
    assert inline_parameters("x = {v:String}", {"v": "it's"}) == "x = 'it\\'s'"
    with pytest.raises(ValueError, match="no value"):
        inline_parameters("x = {w:String}", {})
