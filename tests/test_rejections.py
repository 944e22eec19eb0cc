"""Every rejection rule of `/track`: the status, the one JSON error shape naming
the bad field, and that nothing at all was stored."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest


@pytest.fixture
def assert_nothing_stored(count_rows):
    def check() -> None:
        assert count_rows("hits") == 0
        assert count_rows("seen_events") == 0

    return check


def assert_error(response, status: int, error: str) -> dict:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def _iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


def _unix(delta: timedelta) -> float:
    return (datetime.now(UTC) + delta).timestamp()


# (event, the field the answer must name)
BAD_EVENTS = [
    # Wrong types, field by field.
    pytest.param({"url": 5}, "url", id="url-number"),
    pytest.param({"url": ["https://e.example/"]}, "url", id="url-array"),
    pytest.param({"path": 5}, "path", id="path-number"),
    pytest.param({"path": {"p": "/"}}, "path", id="path-object"),
    pytest.param({"path": "/", "site": 5}, "site", id="site-number"),
    pytest.param({"path": "/", "site": True}, "site", id="site-bool"),
    pytest.param({"path": "/", "referrer": 5}, "referrer", id="referrer-number"),
    pytest.param({"path": "/", "referrer": {}}, "referrer", id="referrer-object"),
    pytest.param({"path": "/", "ts": True}, "ts", id="ts-bool"),
    pytest.param({"path": "/", "ts": [1]}, "ts", id="ts-array"),
    pytest.param({"path": "/", "ts": "yesterday"}, "ts", id="ts-not-iso"),
    pytest.param({"path": "/", "event_id": 5}, "event_id", id="event_id-number"),
    pytest.param({"path": "/", "ua": 5}, "ua", id="ua-number"),
    pytest.param("just a string", "event", id="event-string"),
    pytest.param(42, "event", id="event-number"),
    pytest.param(None, "event", id="event-null"),
    # Timestamps out of the window (far enough out to stay so while a long suite
    # runs: these are computed at import), or without an offset.
    pytest.param({"path": "/", "ts": _unix(-timedelta(hours=49))}, "ts", id="ts-too-old-unix"),
    pytest.param({"path": "/", "ts": _iso(-timedelta(hours=49))}, "ts", id="ts-too-old-iso"),
    pytest.param({"path": "/", "ts": _iso(timedelta(hours=2))}, "ts", id="ts-future-iso"),
    pytest.param({"path": "/", "ts": _unix(timedelta(hours=2))}, "ts", id="ts-future-unix"),
    pytest.param({"path": "/", "ts": "2030-01-01T00:00:00"}, "ts", id="ts-naive-iso"),
    pytest.param({"path": "/", "ts": 1e300}, "ts", id="ts-out-of-range"),
    # Over-long fields.
    pytest.param({"path": "/" + "a" * 2048}, "path", id="path-too-long"),
    pytest.param({"url": "https://e.example/" + "a" * 2048}, "url", id="url-too-long"),
    pytest.param({"path": "/", "referrer": "r" * 2049}, "referrer", id="referrer-too-long"),
    pytest.param({"path": "/", "site": "s" * 254}, "site", id="site-too-long"),
    pytest.param({"path": "/", "event_id": "e" * 65}, "event_id", id="event_id-too-long"),
    # Unknown fields, missing url and path.
    pytest.param({"path": "/", "user_id": "u1"}, "user_id", id="unknown-field"),
    pytest.param({}, "path", id="empty-object"),
    pytest.param({"site": "e.example"}, "path", id="no-url-no-path"),
    pytest.param({"url": None, "path": None}, "path", id="null-url-and-path"),
    # Bad addresses and paths.
    pytest.param({"url": "ftp://e.example/x"}, "url", id="url-ftp"),
    pytest.param({"url": "javascript:alert(1)"}, "url", id="url-javascript"),
    pytest.param({"url": "//e.example/x"}, "url", id="url-no-scheme"),
    pytest.param({"url": "https:///no-host"}, "url", id="url-no-host"),
    pytest.param({"path": "relative/page"}, "path", id="path-relative"),
    pytest.param({"path": ""}, "path", id="path-empty"),
    pytest.param({"path": "/", "site": ""}, "site", id="site-empty"),
    # Control characters, and text no database can store.
    pytest.param({"path": "/a\nb"}, "path", id="path-newline"),
    pytest.param({"url": "https://e.example/\x00"}, "url", id="url-nul"),
    pytest.param({"path": "/", "site": "a\tb"}, "site", id="site-tab"),
    pytest.param({"path": "/", "referrer": "https://r.example/\x1b"}, "referrer", id="ref-esc"),
    pytest.param({"path": "/", "event_id": "a\x7f"}, "event_id", id="event_id-del"),
    pytest.param({"path": "/\ud800"}, "path", id="path-lone-surrogate"),
    # Idempotency keys are plain tokens.
    pytest.param({"path": "/", "event_id": "a b"}, "event_id", id="event_id-space"),
    pytest.param({"path": "/", "event_id": "ü"}, "event_id", id="event_id-non-ascii"),
]


@pytest.mark.parametrize(("event", "field"), BAD_EVENTS)
def test_bad_event_is_rejected_naming_the_field(client, assert_nothing_stored, event, field):
    response = client.post("/track", data=json.dumps(event), content_type="application/json")

    body = assert_error(response, 400, "bad_request")
    assert body["field"] == field
    assert body["detail"].startswith(f"{field} ")
    assert_nothing_stored()


@pytest.mark.parametrize("name", ["", " ", "two words"])
def test_an_unknown_field_that_is_not_a_name_is_quoted(client, assert_nothing_stored, name):
    response = client.post("/track", json={"path": "/", name: 1})

    body = assert_error(response, 400, "bad_request")
    assert body["field"] == name
    assert body["detail"] == f"{name!r} is not a known field"
    assert_nothing_stored()


@pytest.mark.parametrize(("event", "field"), BAD_EVENTS[:4])
def test_bad_beacon_is_rejected_too(client, assert_nothing_stored, event, field):
    response = client.post("/track", data=json.dumps(event), content_type="text/plain")

    assert assert_error(response, 400, "bad_request")["field"] == field
    assert_nothing_stored()


def test_one_bad_item_rejects_the_whole_batch(client, assert_nothing_stored):
    batch = [
        {"path": "/good-1", "event_id": "good-1"},
        {"path": "relative"},
        {"path": "/good-2", "event_id": "good-2"},
        {"path": "/", "colour": "red"},
        7,
    ]

    response = client.post("/track", json=batch)

    body = assert_error(response, 400, "bad_request")
    assert body["items"] == [
        {"index": 1, "field": "path", "reason": "must start with /"},
        {"index": 3, "field": "colour", "reason": "is not a known field"},
        {"index": 4, "field": "event", "reason": "must be a JSON object"},
    ]
    assert "3 of 5" in body["detail"]
    assert_nothing_stored()


def test_good_items_of_a_rejected_batch_can_be_sent_again(client, stored_hits):
    good = [{"path": "/good-1", "event_id": "good-1"}, {"path": "/good-2", "event_id": "good-2"}]
    client.post("/track", json=[*good, {"path": "relative"}])

    # The rejected batch left no idempotency keys behind, so the retry is stored.
    assert client.post("/track", json=good).status_code == 202
    assert [hit.path for hit in stored_hits()] == ["/good-1", "/good-2"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="unterminated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b'{"path": "/"}{"path": "/"}', id="two-documents"),
        pytest.param(b"[{'path': '/'}]", id="single-quotes"),
        pytest.param(b'\xff\xfe{"path": "/"}', id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="absurdly-deep"),
    ],
)
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_broken_json_is_rejected(client, assert_nothing_stored, body, content_type):
    response = client.post("/track", data=body, content_type=content_type)

    assert "not valid JSON" in assert_error(response, 400, "bad_request")["detail"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/html",
        None,
    ],
)
def test_unknown_content_type_is_rejected(client, assert_nothing_stored, content_type):
    headers = {"Content-Type": content_type} if content_type else {}

    response = client.post("/track", data=b'{"path": "/"}', headers=headers)

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_stored()


def test_empty_batch_is_rejected(client, assert_nothing_stored):
    response = client.post("/track", json=[])

    assert "empty" in assert_error(response, 400, "bad_request")["detail"]
    assert_nothing_stored()


@pytest.mark.parametrize(("max_batch", "size"), [(None, 501), (3, 4)])
def test_oversize_batch_is_rejected(make_app, assert_nothing_stored, max_batch, size):
    settings = {} if max_batch is None else {"max_batch": max_batch}
    client = make_app(**settings).test_client()

    response = client.post("/track", json=[{"path": f"/{n}"} for n in range(size)])

    body = assert_error(response, 413, "payload_too_large")
    assert str(max_batch or 500) in body["detail"]
    assert_nothing_stored()


def test_batch_of_exactly_max_batch_is_accepted(make_app, count_rows):
    client = make_app(max_batch=3).test_client()

    assert client.post("/track", json=[{"path": f"/{n}"} for n in range(3)]).status_code == 202
    assert count_rows("hits") == 3


def _body_of_size(size: int) -> bytes:
    """A valid single event of exactly `size` bytes."""
    prefix, suffix = b'{"path": "/', b'"}'
    return prefix + b"a" * (size - len(prefix) - len(suffix)) + suffix


def _post(client, body: bytes, *, chunked: bool):
    if not chunked:
        return client.post("/track", data=body, content_type="application/json")
    # No Content-Length: the server only learns the size by reading (sendBeacon
    # never does this, but an HTTP/1.1 client may).
    return client.post(
        "/track",
        input_stream=io.BytesIO(body),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_base={"wsgi.input_terminated": True},
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("max_body_bytes", [None, 1024])
def test_oversize_body_is_rejected(make_app, assert_nothing_stored, chunked, max_body_bytes):
    limit = max_body_bytes or 524288
    settings = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    client = make_app(**settings).test_client()

    response = _post(client, _body_of_size(limit + 1), chunked=chunked)

    body = assert_error(response, 413, "payload_too_large")
    assert str(limit) in body["detail"]
    assert_nothing_stored()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_of_exactly_max_body_bytes_is_accepted(make_app, count_rows, chunked):
    client = make_app(max_body_bytes=1024).test_client()

    assert _post(client, _body_of_size(1024), chunked=chunked).status_code == 202
    assert count_rows("hits") == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "p"),
        ("?r=https://r.example/", "p"),
        ("?p=relative", "path"),
        ("?p=", "path"),
        ("?p=/ok&s=" + "s" * 254, "site"),
        ("?p=/a%0Ab", "path"),
    ],
)
def test_bad_pixel_is_rejected(client, assert_nothing_stored, query, field):
    response = client.get(f"/track{query}")

    assert assert_error(response, 400, "bad_request")["field"] == field
    assert_nothing_stored()
