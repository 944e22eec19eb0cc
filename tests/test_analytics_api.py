"""GET /api/stats: the report figures as JSON, behind the report credentials."""

from __future__ import annotations

import base64

import pytest

from db import make_engine
from tests.test_analytics import MONTH, SITE, store
from tests.test_openapi import response_pointer, validator_at

TOKEN = "s3cret-token"


@pytest.fixture
def stats_app(make_app, database_url):
    engine = make_engine(database_url)
    try:
        store(engine, MONTH)
    finally:
        engine.dispose()
    return make_app(reports_token=TOKEN, reports_user="ops", reports_password="pa55")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {TOKEN}"}
OCTOBER = f"/api/stats?site={SITE}&from=2026-10-01&to=2026-10-31"


def test_stats_answers_the_figures_with_a_token_or_basic_auth(stats_app):
    client = stats_app.test_client()

    for answer in (
        client.get(OCTOBER, headers=BEARER),
        client.get(f"{OCTOBER}&token={TOKEN}"),
        client.get(OCTOBER, headers=basic("ops", "pa55")),
    ):
        assert answer.status_code == 200
        data = answer.get_json()
        assert data["summary"]["hits"] == 7
        assert data["summary"]["visitors"] == 3
        assert data["top_paths"][0] == {"path": "/", "hits": 3, "visitors": 2}


def test_stats_defaults_to_the_last_30_days(stats_app):
    answer = stats_app.test_client().get("/api/stats", headers=BEARER)

    assert answer.status_code == 200
    data = answer.get_json()
    assert len(data["daily"]) == 30
    assert data["site"] is None
    assert data["summary"]["hits"] == 0  # the fixture's hits are older


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"Authorization": "Bearer wrong"}, ""),
        ({}, "&token=wrong"),
        (basic("ops", "wrong"), ""),
        (basic("someone", "pa55"), ""),
    ],
)
def test_stats_refuses_missing_or_wrong_credentials(stats_app, headers, query):
    answer = stats_app.test_client().get(OCTOBER + query, headers=headers)

    assert answer.status_code == 401
    assert answer.get_json()["error"] == "unauthorized"
    challenge = answer.headers["WWW-Authenticate"]
    assert "Bearer" in challenge and "Basic" in challenge


def test_stats_are_closed_when_no_credentials_are_configured(make_app, database_url):
    answer = make_app().test_client().get(OCTOBER)

    assert answer.status_code == 401
    assert "Bearer" in answer.headers["WWW-Authenticate"]
    assert "TELEMETRY_REPORTS_TOKEN" in answer.get_json()["detail"]


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("from=2026-10-32&to=2026-10-31", "'2026-10-32' is not a date"),
        ("from=October&to=2026-10-31", "is not a date of the form YYYY-MM-DD"),
        ("from=2026-10-31&to=2026-10-01", "after it ends"),
        ("site=nope.example&from=2026-10-01&to=2026-10-31", "nope.example"),
    ],
)
def test_stats_answers_400_for_bad_input(stats_app, query, detail):
    answer = stats_app.test_client().get(f"/api/stats?{query}", headers=BEARER)

    assert answer.status_code == 400
    body = answer.get_json()
    assert body["error"] == "bad_request"
    assert detail in body["detail"]


def test_stats_has_the_reports_rate_limit(make_app, database_url):
    client = make_app(reports_token=TOKEN, ratelimit_reports="2/minute").test_client()

    codes = [client.get("/api/stats", headers=BEARER).status_code for _ in range(3)]

    assert codes == [200, 200, 429]


def test_answers_match_the_openapi_document(stats_app):
    client = stats_app.test_client()
    answers = {
        200: client.get(OCTOBER, headers=BEARER),
        400: client.get("/api/stats?from=2026-10-32", headers=BEARER),
        401: client.get(OCTOBER),
    }
    for status, answer in answers.items():
        assert answer.status_code == status
        validator_at(response_pointer("/api/stats", "get", status) + "/content/"
                     "application~1json/schema").validate(answer.get_json())  # fmt: skip
