"""Grafana's provisioning (grafana/build.py): the committed files are current and
valid, every panel and alert query runs on PostgreSQL and TimescaleDB and gives
what its panel needs, the anomaly band is analytics.baseline's, and the alerts
fire when they should. No Grafana server runs here: queries go through
tests/grafana_macros.py, which expands Grafana's macros as Grafana does."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
import yaml
from conftest import SERVER_BACKENDS, DatabaseServers
from grafana_macros import expand, interpolate_variables, parse_interval
from sqlalchemy.engine import make_url

from analytics import baseline
from bench.traffic import Traffic, TrafficConfig
from db import make_engine, migrate
from db.aggregates import AGGREGATES, refresh, relation
from db.bulk import HitChunk, load_hits
from db.hits import NewHit
from grafana import build

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
SCHEMAS = Path(__file__).parent / "data" / "grafana-foundation-sdk"
PROVISIONED_YAML = sorted((GRAFANA / "provisioning").rglob("*.yaml"))
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
AGGREGATE_NAMES = {a.name for a in AGGREGATES}
POSTGRES_UID = build.POSTGRES["uid"]
PROMETHEUS_UID = build.PROMETHEUS["uid"]
EXPRESSION_UID = "__expr__"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in DASHBOARD_FILES]


def rules() -> list[dict[str, Any]]:
    groups = load_yaml(GRAFANA / "provisioning/alerting/rules.yaml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: dict[str, Any]
    target: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.dashboard}: {self.panel['title']} [{self.target['refId']}]"


def panel_queries(datasource_uid: str) -> list[PanelQuery]:
    return [
        PanelQuery(board["title"], panel, target)
        for board in dashboards()
        for panel in board["panels"]
        for target in panel["targets"]
        if target["datasource"]["uid"] == datasource_uid
    ]


# -- the files ------------------------------------------------------------------------------


def test_committed_files_are_what_build_writes():
    generated = build.files()
    committed = {path.relative_to(GRAFANA) for path in [*PROVISIONED_YAML, *DASHBOARD_FILES]}
    assert committed == set(generated), "run: .venv/bin/python -m grafana.build"
    for path, content in generated.items():
        assert (GRAFANA / path).read_text() == content, (
            f"grafana/{path} is stale: run .venv/bin/python -m grafana.build"
        )


def test_datasources_use_fixed_uids_and_credentials_from_the_environment():
    sources = load_yaml(GRAFANA / "provisioning/datasources/telemetry.yaml")
    assert sources["apiVersion"] == 1
    by_uid = {source["uid"]: source for source in sources["datasources"]}
    assert set(by_uid) == {POSTGRES_UID, PROMETHEUS_UID}
    postgres = by_uid[POSTGRES_UID]
    assert postgres["type"] == "grafana-postgresql-datasource"
    assert postgres["jsonData"]["timescaledb"] is True
    assert postgres["url"] == "$TELEMETRY_DB_HOST"
    assert postgres["user"] == "$TELEMETRY_DB_USER"
    assert postgres["jsonData"]["database"] == "$TELEMETRY_DB_NAME"
    assert postgres["secureJsonData"] == {"password": "$TELEMETRY_DB_PASSWORD"}
    assert by_uid[PROMETHEUS_UID]["type"] == "prometheus"
    assert by_uid[PROMETHEUS_UID]["url"] == "$PROMETHEUS_URL"


def compose_grafana() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]


def test_compose_mounts_the_provisioning_and_dashboards_into_grafana():
    service = compose_grafana()
    volumes = {v.split(":")[0]: v.split(":")[1] for v in service["volumes"]}
    assert volumes["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning/dashboards/telemetry.yaml")["providers"][0]
    assert volumes["./grafana/dashboards"] == provider["options"]["path"]
    assert provider["type"] == "file"


def test_compose_passes_every_variable_the_provisioning_reads():
    environment = compose_grafana()["environment"]
    used = set()
    for path in PROVISIONED_YAML:
        if path.name != "rules.yaml":
            used |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", path.read_text()))
    assert {"TELEMETRY_DB_PASSWORD", "TELEMETRY_ALERT_WEBHOOK_URL", "PROMETHEUS_URL"} <= used
    assert used <= set(environment), f"not passed by docker-compose.yml: {used - set(environment)}"


def test_alert_rules_leave_nothing_to_environment_interpolation():
    """Grafana expands $VARIABLES from the environment in a rule's title, labels and
    condition, and ${VARIABLES} in its annotations (not in query models), so a
    template must not look like one."""
    for rule in rules():
        for text in (rule["uid"], rule["title"], rule["condition"], *rule["labels"].values()):
            assert "$" not in text, rule["title"]
        for text in rule["annotations"].values():
            assert "${" not in text, rule["title"]


def test_dashboards_match_the_foundation_sdk_schema():
    schema = json.loads((SCHEMAS / "dashboard.jsonschema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for board in dashboards():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(board)]
        assert not errors, f"{board['title']}: {errors[:5]}"


def test_dashboards_are_complete_and_consistent():
    boards = dashboards()
    assert len({board["uid"] for board in boards}) == len(boards) == 4
    assert {board["title"] for board in boards} == {
        "Traffic overview", "Visitors", "Anomalies", "Service health"
    }  # fmt: skip
    known = {POSTGRES_UID, PROMETHEUS_UID}
    for board in boards:
        assert board["schemaVersion"] == build.SCHEMA_VERSION
        assert 8 <= len(board["uid"]) <= 40
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), board["title"]
        for panel in board["panels"]:
            assert panel["title"] and panel["description"], panel
            assert panel["datasource"]["uid"] in known
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in known
                assert target.get("rawSql") or target.get("expr"), panel["title"]
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] in known
        uses_sql = any(t["datasource"]["uid"] == POSTGRES_UID for p in board["panels"]
                       for t in p["targets"])  # fmt: skip
        names = [v["name"] for v in board["templating"]["list"]]
        assert ("site" in names) == uses_sql, board["title"]
    assert "path" in [
        v["name"] for v in boards_by_title()["Traffic overview"]["templating"]["list"]
    ]


def boards_by_title() -> dict[str, dict[str, Any]]:
    return {board["title"]: board for board in dashboards()}


def test_panels_fit_the_grid_and_do_not_overlap():
    for board in dashboards():
        taken: dict[tuple[int, int], str] = {}
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                    taken[(x, y)] = panel["title"]


def relations_read(sql: str) -> set[str]:
    """The relations a query reads (FROM / JOIN), leaving out its own CTEs and
    set-returning functions."""
    ctes = set(re.findall(r"(\w+) AS \(", sql))
    named = set(re.findall(r"\b(?:FROM|JOIN)\s+([a-z_][a-z0-9_]*)\b(?!\s*[(.])", sql))
    return named - ctes - {"generate_series"}


def test_sql_reads_the_aggregates_and_raw_hits_only_for_the_last_minutes():
    queries = [q.target["rawSql"] for q in panel_queries(POSTGRES_UID)]
    queries += [v["query"] for b in dashboards() for v in b["templating"]["list"]]
    for sql in queries:
        assert relations_read(sql) <= AGGREGATE_NAMES, sql
    for rule in rules():
        for query in rule["data"]:
            if query["datasourceUid"] == POSTGRES_UID:
                read = relations_read(query["model"]["rawSql"])
                raw = {"hits"} if rule["uid"] == "telemetry-ingestion-stopped" else set()
                assert read <= AGGREGATE_NAMES | raw, (rule["title"], read)


def test_alert_rules_are_complete_and_reference_what_exists():
    provisioned = load_yaml(GRAFANA / "provisioning/alerting/rules.yaml")
    assert provisioned["apiVersion"] == 1
    schema = json.loads((SCHEMAS / "alerting.jsonschema.json").read_text())
    rule_schema = {"$ref": "#/definitions/Rule", "definitions": schema["definitions"]}
    validator = jsonschema.Draft7Validator(rule_schema)
    titles = set()
    for group in provisioned["groups"]:
        assert group["folder"] and group["name"] and parse_interval(group["interval"])
        for rule in group["rules"]:
            # The provisioning file carries these on the group; the API model per rule.
            as_api = {**rule, "folderUID": build.FOLDER_UID, "orgID": group["orgId"],
                      "ruleGroup": group["name"]}  # fmt: skip
            errors = [e.message for e in validator.iter_errors(as_api)]
            assert not errors, (rule["title"], errors)
            titles.add(rule["title"])
            ref_ids = [query["refId"] for query in rule["data"]]
            assert len(set(ref_ids)) == len(ref_ids)
            assert rule["condition"] in ref_ids
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert parse_interval(rule["for"]) >= timedelta(minutes=2)
            for query in rule["data"]:
                assert query["model"]["refId"] == query["refId"]
                assert query["datasourceUid"] in (POSTGRES_UID, PROMETHEUS_UID, EXPRESSION_UID)
                if query["datasourceUid"] == EXPRESSION_UID:
                    assert query["model"]["expression"].lstrip("$") in ref_ids
                else:
                    assert query["model"].get("format", "table") == "table"
            # Templates read only the refIds the rule has.
            templated = " ".join(rule["annotations"].values())
            assert set(re.findall(r"\$values\.(\w+)", templated)) <= set(ref_ids)
    assert titles == {"Traffic anomaly", "Ingestion stopped", "Ingestion errors"}
    uids = [rule["uid"] for rule in rules()]
    assert len(set(uids)) == len(uids)


def test_alert_sql_uses_fixed_widths_and_the_evaluation_time():
    for rule in rules():
        for query in rule["data"]:
            sql = query["model"].get("rawSql", "")
            assert "$__interval" not in sql and "$__timeGroup" not in sql, rule["title"]
            if sql:
                assert "$__timeTo()" in sql, rule["title"]


def test_the_anomaly_alert_is_labelled_with_site_and_severity():
    anomaly = next(rule for rule in rules() if rule["uid"] == "telemetry-traffic-anomaly")
    assert anomaly["labels"]["severity"] == "warning"
    for query in anomaly["data"]:
        if query["datasourceUid"] == POSTGRES_UID:
            assert query["model"]["rawSql"].startswith("SELECT site, ")
    description = anomaly["annotations"]["description"]
    assert "$values.LOW" in description and "$values.HIGH" in description


def test_webhook_contact_point_and_policy():
    contact = load_yaml(GRAFANA / "provisioning/alerting/contact-points.yaml")
    receivers = {r["uid"]: r for c in contact["contactPoints"] for r in c["receivers"]}
    webhook = receivers[build.WEBHOOK]
    assert webhook["type"] == "webhook"
    assert webhook["settings"]["url"] == "$TELEMETRY_ALERT_WEBHOOK_URL"
    names = {c["name"] for c in contact["contactPoints"]}
    policies = load_yaml(GRAFANA / "provisioning/alerting/policies.yaml")
    schema = json.loads((SCHEMAS / "alerting.jsonschema.json").read_text())
    policy_schema = {
        "$ref": "#/definitions/NotificationPolicy",
        "definitions": schema["definitions"],
    }
    for policy in policies["policies"]:
        tree = {k: v for k, v in policy.items() if k != "orgId"}
        jsonschema.validate(tree, policy_schema)
        assert policy["receiver"] in names
        assert "site" in policy["group_by"]


def test_readme_describes_every_dashboard_panel_and_alert():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Grafana: dashboards and alerts") :]
    section = section[: section.index("\n## ", 1)]
    for board in dashboards():
        assert f"| {board['title']}" in section
        for panel in board["panels"]:
            assert f"**{panel['title']}**" in section, panel["title"]
    for rule in rules():
        assert f"| {rule['title']} |" in section


# -- Prometheus -----------------------------------------------------------------------------


def promql_expressions() -> list[str]:
    expressions = [q.target["expr"] for q in panel_queries(PROMETHEUS_UID)]
    for rule in rules():
        expressions += [q["model"]["expr"] for q in rule["data"]
                        if q["datasourceUid"] == PROMETHEUS_UID]  # fmt: skip
    # Grafana replaces $__rate_interval before Prometheus sees the query.
    return [expr.replace("$__rate_interval", "1m") for expr in expressions]


def exposed_metric_names() -> set[str]:
    from prometheus_client import REGISTRY, generate_latest

    from api.metrics import metrics

    metrics()
    names = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_promql_reads_metrics_the_service_exposes():
    exposed = exposed_metric_names()
    functions = {"sum", "rate", "histogram_quantile", "max", "by", "le", "or", "vector",
                 "clamp_min", "reason", "scope", "outcome", "status", "rollup"}  # fmt: skip
    for expr in promql_expressions():
        without_strings = re.sub(r'"[^"]*"', "", expr)
        names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", without_strings)) - functions
        assert names and names <= exposed, (expr, names - exposed)


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/debian-packages.txt)")
    return path


def error_share_rule() -> str:
    errors = next(rule for rule in rules() if rule["uid"] == "telemetry-ingestion-errors")
    share = next(q for q in errors["data"] if q["datasourceUid"] == PROMETHEUS_UID)
    threshold = next(q for q in errors["data"] if q["refId"] == errors["condition"])
    (limit,) = threshold["model"]["conditions"][0]["evaluator"]["params"]
    assert threshold["model"]["conditions"][0]["evaluator"]["type"] == "gt"
    return f"({share['model']['expr']}) > {limit}"


def test_promtool_accepts_every_promql_expression(promtool, tmp_path):
    records = [
        {"record": f"telemetry:check_{index}", "expr": expr}
        for index, expr in enumerate(promql_expressions())
    ]
    alert = {"alert": "IngestionErrors", "expr": error_share_rule()}
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "grafana", "rules": [*records, alert]}]})
    )
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(records) + 1} rules found" in checked.stdout


def test_ingestion_errors_alert_fires_on_refused_events_only(promtool, tmp_path):
    """The alert's PromQL and threshold as a Prometheus alerting rule, run by
    `promtool test rules` on synthetic counters."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": [
        {"alert": "IngestionErrors", "expr": error_share_rule(), "labels": {"severity": "x"}}
    ]}]}))  # fmt: skip

    def case(series: dict[str, str], fires: bool) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": name, "values": values} for name, values in series.items()],
            "alert_rule_test": [{
                "eval_time": "15m",
                "alertname": "IngestionErrors",
                "exp_alerts": [{"exp_labels": {"severity": "x"}}] if fires else [],
            }],
        }  # fmt: skip

    accepted = "telemetry_events_accepted_total"
    rejected = "telemetry_events_rejected_total"
    tests = [
        # 10 refused of 100: 10% > 5%.
        case({accepted: "0+90x20", f'{rejected}{{reason="bad_request"}}': "0+10x20"}, True),
        case({accepted: "0+90x20", f'{rejected}{{reason="unavailable"}}': "0+10x20"}, True),
        # 1 of 100: below the threshold.
        case({accepted: "0+99x20", f'{rejected}{{reason="rate_limited"}}': "0+1x20"}, False),
        # Do-Not-Track drops are the visitor's choice, not errors.
        case({accepted: "0+10x20", f'{rejected}{{reason="do_not_track"}}': "0+90x20"}, False),
        # No traffic at all is not an error rate (the ingestion-stopped alert's case).
        case({accepted: "0+0x20"}, False),
    ]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    ))  # fmt: skip
    tested = subprocess.run(
        [promtool, "test", "rules", "test.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr


# -- the queries on real databases ----------------------------------------------------------

# Three sites, six weeks: enough history for the anomaly band over the last week.
SEEDED = TrafficConfig(events=60_000, days=42, end=date(2026, 3, 4), chunk_rows=20_000,
                       paths_per_site=200, visitors=3_000)  # fmt: skip
SITE = "example.com"
# The generator's traffic has no anomalies: one spike (from 50 visitors) goes in on top.
SPIKE_HOUR = datetime(2026, 3, 2, 14, tzinfo=UTC)
SPIKE = [
    NewHit(SPIKE_HOUR + timedelta(seconds=i), SITE, "/", None, (i % 50).to_bytes(16, "big"),
           "injected-spike", "Chrome", "Windows", "desktop", False)
    for i in range(400)
]  # fmt: skip
# The dashboards' range: two weeks ending on the afternoon of the day before the data ends.
RANGE_TO = SEEDED.end_time - timedelta(hours=9, minutes=30)
RANGE_FROM = RANGE_TO - timedelta(days=14)
# Grafana's session time zone is the database's; the queries must not depend on it.
SESSION_TIME_ZONE = "America/New_York"


@dataclass
class Seeded:
    url: str
    backend: str
    engine: sa.Engine

    def connect(self) -> psycopg.Connection:
        url = make_url(self.url).set(drivername="postgresql")
        connection = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        connection.execute(f"SET TIME ZONE '{SESSION_TIME_ZONE}'")
        return connection


def seed(
    servers: DatabaseServers, backend: str, suffix: str, config: TrafficConfig
) -> Iterator[Seeded]:
    server = SERVER_BACKENDS[backend]
    url = servers.create_database(server, suffix)
    engine = make_engine(url)
    try:
        migrate.upgrade(url)
        load_hits(engine, Traffic(config).chunks())
        if config is SEEDED:
            load_hits(engine, [HitChunk.from_hits(SPIKE)])
        refresh(engine)
        yield Seeded(url, backend, engine)
    finally:
        engine.dispose()
        servers.drop_database(server, url)


@pytest.fixture(scope="module", params=list(SERVER_BACKENDS))
def seeded(request: pytest.FixtureRequest, database_servers: DatabaseServers) -> Iterator[Seeded]:
    yield from seed(database_servers, request.param, "grafana", SEEDED)


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def column(self, name: str) -> list[Any]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def run(
    db: Seeded,
    sql: str,
    *,
    time_from: datetime = RANGE_FROM,
    time_to: datetime = RANGE_TO,
    interval: timedelta = timedelta(seconds=1),
    variables: dict[str, str] | None = None,
) -> Result:
    sql = interpolate_variables(sql, variables or {"site": SITE, "path": "/"})
    assert "$" not in re.sub(r"\$__\w+", "", sql), "an unknown variable is left"
    expanded = expand(
        sql, time_from=time_from, time_to=time_to, interval=interval,
        timescaledb=db.backend == "timescaledb",
    )  # fmt: skip
    with db.connect() as connection:
        cursor = connection.execute(expanded)
        assert cursor.description is not None
        return Result([c.name for c in cursor.description], cursor.fetchall())


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) or type(value).__name__ == "Decimal"


SQL_PANEL_QUERIES = panel_queries(POSTGRES_UID)


@pytest.mark.parametrize("query", SQL_PANEL_QUERIES, ids=[q.name for q in SQL_PANEL_QUERIES])
def test_every_panel_query_runs_and_gives_what_its_panel_needs(seeded: Seeded, query: PanelQuery):
    interval = parse_interval(query.panel.get("interval", "1s"))
    result = run(seeded, query.target["rawSql"], interval=interval)
    assert result.rows, f"{query.name}: no rows on the seeded data"
    assert len(set(result.columns)) == len(result.columns)
    if query.target["format"] == "time_series":
        assert "time" in result.columns, query.name
        times = result.column("time")
        assert times == sorted(times), "time series come in time order"
        for moment in times:
            if is_number(moment):  # $__timeGroup without TimescaleDB: epoch seconds
                moment = datetime.fromtimestamp(float(moment), UTC)
            assert RANGE_FROM - timedelta(days=1) < moment <= RANGE_TO + timedelta(hours=1)
        values = [c for c in result.columns if c != "time"]
        assert values and all(is_number(v) or v is None for c in values for v in result.column(c))
    numbers = [v for row in result.rows for v in row if is_number(v)]
    assert numbers, f"{query.name}: no numbers"
    assert all(not math.isnan(v) for v in numbers)
    if query.panel["title"] != "Month-over-month growth":  # growth can be negative
        assert all(v >= 0 for v in numbers), query.name
    for column in ("share", "bot_share"):
        if column in result.columns:
            assert all(0 <= v <= 1 for v in result.column(column) if v is not None)


def panel(title: str, dashboard: str) -> dict[str, Any]:
    return next(p for p in boards_by_title()[dashboard]["panels"] if p["title"] == title)


def panel_sql(title: str, dashboard: str) -> str:
    return panel(title, dashboard)["targets"][0]["rawSql"]


def raw_count(db: Seeded, sql: str, **params: Any) -> int:
    with db.engine.connect() as connection:
        return connection.execute(sa.text(sql), params).scalar_one()


def test_stat_panels_agree_with_the_raw_hits(seeded: Seeded):
    first_hour = RANGE_FROM.replace(minute=0, second=0, microsecond=0)
    hits = run(seeded, panel_sql("Hits", "Traffic overview")).rows[0][0]
    assert hits == raw_count(
        seeded,
        "SELECT count(*) FROM hits WHERE site = :site AND NOT is_bot "
        "AND ts >= :start AND ts < :end",
        site=SITE, start=first_hour, end=RANGE_TO.replace(minute=0) + timedelta(hours=1),
    )  # fmt: skip
    visitors = run(seeded, panel_sql("Unique visitors", "Traffic overview")).rows[0][0]
    first_day = RANGE_FROM.replace(hour=0, minute=0, second=0, microsecond=0)
    assert visitors == raw_count(
        seeded,
        "SELECT count(DISTINCT ip_hash) FROM hits WHERE site = :site AND NOT is_bot "
        "AND ts >= :start AND ts < :end",
        site=SITE, start=first_day, end=RANGE_TO.replace(hour=0, minute=0) + timedelta(days=1),
    )  # fmt: skip
    assert 0 < visitors < hits


def test_variables_list_the_sites_and_their_busiest_paths(seeded: Seeded):
    board = boards_by_title()["Traffic overview"]
    site, path = board["templating"]["list"]
    sites = run(seeded, site["query"]).column("site")
    assert sites == sorted(SEEDED.sites)
    paths = run(seeded, path["query"]).column("path")
    assert paths[0] == "/" and len(paths) == 100


def test_hour_by_weekday_has_every_hour_and_weekday(seeded: Seeded):
    result = run(seeded, panel_sql("Hour x weekday", "Visitors"))
    assert result.columns == ["hour", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    assert result.column("hour") == list(range(24))
    # The generator's afternoon peak and night trough show.
    assert sum(result.rows[15][1:]) > 2 * sum(result.rows[3][1:])


def test_top_visitors_are_fifteen_with_shares(seeded: Seeded):
    result = run(seeded, panel_sql("Top 15 visitors", "Visitors"))
    assert len(result.rows) == 15
    assert all(len(visitor) == 8 for visitor in result.column("visitor"))
    hits = result.column("hits")
    assert hits == sorted(hits, reverse=True)
    assert 0 < sum(result.column("share")) < 1


def site_hourly(db: Seeded, site: str) -> tuple[pd.Series, datetime]:
    table = relation("site_hourly")
    query = sa.select(table.c.bucket, table.c.hits).where(table.c.site == site)
    with db.engine.connect() as connection:
        rows = connection.execute(query).all()
    series = pd.Series({bucket: hits for bucket, hits in rows}).sort_index()
    return series, series.index.min().to_pydatetime()


def test_the_band_is_analytics_baseline(seeded: Seeded):
    """The Anomalies dashboard's band and anomalous hours are exactly what
    analytics.baseline computes (the report's and /api/stats' definition)."""
    # A range that starts before the site's first band (five weeks after its first hit):
    # unevaluated hours too.
    start = SEEDED.start_time + timedelta(days=27)
    end = RANGE_TO.replace(minute=0)
    result = run(seeded, panel_sql("Hits against the usual range", "Anomalies"),
                 time_from=start, time_to=end)  # fmt: skip
    hits, first_hour = site_hourly(seeded, SITE)
    expected = baseline.evaluate(hits, start, end + timedelta(hours=1), first_hour=first_hour)
    got = pd.DataFrame(result.rows, columns=result.columns).set_index("time")
    assert list(got.index) == list(expected.index)
    assert list(got["hits"]) == list(expected["hits"])
    for column in ("median", "low", "high"):
        assert got[column].astype(float).tolist() == pytest.approx(
            expected[column].tolist(), rel=1e-12, nan_ok=True
        )
    assert got["median"].isna().any() and got["median"].notna().any()

    listed = run(seeded, panel_sql("Anomalous hours", "Anomalies"), time_from=start, time_to=end)
    flagged = expected[expected["anomaly"].notna()]
    assert flagged.loc[SPIKE_HOUR, "anomaly"] == "spike"
    assert sorted(listed.column("time")) == list(flagged.index)
    assert dict(zip(listed.column("time"), listed.column("direction"), strict=True)) == dict(
        flagged["anomaly"]
    )


# -- the alerts on real databases -----------------------------------------------------------


def evaluate(
    db: Seeded, rule: dict[str, Any], at: datetime, ref: str | None = None
) -> dict[tuple, float]:
    """What Grafana's evaluation of `rule` at `at` gives its condition (or `ref`),
    per label set: a SQL query as a numeric table (string columns are labels,
    exactly one number), a threshold expression on the query it names."""
    query = next(q for q in rule["data"] if q["refId"] == (ref or rule["condition"]))
    model = query["model"]
    if query["datasourceUid"] == EXPRESSION_UID:
        assert model["type"] == "threshold"
        source = evaluate(db, rule, at, model["expression"].lstrip("$"))
        evaluator = model["conditions"][0]["evaluator"]
        return {
            labels: float(passes(evaluator["type"], evaluator["params"], value))
            for labels, value in source.items()
        }
    assert query["datasourceUid"] == POSTGRES_UID
    window = timedelta(seconds=query["relativeTimeRange"]["from"])
    table = run(db, model["rawSql"], time_from=at - window, time_to=at)
    numeric = [i for i, c in enumerate(table.columns)
               if all(is_number(row[i]) for row in table.rows)]  # fmt: skip
    assert len(numeric) == 1 or not table.rows, (rule["title"], table.columns)
    values = {}
    for row in table.rows:
        labels = tuple((c, v) for c, v in zip(table.columns, row, strict=True)
                       if isinstance(v, str))  # fmt: skip
        assert labels not in values, "each row is one alert instance"
        values[labels] = float(row[numeric[0]])
    return values


def passes(kind: str, params: list[float], x: float) -> bool:
    """Grafana's threshold expression."""
    if kind == "gt":
        return x > params[0]
    if kind == "lt":
        return x < params[0]
    if kind == "within_range":
        return params[0] < x < params[1]
    assert kind == "outside_range"
    return x < params[0] or x > params[1]


def firing(db: Seeded, uid: str, at: datetime) -> set[str]:
    rule = next(r for r in rules() if r["uid"] == uid)
    return {dict(labels)["site"] for labels, value in evaluate(db, rule, at).items() if value}


def values_of(db: Seeded, uid: str, ref: str, at: datetime) -> dict[str, float]:
    rule = next(r for r in rules() if r["uid"] == uid)
    return {dict(labels)["site"]: value for labels, value in evaluate(db, rule, at, ref).items()}


# One site, five and a half weeks of seasonal traffic, ending on Thursday 2026-03-05 00:00
# UTC: its band starts on Tuesday 2026-03-03 (analytics.baseline.history_start).
ONE_SITE = TrafficConfig(events=100_000, days=38, end=date(2026, 3, 5), sites=(SITE,),
                         site_weights=(1.0,), chunk_rows=25_000, paths_per_site=100,
                         visitors=5_000, bot_share=0.05)  # fmt: skip
# Wednesday noon, the last day: busy and steady from week to week.
EVALUATED_HOUR = datetime(2026, 3, 4, 12, tzinfo=UTC)
# One minute into the next hour: the evaluated hour is the last complete one.
EVALUATION = EVALUATED_HOUR + timedelta(hours=1, minutes=1)
ANOMALY = "telemetry-traffic-anomaly"
STOPPED = "telemetry-ingestion-stopped"


@pytest.fixture(scope="module", params=list(SERVER_BACKENDS))
def one_site(request: pytest.FixtureRequest, database_servers: DatabaseServers) -> Iterator[Seeded]:
    yield from seed(database_servers, request.param, "grafana_alerts", ONE_SITE)


def refresh_hour(db: Seeded) -> None:
    refresh(db.engine, EVALUATED_HOUR, EVALUATED_HOUR + timedelta(hours=1))


def test_anomaly_alert_stays_quiet_on_ordinary_traffic(one_site: Seeded):
    hits, first_hour = site_hourly(one_site, SITE)
    band = baseline.evaluate(
        hits, EVALUATED_HOUR, EVALUATED_HOUR + timedelta(hours=1), first_hour=first_hour
    ).iloc[0]
    spread = max(band["high"] - band["low"], math.sqrt(band["median"] + 1))
    assert band["anomaly"] is None
    assert band["low"] - baseline.DEFAULT_MARGIN * spread > 0, "a drop to nothing is an anomaly"
    assert firing(one_site, ANOMALY, EVALUATION) == set()


def test_anomaly_alert_fires_exactly_when_analytics_baseline_flags_the_hour(one_site: Seeded):
    day = datetime(2026, 3, 4, tzinfo=UTC)
    hits, first_hour = site_hourly(one_site, SITE)
    expected = baseline.evaluate(hits, day, day + timedelta(days=1), first_hour=first_hour)
    for hour, anomaly in expected["anomaly"].items():
        at = hour.to_pydatetime() + timedelta(hours=1, minutes=1)
        assert firing(one_site, ANOMALY, at) == ({SITE} if isinstance(anomaly, str) else set()), (
            hour
        )


def test_anomaly_alert_fires_on_a_spike(one_site: Seeded):
    high = values_of(one_site, ANOMALY, "HIGH", EVALUATION)[SITE]
    extra = int(2 * high) + 50
    spike = [
        NewHit(EVALUATED_HOUR + timedelta(seconds=i), SITE, "/", None, i.to_bytes(16, "big"),
               "injected-spike", "Chrome", "Windows", "desktop", False)
        for i in range(extra)
    ]  # fmt: skip
    load_hits(one_site.engine, [HitChunk.from_hits(spike)])
    refresh_hour(one_site)
    try:
        assert firing(one_site, ANOMALY, EVALUATION) == {SITE}
        assert values_of(one_site, ANOMALY, "SCORE", EVALUATION)[SITE] > build.DEFAULT_MARGIN
        # The hour before is still ordinary.
        assert firing(one_site, ANOMALY, EVALUATION - timedelta(hours=1)) == set()
    finally:
        with one_site.engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM hits WHERE user_agent = 'injected-spike'"))
        refresh_hour(one_site)
    assert firing(one_site, ANOMALY, EVALUATION) == set()


def test_anomaly_alert_fires_on_a_drop(one_site: Seeded):
    hour = {"start": EVALUATED_HOUR, "end": EVALUATED_HOUR + timedelta(hours=1)}
    in_hour = "site = :site AND ts >= :start AND ts < :end"
    with one_site.engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE held_back AS SELECT * FROM hits WHERE {in_hour}"),
                           {"site": SITE, **hour})  # fmt: skip
        connection.execute(sa.text(f"DELETE FROM hits WHERE {in_hour}"), {"site": SITE, **hour})
    refresh_hour(one_site)
    try:
        assert firing(one_site, ANOMALY, EVALUATION) == {SITE}
        assert values_of(one_site, ANOMALY, "SCORE", EVALUATION)[SITE] < -build.DEFAULT_MARGIN
        assert values_of(one_site, ANOMALY, "HITS", EVALUATION)[SITE] == 0
    finally:
        with one_site.engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO hits SELECT * FROM held_back"))
            connection.execute(sa.text("DROP TABLE held_back"))
        refresh_hour(one_site)
    assert firing(one_site, ANOMALY, EVALUATION) == set()


def test_ingestion_stopped_fires_only_when_a_busy_site_goes_silent(one_site: Seeded):
    assert firing(one_site, STOPPED, EVALUATED_HOUR + timedelta(minutes=40)) == set()
    # The data ends at midnight: half an hour later the site has been silent for 30 minutes.
    silent = ONE_SITE.end_time + timedelta(minutes=31)
    assert firing(one_site, STOPPED, silent) == {SITE}
    # Before its first hit a site has no usual traffic: silence then is not an alert.
    assert values_of(one_site, STOPPED, "RECENT", ONE_SITE.start_time) == {}
