"""The validator on its own: no Flask, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from api.events import (
    MAX_FUTURE,
    MAX_PAST,
    InvalidEvent,
    RequestContext,
    clean_path,
    parse_event,
    parse_timestamp,
)

NOW = datetime(2030, 6, 15, 12, 0, tzinfo=UTC)
ALLOW = frozenset({"utm_source", "utm_medium", "ref"})


def context(**changes) -> RequestContext:
    values = {
        "now": NOW,
        "user_agent": "Mozilla/5.0",
        "origin_host": None,
        "default_site": "default",
        "query_allowlist": ALLOW,
    }
    return RequestContext(**{**values, **changes})


@pytest.mark.parametrize(
    "ts",
    [
        NOW - MAX_PAST,
        NOW + MAX_FUTURE,
        NOW,
        NOW - timedelta(hours=47, minutes=59),
    ],
)
@pytest.mark.parametrize("form", ["unix", "iso-z", "iso-offset"])
def test_timestamps_inside_the_window_are_accepted(ts, form):
    if form == "unix":
        value: object = ts.timestamp()
    elif form == "iso-z":
        value = ts.isoformat().replace("+00:00", "Z")
    else:
        value = ts.astimezone(timezone(timedelta(hours=-7))).isoformat()

    parsed = parse_timestamp(value, NOW)

    assert parsed == ts and parsed.tzinfo == UTC


@pytest.mark.parametrize(
    "value",
    [
        (NOW - MAX_PAST - timedelta(microseconds=1)).isoformat(),
        (NOW + MAX_FUTURE + timedelta(microseconds=1)).isoformat(),
        (NOW - MAX_PAST).timestamp() - 0.01,
        (NOW + MAX_FUTURE).timestamp() + 0.01,
        0,
        -1,
    ],
)
def test_timestamps_outside_the_window_are_refused(value):
    with pytest.raises(InvalidEvent) as raised:
        parse_timestamp(value, NOW)
    assert raised.value.field == "ts"
    assert "48 hours" in raised.value.reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2030-06-15T12:00:00", "timezone"),
        ("2030-06-15", "timezone"),
        ("15/06/2030", "ISO 8601"),
        (True, "Unix seconds"),
        (None, "Unix seconds"),
        ({"s": 1}, "Unix seconds"),
        (float("nan"), "out of range"),
        (float("inf"), "out of range"),
        (10**30, "out of range"),
    ],
)
def test_malformed_timestamps_are_refused(value, reason):
    with pytest.raises(InvalidEvent) as raised:
        parse_timestamp(value, NOW)
    assert raised.value.field == "ts"
    assert reason in raised.value.reason


@pytest.mark.parametrize(
    ("raw", "allow", "expected"),
    [
        ("/", ALLOW, "/"),
        ("/a/b", ALLOW, "/a/b"),
        ("/a?utm_source=x&id=1", ALLOW, "/a?utm_source=x"),
        ("/a?id=1&utm_medium=m&utm_source=s", ALLOW, "/a?utm_medium=m&utm_source=s"),
        ("/a?utm_source=", ALLOW, "/a?utm_source="),
        ("/a?utm_source=x", frozenset(), "/a"),
        ("/a#section?utm_source=x", ALLOW, "/a"),
        ("/a?ref=1#x", ALLOW, "/a?ref=1"),
    ],
)
def test_clean_path(raw, allow, expected):
    assert clean_path(raw, allow) == expected


def test_clean_path_refuses_relative_paths():
    with pytest.raises(InvalidEvent) as raised:
        clean_path("page?x=1", ALLOW, "url")
    assert (raised.value.field, raised.value.reason) == ("url", "must start with /")


def test_minimal_event_takes_everything_else_from_the_request():
    event = parse_event({"path": "/"}, context(origin_host="o.example"))

    assert event.ts == NOW
    assert (event.site, event.path, event.referrer) == ("o.example", "/", None)
    assert (event.user_agent, event.event_id) == ("Mozilla/5.0", None)


def test_full_event_is_parsed():
    event = parse_event(
        {
            "url": "https://Shop.Example/cart?utm_source=ad&token=secret#pay",
            "site": "shop",
            "referrer": "https://r.example/",
            "ts": "2030-06-15T11:00:00Z",
            "event_id": "a1.b2:c3-d_4",
            "ua": "curl/8",
        },
        context(),
    )

    assert event.site == "shop"
    assert event.path == "/cart?utm_source=ad"
    assert event.referrer == "https://r.example/"
    assert event.ts == datetime(2030, 6, 15, 11, tzinfo=UTC)
    assert (event.event_id, event.user_agent) == ("a1.b2:c3-d_4", "curl/8")


@pytest.mark.parametrize("field", ["site", "referrer", "ts", "event_id", "ua", "url"])
def test_null_optional_fields_count_as_absent(field):
    event = parse_event({"path": "/", field: None}, context())

    assert event.path == "/"


def test_empty_referrer_counts_as_none():
    assert parse_event({"path": "/", "referrer": ""}, context()).referrer is None


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        ("a" * 600, "a" * 512),
        ("curl/8\r\n", "curl/8"),
        ("\x00\x01", None),
        ("", None),
        ("bad\ud800agent", "badagent"),
        (None, None),
    ],
)
def test_user_agent_is_cleaned_and_capped(user_agent, expected):
    assert parse_event({"path": "/"}, context(user_agent=user_agent)).user_agent == expected


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ([], "event"),
        ({"path": "/", "x": 1, "a": 2}, "a"),  # the first unknown field, alphabetically
        ({"path": "/", "event_id": "x/y"}, "event_id"),
        ({"path": "/", "site": "s" * 254}, "site"),
        ({"url": "mailto:a@b.example"}, "url"),
        ({"url": "https://e.example/", "path": "nope"}, "path"),
    ],
)
def test_invalid_items_name_their_field(item, field):
    with pytest.raises(InvalidEvent) as raised:
        parse_event(item, context())
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("field", "limit"),
    [("path", 2048), ("referrer", 2048), ("site", 253), ("event_id", 64)],
)
def test_fields_at_their_limit_are_accepted(field, limit):
    value = ("/" if field == "path" else "") + "a" * (limit - (field == "path"))
    item = {"path": "/", field: value}

    event = parse_event(item, context())

    assert len(getattr(event, field)) == limit
