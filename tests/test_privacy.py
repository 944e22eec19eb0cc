"""Keyed IP hashing: what is stored instead of the address, whose address it is,
how long a key lives, and that the raw address never reaches disk or logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from api.privacy import VisitorHasher, normalise_address
from db import make_engine
from db.models import HashSalt
from db.salts import salt_periods


def post_from(client, address: str, *, forwarded_for: str | None = None, path: str = "/"):
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    response = client.post(
        "/track", json={"path": path}, headers=headers, environ_base={"REMOTE_ADDR": address}
    )
    assert response.status_code == 202
    return response


def expected_hash(app, address: str, ts: datetime) -> bytes:
    """The hash the app's own hasher gives `address` for an event at `ts`."""
    return app.extensions["telemetry.ingestor"].hasher.ip_hash(address, ts, datetime.now(UTC))


def test_same_address_same_hash_other_address_other_hash(client, stored_hits):
    for address in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "2001:db8::1"):
        post_from(client, address)

    first, again, other, v6 = (hit.ip_hash for hit in stored_hits())
    assert all(len(h) == 16 for h in (first, again, other, v6))
    assert first == again
    assert len({first, other, v6}) == 3


def test_ipv4_mapped_ipv6_hashes_like_ipv4(client, stored_hits):
    post_from(client, "::ffff:1.2.3.4")
    post_from(client, "1.2.3.4")

    mapped, plain = stored_hits()
    assert mapped.ip_hash == plain.ip_hash


@pytest.mark.parametrize("address", ["198.51.100.7", "2001:db8::7", "::ffff:198.51.100.7"])
def test_stored_hash_is_hmac_sha256_of_the_periods_salt(client, database_url, stored_hits, address):
    """The documented definition, so that hashes stay comparable with any other
    HMAC-SHA256 implementation (and with `telemetry erase --ip`)."""
    post_from(client, address)

    [hit] = stored_hits()
    engine = make_engine(database_url)
    with engine.connect() as connection:
        [salt] = connection.execute(sa.select(HashSalt.salt)).scalars()
    engine.dispose()
    expected = hmac.new(salt, normalise_address(address), hashlib.sha256).digest()[:16]
    assert hit.ip_hash == expected


