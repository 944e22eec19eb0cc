"""The OpenAPI description is kept true: valid OpenAPI 3.1, the same routes as the
app, and real answers (and requests) match the schemas it gives."""

from __future__ import annotations

import json
import sqlite3
from importlib.resources import files
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlalchemy.engine import make_url

DOCUMENT = json.loads(files("api").joinpath("openapi.json").read_text(encoding="utf-8"))
BASE = "urn:telemetry:openapi"
REGISTRY = Registry().with_resource(
    BASE, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def escape(token: str) -> str:
    """A JSON-pointer token."""
    return token.replace("~", "~0").replace("/", "~1")


def at(pointer: str) -> object:
    node: object = DOCUMENT
    for token in pointer.lstrip("/").split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]  # type: ignore[index]
    return node


def response_pointer(path: str, method: str, status: int) -> str:
    """Where the document describes this answer (following a `$ref`)."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not declare {status}"
    pointer = f"/paths/{escape(path)}/{method}/responses/{status}"
    while "$ref" in (node := at(pointer)):  # type: ignore[operator]
        pointer = node["$ref"].removeprefix("#")  # type: ignore[index]
    return pointer


def validator_at(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{BASE}#{pointer}"}, registry=REGISTRY)


def test_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate_openapi(DOCUMENT)


@pytest.mark.parametrize("name", sorted(DOCUMENT["components"]["schemas"]))
def test_component_schemas_are_valid_json_schema(name):
    Draft202012Validator.check_schema(DOCUMENT["components"]["schemas"][name])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_route_is_described_and_nothing_else(app):
    served = {
        (rule.rule.replace("<", "{").replace(">", "}"), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    described = {
        (path, method)
        for path, operations in DOCUMENT["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }

    assert sorted(served - described) == [], "served but not described"
    assert sorted(described - served) == [], "described but not served"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_served_document_is_the_file(client):
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == DOCUMENT


def _locked(database_url: str, request):
    """Run `request()` while another connection holds SQLite's write lock."""
    other = sqlite3.connect(make_url(database_url).database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        return request()
    finally:
        other.execute("ROLLBACK")
        other.close()


def _unmigrated_readyz(make_app, database_url):
    empty = Path(make_url(database_url).database).with_name("empty.db")
    return make_app(database_url=f"sqlite:///{empty}").test_client().get("/readyz")


# (path, method, the status this request must get, how to make it)
ANSWERS = [
    ("/track", "post", 202, lambda c, **_: c.post("/track", json={"path": "/"})),
    ("/track", "post", 202, lambda c, **_: c.post("/track", json=[{"path": "/"}] * 2)),
    (
        "/track",
        "post",
        204,
        lambda c, **_: c.post("/track", data='{"path":"/"}', content_type="text/plain"),
    ),
    ("/track", "post", 400, lambda c, **_: c.post("/track", json={"path": "x"})),
    ("/track", "post", 400, lambda c, **_: c.post("/track", json=[{"path": "/"}, {"p": 1}])),
    ("/track", "post", 400, lambda c, **_: c.post("/track", json=[])),
    (
        "/track",
        "post",
        400,
        lambda c, **_: c.post("/track", data="{", content_type="application/json"),
    ),
    ("/track", "post", 413, lambda c, **_: c.post("/track", json=[{"path": "/"}] * 4)),
    ("/track", "post", 413, lambda c, **_: c.post("/track", json={"path": "/" + "a" * 2000})),
    ("/track", "post", 415, lambda c, **_: c.post("/track", data="{}", content_type="text/xml")),
    (
        "/track",
        "post",
        503,
        lambda c, database_url, **_: _locked(
            database_url, lambda: c.post("/track", json={"path": "/"})
        ),
    ),
    ("/track", "get", 200, lambda c, **_: c.get("/track?p=/&r=https://r.example/&s=s")),
    ("/track", "get", 400, lambda c, **_: c.get("/track")),
    (
        "/track",
        "get",
        503,
        lambda c, database_url, **_: _locked(database_url, lambda: c.get("/track?p=/")),
    ),
    ("/t.js", "get", 200, lambda c, **_: c.get("/t.js")),
    ("/healthz", "get", 200, lambda c, **_: c.get("/healthz")),
    ("/readyz", "get", 200, lambda c, **_: c.get("/readyz")),
    (
        "/readyz",
        "get",
        503,
        lambda c, make_app, database_url: _unmigrated_readyz(make_app, database_url),
    ),
    ("/openapi.json", "get", 200, lambda c, **_: c.get("/openapi.json")),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("path", "method", "status", "send"),
    ANSWERS,
    ids=[f"{m}-{p}-{s}-{n}" for n, (p, m, s, _) in enumerate(ANSWERS)],
)
def test_real_answers_match_the_document(make_app, database_url, path, method, status, send):
    app = make_app(max_batch=3, max_body_bytes=1024, sqlite_busy_timeout_ms=50)

    response = send(app.test_client(), make_app=make_app, database_url=database_url)

    assert response.status_code == status
    pointer = response_pointer(path, method, status)
    described = at(pointer)
    for name, header in described.get("headers", {}).items():
        header = at(header["$ref"].removeprefix("#")) if "$ref" in header else header
        if header.get("required"):
            assert name in response.headers, f"{name} header missing"
        if name in response.headers and header["schema"].get("type") == "integer":
            Draft202012Validator(header["schema"]).validate(int(response.headers[name]))
    content = described.get("content", {})
    if not content:
        assert response.get_data() == b"", "an answer the document says has no body"
        return
    assert response.mimetype in content, f"{response.mimetype} is not described"
    if response.mimetype == "application/json":
        schema_pointer = f"{pointer}/content/{escape(response.mimetype)}/schema"
        validator_at(schema_pointer).validate(response.get_json())


EVENT = "/components/schemas/Event"
BODY = "/components/schemas/TrackBody"

# Requests the server accepts must be valid by the document...
GOOD_BODIES = [
    {"path": "/"},
    {"url": "https://example.com/a?utm_source=x#f"},
    {"url": "HTTP://example.com"},
    {"path": "/", "site": "s", "referrer": "", "ts": None, "event_id": "a.b:c-d_1", "ua": "x"},
    {"path": "/", "ts": "2026-01-01T00:00:00Z"},
    {"path": "/", "ts": "2026-01-01T01:00:00.123456+01:00"},
    {"path": "/", "ts": 1767225600.5},
    [{"path": "/a"}, {"url": "https://e.example/"}],
]
# ...and what it refuses for a reason the document can say, invalid by it.
BAD_BODIES = [
    [],
    {},
    {"site": "s"},
    {"path": "/", "extra": 1},
    {"path": "relative"},
    {"path": ""},
    {"path": "/" + "a" * 2048},
    {"path": "/a\nb"},
    {"url": "ftp://e.example/"},
    {"url": "https:///no-host"},
    {"url": 5},
    {"path": "/", "site": "s" * 254},
    {"path": "/", "site": ""},
    {"path": "/", "referrer": "r" * 2049},
    {"path": "/", "ts": "2026-01-01T00:00:00"},
    {"path": "/", "ts": True},
    {"path": "/", "event_id": "a b"},
    {"path": "/", "event_id": "e" * 65},
    {"path": "/", "ua": 5},
    "string",
    [{"path": "/"}, {"path": "x"}],
]


@pytest.mark.parametrize("body", GOOD_BODIES)
def test_accepted_requests_are_valid_by_the_document(body):
    validator_at(BODY).validate(body)


@pytest.mark.parametrize("body", BAD_BODIES)
def test_refused_requests_are_invalid_by_the_document(body):
    assert not validator_at(BODY).is_valid(body)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_server_agrees_with_the_document_on_those_requests(make_app, database_url, monkeypatch):
    from datetime import UTC, datetime

    # Pin the clock so the example timestamps are inside the accepted window.
    monkeypatch.setattr("api.track.utcnow", lambda: datetime(2026, 1, 1, 12, tzinfo=UTC))
    client = make_app().test_client()

    for body in GOOD_BODIES:
        assert client.post("/track", json=body).status_code == 202, body
    for body in BAD_BODIES:
        assert client.post("/track", json=body).status_code == 400, body
