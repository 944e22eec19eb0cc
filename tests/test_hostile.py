"""Hostile text from visitors, SQL and HTML/JavaScript in the path, referrer, user
agent and site: every way into /track stores it byte for byte (it is data, never
code), the tables stay intact, and the report page shows it escaped."""

from __future__ import annotations

import html
import json
import re

import pytest
import sqlalchemy as sa

from db import make_engine
from db.aggregates import refresh

SQL = "'; DROP TABLE hits; --"
HTML = "<script>alert(1)</script>"
# Quotes, backslashes, an entity, a percent escape and non-ASCII: other ways text
# gets mangled on its way into a database or a page.
MIXED = "\"\\' &amp; %27 ünï 😀 <img src=x onerror=alert(2)>"
HOSTILE = [SQL, HTML, MIXED]
TABLES = {"hits", "seen_events", "hash_salts"}


def send(client, channel: str, text: str) -> int:
    """One hit carrying `text` in path, referrer, user agent and site; the status."""
    path = f"/{text}"
    event = {"path": path, "referrer": text, "site": text}
    if channel == "json":
        return client.post("/track", json={**event, "ua": text}).status_code
    headers = {"User-Agent": text}
    if channel == "beacon":
        body = json.dumps(event).encode()
        headers["Content-Type"] = "text/plain"
        return client.post("/track", data=body, headers=headers).status_code
    query = {"p": path, "r": text, "s": text}
    return client.get("/track", query_string=query, headers=headers).status_code


@pytest.mark.parametrize("channel", ["json", "beacon", "pixel"])
def test_hostile_text_is_stored_verbatim_and_the_tables_stay_intact(
    client, database_url, stored_hits, channel
):
    statuses = [send(client, channel, text) for text in HOSTILE]

    assert set(statuses) <= {200, 202, 204}
    stored = stored_hits()
    assert [(h.path, h.referrer, h.site) for h in stored] == [(f"/{t}", t, t) for t in HOSTILE]
    assert [h.user_agent for h in stored] == HOSTILE
    engine = make_engine(database_url)
    with engine.connect() as connection:
        assert set(sa.inspect(connection).get_table_names()) >= TABLES
        assert connection.scalar(sa.text("SELECT count(*) FROM hits")) == len(HOSTILE)
        # Read back with a bound parameter: the text matches itself exactly.
        matches = connection.scalar(
            sa.text("SELECT count(*) FROM hits WHERE path = :path AND referrer = :text"),
            {"path": f"/{SQL}", "text": SQL},
        )
    engine.dispose()
    assert matches == 1
    assert client.post("/track", json={"path": "/after"}).status_code == 202


def texts_in(figures: object) -> set[str]:
    """Every string in the figures' data, as the page will show it."""
    if isinstance(figures, str):
        return {html.unescape(figures)}
    if isinstance(figures, dict):
        figures = list(figures.values())
    if isinstance(figures, list):
        return set().union(*map(texts_in, figures))
    return set()


def test_hostile_text_from_track_is_escaped_on_the_report_page(client, make_app, database_url):
    for text in HOSTILE:
        assert send(client, "json", text) == 202
    engine = make_engine(database_url)
    refresh(engine)
    engine.dispose()
    reports = make_app(reports_token="t0ken").test_client()

    for text in HOSTILE:
        page = reports.get(
            "/reports", query_string={"site": text}, headers={"Authorization": "Bearer t0ken"}
        )
        assert page.status_code == 200, page.get_data(as_text=True)
        source = page.get_data(as_text=True)
        # Never as markup: not in the HTML, not able to close the data block ...
        assert HTML not in source
        assert "<img src=x" not in source
        # ... yet shown all the same: in the heading, and in the data the figures
        # are drawn from (escaped for Plotly, which renders labels as HTML).
        assert f"Traffic report for {text}," in html.unescape(source)
        block = re.search(
            r'<script type="application/json" id="report-figures">(.*?)</script>', source, re.S
        )
        assert block is not None
        assert f"/{text}" in texts_in(json.loads(block[1]))