@pytest.mark.parametrize(
    ("address", "same_as"),
    [
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::FFFF:1.2.3.4", "1.2.3.4"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_equivalent_spellings_normalise_alike(address, same_as):
    assert normalise_address(address) == normalise_address(same_as)


@pytest.mark.parametrize("address", ["", "localhost", "1.2.3", "1.2.3.4.5", "::g"])
def test_non_addresses_are_refused(address):
    with pytest.raises(ValueError):
        normalise_address(address)


def test_forwarded_for_is_ignored_without_trusted_proxies(make_app, database_url, stored_hits):
    app = make_app(trusted_proxies=0)

    post_from(app.test_client(), "198.51.100.7", forwarded_for="203.0.113.9")

    [hit] = stored_hits()
    assert hit.ip_hash == expected_hash(app, "198.51.100.7", hit.ts)
    assert hit.ip_hash != expected_hash(app, "203.0.113.9", hit.ts)


@pytest.mark.parametrize(
    "forwarded_for",
    ["203.0.113.9", "6.6.6.6, 203.0.113.9", "6.6.6.6,5.5.5.5,   203.0.113.9"],
)
def test_last_forwarded_for_entry_is_used_through_one_trusted_proxy(
    make_app, database_url, stored_hits, forwarded_for
):
    app = make_app(trusted_proxies=1)

    post_from(app.test_client(), "10.0.0.1", forwarded_for=forwarded_for)

    [hit] = stored_hits()
    assert hit.ip_hash == expected_hash(app, "203.0.113.9", hit.ts)
    # Neither the proxy's own address nor what the client wrote further left.
    assert hit.ip_hash not in {
        expected_hash(app, "10.0.0.1", hit.ts),
        expected_hash(app, "6.6.6.6", hit.ts),
    }


def test_two_trusted_proxies_take_the_second_entry_from_the_right(
    make_app, database_url, stored_hits
):
    app = make_app(trusted_proxies=2)

    post_from(app.test_client(), "10.0.0.1", forwarded_for="6.6.6.6, 203.0.113.9, 10.0.0.2")

    [hit] = stored_hits()
    assert hit.ip_hash == expected_hash(app, "203.0.113.9", hit.ts)


@pytest.mark.parametrize("forwarded_for", ["garbage", "203.0.113.77:5678", "[2001:db8::77]:443"])
def test_malformed_forwarded_address_is_refused_and_not_logged(
    make_app, database_url, count_rows, caplog, forwarded_for
):
    caplog.set_level(logging.DEBUG)
    client = make_app(trusted_proxies=1).test_client()

    response = client.post(
        "/track",
        json={"path": "/"},
        headers={"X-Forwarded-For": forwarded_for},
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )

    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"
    assert forwarded_for not in response.get_data(as_text=True)
    assert count_rows("hits") == 0
    for address in RAW_ADDRESSES:
        assert address not in caplog.text


@pytest.fixture
def salts(database_url):
    """Every stored salt as {period: expires_at}."""
    engine = make_engine(database_url)

    def read() -> dict[str, datetime | None]:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(HashSalt.period, HashSalt.expires_at))
            return {period: expires for period, expires in rows}

    yield read
    engine.dispose()


def _next_midnight(ts: datetime) -> datetime:
    return datetime(ts.year, ts.month, ts.day, tzinfo=UTC) + timedelta(days=1)


def _next_month(ts: datetime) -> datetime:
    return datetime(ts.year + ts.month // 12, ts.month % 12 + 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("hash_period", "period_of", "end_of"),
    [
        ("daily", lambda ts: ts.strftime("%Y-%m-%d"), _next_midnight),
        ("monthly", lambda ts: ts.strftime("%Y-%m"), _next_month),
        ("none", lambda ts: "all", lambda ts: None),
    ],
    ids=["daily", "monthly", "none"],
)
@pytest.mark.parametrize("grace_hours", [0, 48])
def test_hash_period_decides_the_salt_period(
    make_app, database_url, stored_hits, salts, hash_period, period_of, end_of, grace_hours
):
    app = make_app(hash_period=hash_period, salt_grace_hours=grace_hours)

    post_from(app.test_client(), "198.51.100.1")

    [hit] = stored_hits()
    end = end_of(hit.ts)
    assert salts() == {
        period_of(hit.ts): None if end is None else end + timedelta(hours=grace_hours)
    }


def test_warm_up_makes_the_key_the_first_request_then_uses(make_app, stored_hits, salts):
    app = make_app()
    assert salts() == {}

    app.extensions["telemetry.ingestor"].warm_up()
    [period] = salts()
    post_from(app.test_client(), "198.51.100.1")

    [hit] = stored_hits()
    assert list(salts()) == [period]
    assert hit.ip_hash == expected_hash(app, "198.51.100.1", hit.ts)


def test_warm_up_without_a_database_warns_and_leaves_it_to_the_first_request(make_app, caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    app = make_app(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/telemetry")

    with caplog.at_level(logging.WARNING, logger="api"):
        app.extensions["telemetry.ingestor"].warm_up()

    assert "hashing key not loaded at start" in caplog.text


def test_salts_are_random_per_period(database_url):
    engine = make_engine(database_url)
    hasher = VisitorHasher(engine, "daily", timedelta(hours=48))
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)

    today_hash = hasher.ip_hash("198.51.100.1", now, now)
    yesterday_hash = hasher.ip_hash("198.51.100.1", yesterday, now)

    assert today_hash != yesterday_hash
    assert hasher.ip_hash("198.51.100.1", now, now) == today_hash
    assert salt_periods(engine) == sorted({yesterday.date().isoformat(), now.date().isoformat()})
    engine.dispose()


def test_another_process_reads_the_same_salt(database_url):
    """Workers share keys through the database: the same address hashes alike in each."""
    engines = [make_engine(database_url), make_engine(database_url)]
    now = datetime.now(UTC)

    hashes = {
        VisitorHasher(e, "monthly", timedelta(0)).ip_hash("1.2.3.4", now, now) for e in engines
    }

    assert len(hashes) == 1
    for engine in engines:
        engine.dispose()


def test_expired_salts_are_purged(database_url):
    engine = make_engine(database_url)
    hasher = VisitorHasher(engine, "daily", timedelta(hours=1))
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    old_day = old.date().isoformat()
    old_hash = hasher.ip_hash("198.51.100.1", old, old)  # made back then, by its own clock
    assert salt_periods(engine) == [old_day]

    assert hasher.purge_expired(now) == [old_day]
    assert salt_periods(engine) == []

    # The old period is closed for good: a late event hashes with today's key,
    # and the old key is not made again.
    late_hash = hasher.ip_hash("198.51.100.1", old, now)
    assert late_hash != old_hash
    assert late_hash == hasher.ip_hash("198.51.100.1", now, now)
    assert salt_periods(engine) == [now.date().isoformat()]
    engine.dispose()


def test_new_period_purges_expired_salts_of_other_processes(database_url):
    engine = make_engine(database_url)
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    VisitorHasher(engine, "daily", timedelta(0)).ip_hash("1.2.3.4", old, old)

    VisitorHasher(engine, "daily", timedelta(0)).ip_hash("1.2.3.4", now, now)

    assert salt_periods(engine) == [now.date().isoformat()]
    engine.dispose()


def test_closed_period_is_never_given_a_new_key(make_app, database_url, stored_hits, salts):
    # Daily keys with no grace: the key of the day before yesterday is gone, so an
    # event from 47 hours ago (still accepted) is hashed with today's key.
    client = make_app(hash_period="daily", salt_grace_hours=0).test_client()
    late = datetime.now(UTC) - timedelta(hours=47)

    client.post("/track", json={"path": "/late", "ts": late.timestamp()})
    client.post("/track", json={"path": "/now"})

    late_hit, now_hit = stored_hits()
    assert late_hit.ts.date() != now_hit.ts.date()
    assert late_hit.ip_hash == now_hit.ip_hash
    assert list(salts()) == [now_hit.ts.date().isoformat()]


RAW_ADDRESSES = ("203.0.113.77", "2001:db8::77")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_raw_address_reaches_neither_disk_nor_logs(make_app, database_url, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(log_level="DEBUG", trusted_proxies=1, sqlite_busy_timeout_ms=50)
    client = app.test_client()
    direct = {"REMOTE_ADDR": "203.0.113.77"}
    proxied = {"REMOTE_ADDR": "10.0.0.1"}
    via_proxy = {"X-Forwarded-For": "2001:db8::77"}
    spoofed = {"X-Forwarded-For": "2001:db8::77, 203.0.113.77"}

    for n in range(20):
        event = {"path": f"/p/{n}", "event_id": f"e{n}", "referrer": "https://r.example/"}
        client.post("/track", json=event, environ_base=direct)
        client.post("/track", json=[event, {"path": "/b"}], headers=via_proxy, environ_base=proxied)
    client.post("/track", data='{"path":"/beacon"}', content_type="text/plain", environ_base=direct)
    client.get("/track?p=/pixel", headers=spoofed, environ_base=proxied)
    # Errors are logged too: a bad event, a bad body, and a database outage (503).
    client.post("/track", json={"path": "nope"}, environ_base=direct)
    client.post("/track", data="{", content_type="application/json", headers=via_proxy)
    lock = sqlite3.connect(make_url(database_url).database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    assert client.post("/track", json={"path": "/"}, environ_base=direct).status_code == 503
    lock.execute("ROLLBACK")
    lock.close()

    folder = Path(make_url(database_url).database).parent
    assert any(path.name.endswith("-wal") for path in folder.iterdir())
    assert_addresses_absent(folder)
    app.extensions["telemetry.ingestor"].close()
    app.extensions["telemetry.engine"].dispose()
    assert_addresses_absent(folder)  # and after the WAL was checkpointed into the file

    assert "database cannot be written" in caplog.text  # the logs were really captured
    for address in RAW_ADDRESSES:
        assert address not in caplog.text


def assert_addresses_absent(folder: Path) -> None:
    for path in folder.iterdir():
        content = path.read_bytes()
        for address in RAW_ADDRESSES:
            assert address.encode() not in content, f"{address} found in {path.name}"
            assert address.encode("utf-16-le") not in content, f"{address} found in {path.name}"
