"""`telemetry erase`: one visitor's hits deleted, every aggregate corrected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from api.privacy import address_hashes
from db import HitStore, NewHit
from db.aggregates import AGGREGATES, Mechanism, mechanism_of, refresh
from tests.conftest import BROWSER_UA

VISITOR = "203.0.113.9"
OTHER = "198.51.100.20"


def erase(database_url: str, *args: str, expect_ok: bool = True) -> str:
    result = CliRunner().invoke(
        main, ["erase", *args], env={"TELEMETRY_DATABASE_URL": database_url}
    )
    assert (result.exit_code == 0) is expect_ok, result.output
    return result.output


def scalar(engine: sa.Engine, sql: str, **params: object) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(sql), params).scalar_one()


def track(client, address: str, path: str, ts: datetime, site: str = "a.example") -> None:
    answer = client.post(
        "/track",
        json={"path": path, "site": site, "ts": ts.isoformat()},
        headers={"User-Agent": BROWSER_UA},
        environ_base={"REMOTE_ADDR": address},
    )
    assert answer.status_code == 202, answer.json


@pytest.fixture
def tracked(make_app, engine) -> datetime:
    """Two visitors' hits through /track, hours ago, with the aggregates materialised."""
    client = make_app().test_client()
    when = datetime.now(UTC).replace(minute=10, second=0, microsecond=0) - timedelta(hours=5)
    for minutes in (0, 1, 2):
        track(client, VISITOR, "/pricing", when + timedelta(minutes=minutes))
    track(client, VISITOR, "/", when + timedelta(minutes=3), site="b.example")
    track(client, OTHER, "/pricing", when + timedelta(minutes=4))
    refresh(engine)
    return when


def test_erasing_an_address_removes_its_hits_from_hits_and_every_aggregate(
    database_url, engine, tracked
):
    assert scalar(engine, "SELECT sum(visitors) FROM site_daily WHERE site = 'a.example'") == 2

    output = erase(database_url, "--ip", VISITOR)

    assert scalar(engine, "SELECT count(*) FROM hits") == 1
    assert VISITOR not in output
    assert "a.example: 3 hits of" in output and "b.example: 1 hits of" in output
    assert "deleted 4 hits" in output
    (ip_hash,) = address_hashes(engine, VISITOR).values()
    for aggregate in AGGREGATES:
        if "ip_hash" in aggregate.group_by:
            rows = f"SELECT count(*) FROM {aggregate.name} WHERE ip_hash = :h"
            assert scalar(engine, rows, h=ip_hash) == 0, aggregate.name
        hits = f"SELECT coalesce(sum(hits), 0) FROM {aggregate.name}"
        assert scalar(engine, hits) == 1, aggregate.name
    assert scalar(engine, "SELECT sum(visitors) FROM site_daily") == 1
    assert scalar(engine, "SELECT sum(visitors) FROM hits_hourly") == 1


def test_a_dry_run_deletes_nothing(database_url, engine, tracked):
    output = erase(database_url, "--ip", VISITOR, "--dry-run")
    assert "a.example: 3 hits" in output and "dry run: nothing deleted" in output
    assert scalar(engine, "SELECT count(*) FROM hits") == 5
    assert scalar(engine, "SELECT sum(hits) FROM site_daily") == 5


def test_erasing_by_hash_on_one_site(database_url, engine, tracked):
    (ip_hash,) = address_hashes(engine, VISITOR).values()

    output = erase(database_url, "--hash", ip_hash.hex(), "--site", "b.example")

    assert "b.example: 1 hits" in output and "a.example" not in output
    assert scalar(engine, "SELECT count(*) FROM hits WHERE site = 'b.example'") == 0
    assert scalar(engine, "SELECT count(*) FROM hits WHERE site = 'a.example'") == 4
    assert (
        scalar(engine, "SELECT coalesce(sum(hits), 0) FROM site_daily WHERE site = 'b.example'")
        == 0
    )


def test_an_unknown_visitor_is_reported(database_url, engine, tracked):
    output = erase(database_url, "--ip", "192.0.2.200")
    assert "no hits of this visitor" in output
    assert scalar(engine, "SELECT count(*) FROM hits") == 5


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --ip and --hash"),
        (("--ip", "192.0.2.1", "--hash", "00" * 16), "exactly one of --ip and --hash"),
        (("--ip", "not-an-address"), "--ip is not an IP address"),
        (("--hash", "xyz"), "hex digits"),
        (("--hash", "abcd"), "32 hex digits"),
    ],
)
def test_bad_arguments_are_refused(database_url, args, message):
    assert message in erase(database_url, *args, expect_ok=False)


def test_per_visitor_rows_go_even_where_raw_hits_are_gone(database_url, engine):
    """Rollup rows outlive raw hits (retention): erasure deletes the visitor's rows there too."""
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        pytest.skip("rows of continuous aggregates are only rematerialised (README, erasure)")
    old = datetime.now(UTC) - timedelta(days=40)
    ip_hash, other = b"e" * 16, b"o" * 16
    store = HitStore(engine)
    store.write(
        [
            NewHit(
                old, "a.example", "/", None, h, BROWSER_UA, "Chrome", "Windows", "desktop", False
            )
            for h in (ip_hash, other)
        ]
    )
    store.close()
    refresh(engine)
    with engine.begin() as connection:  # as retention would
        connection.execute(sa.text("DELETE FROM hits"))

    output = erase(database_url, "--hash", ip_hash.hex())

    assert "no hits of this visitor" in output
    assert "visitors_daily 1" in output
    assert scalar(engine, "SELECT count(*) FROM visitors_daily WHERE ip_hash = :h", h=ip_hash) == 0
    assert scalar(engine, "SELECT count(*) FROM visitors_daily WHERE ip_hash = :h", h=other) == 1
