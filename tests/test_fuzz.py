"""Fuzzing: whatever arrives, the validators, the address hashing and the API
either accept it (and what they keep is storable) or refuse it with a 4xx reason;
never an exception, never a 500. Plus the normalisations that must hold for every
input: IPv4-mapped IPv6 is IPv4, cleaning a path twice changes nothing, and so on.

Examples are bounded so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest
import schemathesis
from conftest import SERVER_BACKENDS, DatabaseServers, close_app
from flask import Flask
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from api import create_app
from api.events import (
    FIELDS,
    MAX_FUTURE,
    MAX_PAST,
    Event,
    InvalidEvent,
    RequestContext,
    clean_path,
    parse_event,
    parse_timestamp,
)
from api.health import openapi_document
from api.privacy import VisitorHasher, normalise_address
from api.settings import load_settings
from db import make_engine, migrate
from db.models import EVENT_ID_MAX, PATH_MAX, REFERRER_MAX, SITE_MAX, USER_AGENT_MAX

FUZZ = settings(max_examples=150, deadline=None)
# The app is built once per module, not per example (a Flask app per example
# would spend the budget on start-up); examples share its database.
HTTP_FUZZ = settings(max_examples=50, deadline=None)
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
ALLOWLIST = frozenset(load_settings({}).query_allowlist)
UNSTORABLE = {chr(c) for c in [*range(0x20), 0x7F, *range(0xD800, 0xE000)]}

# --- Strategies --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
paths = st.builds(
    lambda path, query, fragment: path + query + fragment,
    st.sampled_from(["/", "", "//"]).flatmap(lambda start: st.text().map(start.__add__)),
    st.sampled_from(["", "?"]).flatmap(
        lambda start: st.lists(
            st.tuples(st.sampled_from([*ALLOWLIST, "x", "utm"]), st.text(max_size=8)),
            max_size=3,
        ).map(lambda pairs: start + "&".join(f"{k}={v}" for k, v in pairs))
    ),
    st.sampled_from(["", "#", "#top"]),
)
urls = st.builds(
    lambda scheme, host, path: f"{scheme}{host}{path}",
    st.sampled_from(["http://", "https://", "ftp://", "", "http:/"]),
    st.one_of(st.text(max_size=12), st.sampled_from(["[", "[::1]", "a" * 300, "example.com:x"])),
    paths,
)
timestamps = st.one_of(
    st.floats(NOW.timestamp() - 3 * 86400, NOW.timestamp() + 3600),
    st.integers(),
    st.floats(),
    st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat),
    st.text(max_size=30),
)
field_values = {
    "url": urls,
    "path": paths,
    "site": st.text(max_size=300),
    "referrer": st.one_of(urls, st.text()),
    "ts": timestamps,
    "event_id": st.one_of(st.text(max_size=70), st.from_regex(r"[A-Za-z0-9._:\-]{1,70}")),
    "ua": st.text(max_size=600),
}
events = st.one_of(
    st.fixed_dictionaries({}, optional={k: v | json_values for k, v in field_values.items()}),
    st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=5), json_values),
    json_values,
)
contexts = st.builds(
    RequestContext,
    now=st.just(NOW),
    user_agent=st.none() | st.text(max_size=600),
    origin_host=st.none() | st.text(max_size=300),
    default_site=st.just("default"),
    query_allowlist=st.just(ALLOWLIST),
)
CONTEXT = RequestContext(NOW, None, None, "default", ALLOWLIST)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)

# --- Validators ---------------------------------------------------------------


def assert_storable(event: Event) -> None:
    """What parse_event lets through fits the columns and is clean text."""
    assert event.path.startswith("/")
    assert "#" not in event.path
    assert 0 < len(event.path) <= PATH_MAX
    assert 0 < len(event.site) <= SITE_MAX
    assert event.referrer is None or 0 < len(event.referrer) <= REFERRER_MAX
    assert event.user_agent is None or 0 < len(event.user_agent) <= USER_AGENT_MAX
    assert event.event_id is None or 0 < len(event.event_id) <= EVENT_ID_MAX
    for text in (event.path, event.site, event.referrer, event.user_agent, event.event_id):
        assert not UNSTORABLE.intersection(text or "")
    assert event.ts.utcoffset() == timedelta(0)
    assert NOW - MAX_PAST <= event.ts <= NOW + MAX_FUTURE


@FUZZ
@given(item=events, context=contexts)
# Inputs that once got through and overflowed a column on PostgreSQL.
@example(item={"url": f"http://{'a' * 300}/"}, context=CONTEXT)
@example(item={"path": "/"}, context=replace(CONTEXT, origin_host="o" * 300))
@example(item={"path": f"/?utm_source={'é' * 1000}"}, context=CONTEXT)
def test_any_event_is_accepted_storable_or_refused_with_a_reason(item, context):
    try:
        event = parse_event(item, context)
    except InvalidEvent as exc:
        assert isinstance(exc.field, str) and exc.reason  # the field may be an unknown ""
        return
    assert_storable(event)


@FUZZ
@given(raw=paths)
def test_cleaning_a_path_twice_changes_nothing_and_keeps_only_allowed_parameters(raw):
    try:
        cleaned = clean_path(raw, ALLOWLIST)
    except InvalidEvent:
        assert not raw.startswith("/")
        return
    assert clean_path(cleaned, ALLOWLIST) == cleaned
    assert {name for name, _ in parse_qsl(cleaned.partition("?")[2])} <= ALLOWLIST


@FUZZ
@given(value=timestamps)
def test_any_timestamp_is_inside_the_window_or_refused(value):
    try:
        ts = parse_timestamp(value, NOW)
    except InvalidEvent as exc:
        assert exc.field == "ts"
        return
    assert ts.utcoffset() == timedelta(0)
    assert NOW - MAX_PAST <= ts <= NOW + MAX_FUTURE


@FUZZ
@given(ts=st.datetimes(NOW.replace(tzinfo=None) - MAX_PAST, NOW.replace(tzinfo=None)))
def test_iso_and_unix_forms_of_one_moment_agree(ts):
    ts = ts.replace(tzinfo=UTC)
    from_iso = parse_timestamp(ts.isoformat(), NOW)
    from_unix = parse_timestamp(ts.timestamp(), NOW)
    assert from_iso == ts
    assert abs(from_unix - ts) <= timedelta(microseconds=1)


# --- Address normalisation and hashing ----------------------------------------


@FUZZ
@given(address=st.text(max_size=60) | st.ip_addresses().map(str))
def test_any_address_text_is_normalised_or_refused(address):
    try:
        packed = normalise_address(address)
    except ValueError:
        return
    assert len(packed) in (4, 16)


@FUZZ
@given(address=st.ip_addresses(v=4))
def test_ipv4_mapped_ipv6_is_the_ipv4_address(address):
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    forms = [str(address), str(mapped), mapped.exploded, mapped.exploded.upper()]
    assert {normalise_address(form) for form in forms} == {address.packed}


@FUZZ
@given(address=st.ip_addresses(v=6))
def test_every_spelling_of_an_ipv6_address_is_one_address(address):
    expected = address.ipv4_mapped.packed if address.ipv4_mapped else address.packed
    forms = [str(address), address.exploded, address.exploded.upper(), f"{address}%eth0"]
    assert {normalise_address(form) for form in forms} == {expected}


@pytest.fixture(scope="module")
def hasher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisitorHasher]:
    url = f"sqlite:///{tmp_path_factory.mktemp('hashing') / 'telemetry.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield VisitorHasher(engine, "monthly", timedelta(hours=48))
    engine.dispose()


@FUZZ
@given(
    first=st.ip_addresses(),
    second=st.ip_addresses(),
    moments=st.lists(st.integers(0, 13 * 86400), min_size=2, max_size=2),
)
def test_one_address_has_one_hash_per_period_and_two_addresses_two(hasher, first, second, moments):
    # Both moments fall in March 2026, one period of the monthly key.
    one, other = (datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=s) for s in moments)
    now = datetime(2026, 3, 15, tzinfo=UTC)
    hashed = hasher.ip_hash(str(first), one, now)
    assert len(hashed) == 16
    assert hasher.ip_hash(str(first), other, now) == hashed
    if first.version == 4:
        assert hasher.ip_hash(f"::ffff:{first}", other, now) == hashed
    assume(normalise_address(str(first)) != normalise_address(str(second)))
    assert hasher.ip_hash(str(second), one, now) != hashed


# --- The API over HTTP ----------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_app(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    database_servers: DatabaseServers,
) -> Iterator[Flask]:
    """One app per backend for the whole module: examples share its database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'telemetry.db'}"
        migrate.upgrade(url)
    else:
        url = database_servers.session_database(SERVER_BACKENDS[request.param])
        database_servers.empty_tables(url)
    app = create_app(
        load_settings({}, database_url=url, maintenance_interval_seconds=0, ratelimit_client="")
    )
    yield app
    close_app(app)


