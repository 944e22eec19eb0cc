"""GET /reports: credentials, month picker, range slicing, site filter and bad
input, on every backend; and the page in headless Chromium under the report
CSP, with visitor-controlled text stored in the database."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import write_hits
from flask.testing import FlaskClient
from headless_chromium import HeadlessChromium, assert_not_blank
from report_data import HOSTILE
from werkzeug.serving import make_server

from api.cli import main
from api.headers import REPORT_CSP
from db import NewHit, make_engine
from db.aggregates import refresh

TOKEN = "report-t0ken"
USER, PASSWORD = "ops", "s3cret pass"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CREDENTIALS = {"reports_token": TOKEN, "reports_user": USER, "reports_password": PASSWORD}
BEARER = {"Authorization": f"Bearer {TOKEN}"}

A, B, C = (bytes([n]) * 16 for n in (0xAA, 0xBB, 0xCC))


def hit(ts: str, who: bytes, path: str, site: str = "a.example", **extra: Any) -> NewHit:
    referrer = extra.get("referrer")
    agent = extra.get("agent", "Mozilla/5.0 test")
    browser = extra.get("browser", "Chrome")
    when = datetime.fromisoformat(ts).replace(tzinfo=UTC)
    return NewHit(when, site, path, referrer, who, agent, browser, "Linux", "desktop", False)


# September: a.example 2 hits. October: a.example 5 hits on two days, b.example 1.
HITS = [
    hit("2026-09-15 12:00", A, "/"),
    hit("2026-09-16 12:00", B, "/"),
    hit("2026-10-05 10:05", A, "/"),
    hit("2026-10-05 10:10", A, "/pricing"),
    hit("2026-10-05 11:30", B, "/"),
    hit("2026-10-06 10:15", A, "/"),
    hit("2026-10-06 14:00", C, "/docs"),
    hit("2026-10-05 12:00", A, "/", site="b.example"),
]


def store(database_url: str, hits: list[NewHit]) -> None:
    engine = make_engine(database_url)
    write_hits(engine, hits)
    refresh(engine, now=datetime(2026, 11, 20, tzinfo=UTC))
    engine.dispose()


@pytest.fixture
def reports(database_url: str, make_app) -> FlaskClient:
    store(database_url, HITS)
    return make_app(**CREDENTIALS).test_client()


def figures_of(response) -> list[dict[str, Any]]:
    """The figures a report page carries (its JSON data block)."""
    assert response.status_code == 200, response.get_data(as_text=True)
    block = re.search(
        r'<script type="application/json" id="report-figures">(.*?)</script>',
        response.get_data(as_text=True),
        re.S,
    )
    assert block is not None
    return json.loads(block[1])


def daily_hits(response) -> dict[str, int]:
    daily = next(f for f in figures_of(response) if f["layout"]["title"]["text"].endswith("day"))
    bars = daily["data"][0]
    return {day: hits for day, hits in zip(bars["x"], bars["y"], strict=True) if hits}


# --- credentials ---------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_reports_need_credentials(database_url, reports):
    refused = reports.get("/reports?month=2026-10")
    wrong = reports.get("/reports?month=2026-10", headers={"Authorization": "Bearer nope"})

    assert (refused.status_code, wrong.status_code) == (401, 401)
    assert refused.json["error"] == "unauthorized"
    assert "Basic" in refused.headers["WWW-Authenticate"]
    assert "10-05" not in refused.get_data(as_text=True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/reports?month=2026-10", BEARER),
        (f"/reports?month=2026-10&token={TOKEN}", {}),
        ("/reports?month=2026-10", {"Authorization": BASIC}),
    ],
    ids=["bearer", "query-token", "basic"],
)
def test_reports_open_with_token_or_basic_auth(database_url, reports, url, headers):
    response = reports.get(url, headers=headers)

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == REPORT_CSP
    assert daily_hits(response) == {"2026-10-05": 4, "2026-10-06": 2}  # both sites


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_query_token_is_kept_in_the_form(database_url, reports):
    page = reports.get(f"/reports?month=2026-10&token={TOKEN}").get_data(as_text=True)

    assert f'<input type="hidden" name="token" value="{TOKEN}">' in page


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_assets_need_no_credentials(database_url, reports):
    plotly = reports.get("/reports/assets/plotly.min.js")
    script = reports.get("/reports/assets/report.js")

    assert plotly.status_code == 200 and plotly.mimetype == "text/javascript"
    assert b"plotly.js" in plotly.data[:2000]
    assert b"report-figures" in script.data
    assert reports.get("/reports/assets/secrets.txt").status_code == 404


# --- month, range, site --------------------------------------------------------


def test_month_picker_range_and_site_filter_change_the_figures(database_url, reports):
    october = reports.get("/reports?month=2026-10&site=a.example", headers=BEARER)
    september = reports.get("/reports?month=2026-09&site=a.example", headers=BEARER)
    one_day = reports.get("/reports?month=2026-10&from=2026-10-06&to=2026-10-06", headers=BEARER)
    other_site = reports.get("/reports?month=2026-10&site=b.example", headers=BEARER)

    assert daily_hits(october) == {"2026-10-05": 3, "2026-10-06": 2}
    assert daily_hits(september) == {"2026-09-15": 1, "2026-09-16": 1}
    assert daily_hits(one_day) == {"2026-10-06": 2}
    assert daily_hits(other_site) == {"2026-10-05": 1}
    page = other_site.get_data(as_text=True)
    assert "Traffic report for b.example, 2026-10-01 to 2026-10-31" in page
    assert '<option value="a.example">a.example</option>' in page
    assert '<option value="b.example" selected>b.example</option>' in page
    assert '<input type="month" name="month" id="month" value="2026-10">' in page


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_all_sites_and_a_range_across_months(database_url, reports):
    response = reports.get("/reports?from=2026-09-16&to=2026-10-05", headers=BEARER)

    assert daily_hits(response) == {"2026-09-16": 1, "2026-10-05": 4}
    assert "Traffic report for all sites, 2026-09-16 to 2026-10-05" in response.get_data(
        as_text=True
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_month_without_hits_says_so(database_url, reports):
    response = reports.get("/reports?month=2026-08&site=a.example", headers=BEARER)

    assert figures_of(response) == []
    assert "No data for a.example from 2026-08-01 to 2026-08-31" in response.get_data(as_text=True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("month=2026-13", "'2026-13' is not a month of the form YYYY-MM"),
        ("month=october", "'october' is not a month of the form YYYY-MM"),
        ("month=2026-10&from=2026-10-40", "'2026-10-40' is not a date"),
        ("month=2026-10&to=5.10.2026", "'5.10.2026' is not a date of the form YYYY-MM-DD"),
        ("from=2026-10-20&to=2026-10-01", "starts (2026-10-20) after it ends (2026-10-01)"),
        ("month=2026-10&site=nowhere.example", "site 'nowhere.example'"),
    ],
)
def test_bad_month_date_or_site_is_a_400(database_url, reports, query, detail):
    response = reports.get(f"/reports?{query}", headers=BEARER)

    assert response.status_code == 400
    assert response.json["error"] == "bad_request"
    assert detail in response.json["detail"]


# --- in a browser ----------------------------------------------------------------


@pytest.fixture
def served(make_app, database_url) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, make_app(**CREDENTIALS), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_report_page_draws_in_chromium_under_its_csp(database_url, served, tmp_path):
    hostile = [
        hit("2026-10-07 09:00", A, HOSTILE, site=HOSTILE, referrer=f"https://{HOSTILE}/x",
            agent=HOSTILE, browser=HOSTILE),
        hit("2026-10-07 09:05", B, HOSTILE, site=HOSTILE, referrer=HOSTILE, browser=HOSTILE),
    ]  # fmt: skip
    store(database_url, HITS + hostile)
    chromium = HeadlessChromium(tmp_path / "chromium")
    try:
        chromium.open(f"{served}/reports?month=2026-10", headers={"Authorization": BASIC})
        all_sites = chromium.screenshot()
        drawn_all_sites = chromium.evaluate("document.body.dataset.drawn")
        options = chromium.evaluate(
            "Array.from(document.querySelectorAll('#site option')).map(o => o.textContent)"
        )
        errors_all_sites = chromium.errors()

        # Pick the hostile site in the form and go where the form sends it.
        query = chromium.evaluate(
            f"document.getElementById('site').value = {json.dumps(HOSTILE)};"
            "new URLSearchParams(new FormData(document.querySelector('form.controls')))"
            ".toString()"
        )
        chromium.open(f"{served}/reports?{query}", headers={"Authorization": BASIC})
        title = chromium.evaluate("document.querySelector('h1').textContent")
        labels = chromium.evaluate(
            "Array.from(document.querySelectorAll('svg .ytick text')).map(e => e.textContent)"
        )
        scripts = chromium.evaluate("document.querySelectorAll('script').length")
        errors_hostile_site = chromium.errors()
        dialogs = chromium.dialogs()
    finally:
        chromium.close()

    assert errors_all_sites == []  # no CSP violation, no exception
    assert drawn_all_sites == "9"
    assert_not_blank(all_sites)
    assert options == ["All sites", HOSTILE, "a.example", "b.example"]
    assert title == f"Traffic report for {HOSTILE}, 2026-10-01 to 2026-10-31"
    assert HOSTILE in labels  # the path on the top paths chart
    assert scripts == 3  # data block, plotly.js, report.js: nothing injected
    assert errors_hostile_site == [] and dialogs == []


def test_known_sites_on_every_backend(database_url):
    from api.reports import known_sites

    store(database_url, HITS)
    engine = make_engine(database_url)
    try:
        assert known_sites(engine) == ["a.example", "b.example"]
    finally:
        engine.dispose()


# --- telemetry report ----------------------------------------------------------


def run_report(database_url: str, *args: str, **env: str):
    return CliRunner().invoke(
        main, ["report", *args], env={"TELEMETRY_DATABASE_URL": database_url, **env}
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_writes_the_html_report(database_url, tmp_path):
    store(database_url, HITS)
    out = tmp_path / "october.html"

    result = run_report(
        database_url, "--month", "2026-10", "--site", "a.example", "--out", str(out)
    )

    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Traffic report for a.example, 2026-10-01 to 2026-10-31" in page
    assert "Plotly" in page and "<script src=" not in page  # plotly.js inline: opens offline


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fmt", ["png", "pdf"])
def test_cli_without_chromium_says_so_and_fails(database_url, tmp_path, fmt):
    store(database_url, HITS)
    out = tmp_path / f"october.{fmt}"

    result = run_report(
        database_url, "--month", "2026-10", "--format", fmt, "--out", str(out),
        BROWSER_PATH=str(tmp_path / "no-chromium"),
    )  # fmt: skip

    assert result.exit_code == 1
    assert "Error: PNG and PDF reports are drawn by Chromium" in result.output
    assert "install Debian's `chromium` package" in result.output
    assert not out.exists()
