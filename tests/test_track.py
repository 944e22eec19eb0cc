"""Accepted events: what `/track` (JSON, beacon, pixel) stores, and the `/t.js` snippet."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta

import pytest

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


def test_single_json_event_is_stored(client, stored_hits, browser_headers, now):
    ts = (now - timedelta(hours=1)).replace(microsecond=250000)
    response = client.post(
        "/track",
        json={
            "url": "https://example.com/docs/intro?utm_source=news&session=abc#top",
            "referrer": "https://search.example/results",
            "ts": ts.isoformat(),
        },
        headers=browser_headers,
    )

    assert response.status_code == 202
    assert response.get_json() == {"accepted": 1}
    [hit] = stored_hits()
    assert hit.site == "example.com"
    assert hit.path == "/docs/intro?utm_source=news"
    assert hit.referrer == "https://search.example/results"
    assert hit.ts == ts
    assert hit.ts.tzinfo is not None and hit.ts.utcoffset() == timedelta(0)
    assert hit.user_agent == browser_headers["User-Agent"]
    assert (hit.browser, hit.os, hit.device, hit.is_bot) == ("Chrome", "Windows", "desktop", False)
    assert len(hit.ip_hash) == 16


def test_event_without_ts_is_stamped_with_the_arrival_time(client, stored_hits):
    before = datetime.now(UTC)
    assert client.post("/track", json={"path": "/"}).status_code == 202
    after = datetime.now(UTC)

    [hit] = stored_hits()
    assert before <= hit.ts <= after


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_900_000_000, datetime(2030, 3, 17, 17, 46, 40, tzinfo=UTC)),
        (1_900_000_000.5, datetime(2030, 3, 17, 17, 46, 40, 500000, tzinfo=UTC)),
        ("2030-03-17T17:46:40Z", datetime(2030, 3, 17, 17, 46, 40, tzinfo=UTC)),
        ("2030-03-17T19:46:40+02:00", datetime(2030, 3, 17, 17, 46, 40, tzinfo=UTC)),
        ("2030-03-17T12:46:40.123456-05:00", datetime(2030, 3, 17, 17, 46, 40, 123456, UTC)),
    ],
)
def test_client_timestamps_are_stored_in_utc(make_app, stored_hits, monkeypatch, ts, expected):
    # The window is checked against the server clock, so pin it next to the event.
    monkeypatch.setattr("api.track.utcnow", lambda: expected + timedelta(minutes=1))
    client = make_app().test_client()

    assert client.post("/track", json={"path": "/", "ts": ts}).status_code == 202
    [hit] = stored_hits()
    assert hit.ts == expected


@pytest.mark.parametrize(
    ("event", "origin", "default_site", "expected"),
    [
        pytest.param(
            {"url": "https://a.example/", "site": "Mine"},
            "https://o.example",
            "fallback",
            "Mine",
            id="explicit-site-wins",
        ),
        pytest.param(
            {"url": "https://A.Example:8443/x"},
            "https://o.example",
            "fallback",
            "a.example",
            id="host-of-url",
        ),
        pytest.param(
            {"path": "/x"}, "https://o.example:8080", "fallback", "o.example", id="origin-host"
        ),
        pytest.param({"path": "/x"}, None, "fallback", "fallback", id="default-site"),
        pytest.param({"path": "/x"}, "null", "fallback", "fallback", id="opaque-origin"),
        pytest.param({"path": "/x", "site": None}, None, "fallback", "fallback", id="null-site"),
    ],
)
def test_site_is_derived_in_order(make_app, stored_hits, event, origin, default_site, expected):
    client = make_app(default_site=default_site).test_client()
    headers = {"Origin": origin} if origin else {}

    assert client.post("/track", json=event, headers=headers).status_code == 202
    [hit] = stored_hits()
    assert hit.site == expected


@pytest.mark.parametrize(
    ("event", "expected_path"),
    [
        ({"path": "/p?utm_source=a&utm_medium=b&x=1"}, "/p?utm_source=a&utm_medium=b"),
        ({"path": "/p?x=1&y=2"}, "/p"),
        ({"path": "/p#frag"}, "/p"),
        ({"path": "/p?ref=hn#utm_source=in-fragment"}, "/p?ref=hn"),
        ({"path": "/p?"}, "/p"),
        ({"url": "https://e.example/p?gclid=1&utm_term=t#x"}, "/p?utm_term=t"),
        ({"url": "https://e.example"}, "/"),
        ({"url": "https://e.example?utm_content=c"}, "/?utm_content=c"),
        # An explicit path wins over the path of the url.
        ({"url": "https://e.example/from-url", "path": "/explicit"}, "/explicit"),
    ],
)
def test_query_string_is_dropped_except_allow_listed(client, stored_hits, event, expected_path):
    assert client.post("/track", json=event).status_code == 202
    [hit] = stored_hits()
    assert hit.path == expected_path


@pytest.mark.parametrize("app", [{"query_allowlist": ("lang",)}], indirect=True)
def test_query_allow_list_is_a_setting(client, stored_hits):
    assert client.post("/track", json={"path": "/p?lang=de&utm_source=x"}).status_code == 202
    [hit] = stored_hits()
    assert hit.path == "/p?lang=de"


def test_batch_is_stored_in_order(client, stored_hits):
    events = [{"path": f"/page/{n}"} for n in range(5)]

    response = client.post("/track", json=events)

    assert response.status_code == 202
    assert response.get_json() == {"accepted": 5}
    assert [hit.path for hit in stored_hits()] == [e["path"] for e in events]


@pytest.mark.parametrize(
    "body",
    [
        {"url": "https://beacon.example/a?utm_source=b"},
        [{"url": "https://beacon.example/a?utm_source=b"}],
    ],
    ids=["object", "array"],
)
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8"])
def test_text_plain_beacon_is_stored(client, stored_hits, body, content_type):
    response = client.post("/track", data=json.dumps(body), content_type=content_type)

    assert response.status_code == 204
    assert response.get_data() == b""
    [hit] = stored_hits()
    assert (hit.site, hit.path) == ("beacon.example", "/a?utm_source=b")


def test_pixel_answers_a_transparent_gif_and_stores_the_hit(client, stored_hits):
    response = client.get(
        "/track",
        query_string={
            "p": "/from-pixel?utm_source=mail&uid=9",
            "r": "https://ref.example/",
            "s": "pix.example",
        },
    )

    assert response.status_code == 200
    assert response.mimetype == "image/gif"
    body = response.get_data()
    assert body.startswith(b"GIF89a")
    assert struct.unpack("<HH", body[6:10]) == (1, 1)  # logical screen width, height
    cache_control = response.headers["Cache-Control"]
    assert "no-store" in cache_control and "no-cache" in cache_control
    assert response.headers["Pragma"] == "no-cache"
    [hit] = stored_hits()
    assert (hit.site, hit.path, hit.referrer) == (
        "pix.example",
        "/from-pixel?utm_source=mail",
        "https://ref.example/",
    )


def test_pixel_without_site_and_referrer_uses_the_defaults(make_app, stored_hits):
    client = make_app(default_site="fallback").test_client()

    assert client.get("/track?p=/only-path&r=&s=").status_code == 200
    [hit] = stored_hits()
    assert (hit.site, hit.path, hit.referrer) == ("fallback", "/only-path", None)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("respect_dnt", [True, False])
def test_snippet_is_served_with_the_dnt_setting(make_app, database_url, respect_dnt):
    client = make_app(respect_dnt=respect_dnt).test_client()

    response = client.get("/t.js")

    assert response.status_code == 200
    assert response.mimetype in ("application/javascript", "text/javascript")
    source = response.get_data(as_text=True)
    for needle in ("sendBeacon", "keepalive", "pushState", "popstate", "text/plain"):
        assert needle in source
    assert "__RESPECT_DNT__" not in source
    assert f"var respectDnt = {str(respect_dnt).lower()};" in source


DNT_REQUESTS = {
    "json": lambda c, h: c.post("/track", json={"path": "/dnt"}, headers=h),
    "beacon": lambda c, h: c.post(
        "/track", data='{"path": "/dnt"}', content_type="text/plain", headers=h
    ),
    "pixel": lambda c, h: c.get("/track?p=/dnt", headers=h),
}
DNT_STATUS = {"json": 202, "beacon": 204, "pixel": 200}


@pytest.mark.parametrize("kind", DNT_REQUESTS)
@pytest.mark.parametrize(
    ("respect_dnt", "dnt_header", "stored"),
    [(True, "1", 0), (True, "0", 1), (True, None, 1), (False, "1", 1)],
)
def test_do_not_track(make_app, stored_hits, kind, respect_dnt, dnt_header, stored):
    client = make_app(respect_dnt=respect_dnt).test_client()
    headers = {"DNT": dnt_header} if dnt_header else {}

    response = DNT_REQUESTS[kind](client, headers)

    assert response.status_code == DNT_STATUS[kind]
    if kind == "json":
        assert response.get_json() == {"accepted": stored}
    assert len(stored_hits()) == stored


@pytest.mark.parametrize(
    ("user_agent", "browser", "device"),
    [
        (GOOGLEBOT, "Googlebot", "bot"),
        ("curl/8.5.0", "curl", "bot"),
        ("", None, "bot"),
    ],
    ids=["googlebot", "curl", "empty"],
)
def test_bots_are_stored_and_flagged(client, stored_hits, user_agent, browser, device):
    response = client.post("/track", json={"path": "/"}, headers={"User-Agent": user_agent})

    assert response.status_code == 202
    [hit] = stored_hits()
    assert hit.is_bot is True
    assert (hit.browser, hit.device) == (browser, device)
    assert hit.user_agent == (user_agent or None)


def test_mobile_browser_is_classified(client, stored_hits):
    client.post("/track", json={"path": "/"}, headers={"User-Agent": IPHONE})

    [hit] = stored_hits()
    assert (hit.os, hit.device, hit.is_bot) == ("iOS", "mobile", False)


def test_ua_field_relays_a_visitors_user_agent(client, stored_hits):
    # Server-to-server senders name their visitors' agent; their own is irrelevant.
    events = [{"path": "/a", "ua": IPHONE}, {"path": "/b"}]

    client.post("/track", json=events, headers={"User-Agent": GOOGLEBOT})

    first, second = stored_hits()
    assert (first.user_agent, first.device, first.is_bot) == (IPHONE, "mobile", False)
    assert (second.user_agent, second.is_bot) == (GOOGLEBOT, True)


@pytest.mark.parametrize("source", ["header", "ua-field"])
def test_long_user_agent_is_capped_not_refused(client, stored_hits, source):
    user_agent = "Mozilla/5.0 " + "x" * 600
    if source == "header":
        response = client.post("/track", json={"path": "/"}, headers={"User-Agent": user_agent})
    else:
        response = client.post("/track", json={"path": "/", "ua": user_agent})

    assert response.status_code == 202
    [hit] = stored_hits()
    assert hit.user_agent == user_agent[:512]


def test_control_characters_are_stripped_from_the_ua_field(client, stored_hits):
    client.post("/track", json={"path": "/", "ua": "curl/8\n.5\x00"})

    [hit] = stored_hits()
    assert hit.user_agent == "curl/8.5"


def test_repeated_event_id_is_stored_once(client, stored_hits, count_rows):
    event = {"path": "/once", "event_id": "evt-1"}

    first = client.post("/track", json=event)
    second = client.post("/track", json=event)

    assert (first.status_code, second.status_code) == (202, 202)
    assert first.get_json() == second.get_json() == {"accepted": 1}
    assert [hit.path for hit in stored_hits()] == ["/once"]
    assert count_rows("seen_events") == 1


def test_repeated_event_id_inside_one_batch_is_stored_once(client, stored_hits):
    batch = [
        {"path": "/a", "event_id": "dup"},
        {"path": "/a-again", "event_id": "dup"},
        {"path": "/b", "event_id": "other"},
        {"path": "/no-id"},
        {"path": "/no-id"},
    ]

    response = client.post("/track", json=batch)

    assert response.status_code == 202
    assert response.get_json() == {"accepted": 5}
    assert [hit.path for hit in stored_hits()] == ["/a", "/b", "/no-id", "/no-id"]


def test_event_id_repeated_across_beacon_and_batch_is_stored_once(client, stored_hits):
    client.post("/track", data='{"path": "/x", "event_id": "k:1"}', content_type="text/plain")
    client.post("/track", json=[{"path": "/x", "event_id": "k:1"}, {"path": "/y"}])

    assert [hit.path for hit in stored_hits()] == ["/x", "/y"]