def assert_answer_is_accepted_or_refused_with_a_reason(response, events: int) -> None:
    assert response.status_code in (202, 204, 400, 413, 415), response.get_data()
    if response.status_code == 202:
        assert response.get_json() == {"accepted": events}
    elif response.status_code >= 400:
        answer = response.get_json()
        assert isinstance(answer["error"], str) and isinstance(answer["detail"], str)


@HTTP_FUZZ
@given(
    body=st.one_of(
        st.lists(events, max_size=3).map(json.dumps),
        events.map(json.dumps),
        st.binary(max_size=200),
    ),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/json; charset=utf-8", "text/html", ""]
    ),
    origin=header_text,
    user_agent=header_text,
)
def test_any_post_is_accepted_or_refused_with_a_4xx(
    fuzz_app, body, content_type, origin, user_agent
):
    response = fuzz_app.test_client().post(
        "/track",
        data=body,
        headers={"Content-Type": content_type, "Origin": origin, "User-Agent": user_agent},
    )
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    events_sent = len(payload) if isinstance(payload, list) else 1
    assert_answer_is_accepted_or_refused_with_a_reason(response, events_sent)


@HTTP_FUZZ
@given(
    query=st.dictionaries(
        st.sampled_from(["p", "r", "s", "x"]), st.text(max_size=40) | paths, max_size=4
    )
)
def test_any_pixel_request_is_a_gif_or_refused_with_a_4xx(fuzz_app, query):
    response = fuzz_app.test_client().get("/track", query_string=query)
    if response.status_code == 200:
        assert response.mimetype == "image/gif"
    else:
        assert_answer_is_accepted_or_refused_with_a_reason(response, 1)


# --- schemathesis: every documented operation ------------------------------------

OPERATIONS = [
    (method.upper(), path)
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method in ("get", "post", "put", "delete", "patch")
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_documented_operation_answers_as_documented(fuzz_app, method, path):
    """No 500s, and every answer's status, headers and body match the document.

    Not checked: that every schema-valid request is accepted. The document
    cannot say everything the validators enforce (the 48-hour window on `ts`,
    control characters, a text/plain body that must hold JSON), so a schema-valid
    but refused request is expected, and answered with a documented 400.
    """
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    operation = schema[path][method]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def answers_as_documented(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    answers_as_documented()


def test_fuzzing_reaches_storage_on_every_backend(fuzz_app):
    """The HTTP fuzzing above really stored events (it is not all refusals)."""
    engine = fuzz_app.extensions["telemetry.engine"]
    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT count(*) FROM hits").scalar_one()
    assert stored > 0
