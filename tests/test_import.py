"""`telemetry import`: access logs become hits through /track's validation,
hashing and bot flagging, at the logs' own times, each line stored once."""

from __future__ import annotations

import gzip
import json
import random
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from api.logimport import BATCH_LINES, _clf_micros, _LineReader
from api.privacy import address_hashes, period_bounds
from db.models import HashSalt, Hit
from tests.conftest import BROWSER_UA

BOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
NOW = datetime.now(UTC).replace(microsecond=0)
# Last month and more: a period whose hashing key is closed for good.
OLD = NOW - timedelta(days=100)


def clf(
    address: str,
    ts: datetime,
    request: str = "GET / HTTP/1.1",
    status: int = 200,
    referrer: str = "-",
    agent: str = BROWSER_UA,
    offset: str = "+0000",
) -> str:
    """One combined-format line; `ts` is shown in the zone of `offset`."""
    sign = -1 if offset[0] == "-" else 1
    local = ts + sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
    when = local.strftime("%d/%b/%Y:%H:%M:%S") + f" {offset}"
    return f'{address} - - [{when}] "{request}" {status} 512 "{referrer}" "{agent}"\n'


def run_import(database_url: str, *args: str, expect_ok: bool = True, **env: str) -> str:
    result = CliRunner().invoke(
        main, ["import", *args], env={"TELEMETRY_DATABASE_URL": database_url, **env}
    )
    if expect_ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result.output


def hits(engine: sa.Engine) -> list[Hit]:
    with sa.orm.Session(engine) as session:
        return list(session.scalars(sa.select(Hit).order_by(Hit.ts, Hit.id)))


def scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(sql)).scalar_one()


def test_page_views_become_hits_at_the_logs_times(database_url, engine, tmp_path):
    recent = NOW - timedelta(hours=72)  # older than /track's 48-hour window
    log = tmp_path / "access.log"
    log.write_text(
        clf("203.0.113.7", recent, "GET /pricing?utm_source=news&token=secret HTTP/1.1",
            referrer="https://news.example.org/item?id=7", offset="-0700")
        + clf("203.0.113.7", recent + timedelta(seconds=30), "GET /static/app.css HTTP/1.1")
        + clf("203.0.113.7", recent + timedelta(seconds=31), "POST /signup HTTP/1.1")
        + clf("203.0.113.8", recent + timedelta(seconds=32), "GET /missing HTTP/1.1", 404)
        + clf("203.0.113.8", recent + timedelta(seconds=33), "GET /moved HTTP/1.1", 301)
        + clf("66.249.66.1", recent + timedelta(seconds=40), "GET /docs HTTP/1.1", agent=BOT_UA)
    )  # fmt: skip

    # One permanent key: 72 hours ago may be in a closed month (see the next tests).
    output = run_import(
        database_url, str(log), "--site", "example.com", TELEMETRY_HASH_PERIOD="none"
    )

    stored = hits(engine)
    assert [(h.ts, h.path) for h in stored] == [
        (recent, "/pricing?utm_source=news"),
        (recent + timedelta(seconds=33), "/moved"),
        (recent + timedelta(seconds=40), "/docs"),
    ]
    first = stored[0]
    assert first.site == "example.com"
    assert first.referrer == "https://news.example.org/item"  # query stripped, as /track does
    assert (first.browser, first.device, first.is_bot) == ("Chrome", "desktop", False)
    assert stored[2].is_bot and stored[2].device == "bot"
    # Hashed with the period's key, as /track would have.
    assert first.ip_hash == address_hashes(engine, "203.0.113.7")["all"]
    assert "3 hits stored" in output
    assert "1 method, 1 static, 1 status" in output
    assert "203.0.113" not in output
    # The aggregates count them (bots apart).
    assert scalar(engine, "SELECT sum(hits) FROM hits_hourly") == 2
    assert scalar(engine, "SELECT sum(bot_hits) FROM site_daily") == 1


def test_flags_keep_static_assets_other_methods_and_statuses(database_url, engine, tmp_path):
    log = tmp_path / "access.log"
    log.write_text(
        clf("198.51.100.1", NOW - timedelta(hours=5), "GET /app.js HTTP/1.1")
        + clf("198.51.100.1", NOW - timedelta(hours=5), "POST /form HTTP/1.1")
        + clf("198.51.100.1", NOW - timedelta(hours=5), "GET /gone HTTP/1.1", 410)
    )
    run_import(database_url, str(log), "--include-static", "--all-methods", "--all-statuses")
    assert [h.path for h in hits(engine)] == ["/app.js", "/form", "/gone"]
    assert {h.site for h in hits(engine)} == {"default"}  # TELEMETRY_DEFAULT_SITE


def test_importing_the_same_file_twice_stores_each_line_once(database_url, engine, tmp_path):
    lines = [clf(f"192.0.2.{n % 50}", NOW - timedelta(minutes=n)) for n in range(120, 0, -1)]
    log = tmp_path / "access.log"
    log.write_text("".join(lines))
    run_import(database_url, str(log))
    assert scalar(engine, "SELECT count(*) FROM hits") == 120

    output = run_import(database_url, str(log))
    assert scalar(engine, "SELECT count(*) FROM hits") == 120
    assert "0 hits stored, 120 lines imported before" in output

    # The same lines gzipped (e.g. after logrotate) are the same file.
    packed = tmp_path / "access.log.1.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    run_import(database_url, str(packed))
    assert scalar(engine, "SELECT count(*) FROM hits") == 120

    # A live log that has grown since: only the new lines are imported.
    more = [clf("192.0.2.99", NOW - timedelta(seconds=n)) for n in range(30, 0, -1)]
    log.write_text("".join(lines + more))
    output = run_import(database_url, str(log))
    assert scalar(engine, "SELECT count(*) FROM hits") == 150
    assert "30 hits stored, 120 lines imported before" in output
    run_import(database_url, str(log))
    assert scalar(engine, "SELECT count(*) FROM hits") == 150


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_file_longer_than_a_batch_is_stored_once_too(database_url, engine, tmp_path):
    count = BATCH_LINES + 500
    start = NOW - timedelta(days=3)
    log = tmp_path / "big.log"
    log.write_text(
        "".join(
            clf(f"10.0.{n // 250}.{n % 250}", start + timedelta(seconds=n)) for n in range(count)
        )
    )
    run_import(database_url, str(log))
    run_import(database_url, str(log))
    assert scalar(engine, "SELECT count(*) FROM hits") == count
    assert scalar(engine, "SELECT count(*) FROM seen_events") == 2  # one key per batch


def test_malformed_lines_are_reported_by_number(database_url, engine, tmp_path):
    good = clf("192.0.2.1", NOW - timedelta(hours=3))
    log = tmp_path / "access.log"
    log.write_text(
        good
        + "not a log line\n"
        + good.replace("[", "[99/Foo/")  # a bad time
        + clf("not-an-address", NOW - timedelta(hours=3))
        + clf("192.0.2.1", NOW - timedelta(hours=3), "GET relative/path HTTP/1.1")
        + clf("192.0.2.1", NOW + timedelta(days=1))
        + good
    )

    output = run_import(database_url, str(log), "--max-errors", "5")

    assert scalar(engine, "SELECT count(*) FROM hits") == 2
    assert "5 malformed" in output
    listed = dict(
        line.strip().removeprefix("line ").split(": ", 1)
        for line in output.splitlines()
        if line.startswith("  line ")
    )
    listed = {int(number): reason for number, reason in listed.items()}
    assert sorted(listed) == [2, 3, 4, 5, 6]
    for number, reason in [
        (2, "not in the expected format"),
        (3, "bad timestamp"),
        (4, "the client address is not an IP address"),
        (5, "bad page address"),
        (6, "in the future"),
    ]:
        assert reason in listed[number]


def test_too_many_malformed_lines_stop_the_import(database_url, engine, tmp_path):
    log = tmp_path / "access.log"
    log.write_text(clf("192.0.2.1", NOW - timedelta(hours=3)) + "junk\n" * 3)

    output = run_import(database_url, str(log), "--max-errors", "2", expect_ok=False)

    assert "more than 2 malformed lines" in output
    assert "line 2: not in the expected format" in output
    assert scalar(engine, "SELECT count(*) FROM hits") == 0
    assert scalar(engine, "SELECT count(*) FROM seen_events") == 0


def test_common_and_nginx_json_formats(database_url, engine, tmp_path):
    ts = NOW - timedelta(days=2, hours=1)
    common = tmp_path / "common.log"
    common.write_text(clf("192.0.2.5", ts).split(' "-"')[0] + "\n")
    run_import(database_url, str(common), "--format", "common", "--site", "a.example")

    records = [
        {"time_iso8601": (ts + timedelta(minutes=1)).isoformat(), "remote_addr": "2001:db8::1",
         "request": "GET /json HTTP/2.0", "status": "200", "http_referer": "-",
         "http_user_agent": BROWSER_UA, "host": "b.example"},
        {"msec": f"{(ts + timedelta(minutes=2)).timestamp():.3f}", "remote_addr": "192.0.2.6",
         "request_method": "GET", "request_uri": "/split?ref=x", "status": 302,
         "http_user_agent": BOT_UA, "host": "b.example"},
        {"time_local": (ts + timedelta(minutes=3)).strftime("%d/%b/%Y:%H:%M:%S +0000"),
         "remote_addr": "192.0.2.7", "request": "GET /local HTTP/1.1", "status": "200",
         "server_name": "c.example"},
    ]  # fmt: skip
    nginx = tmp_path / "nginx.json.log"
    nginx.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    output = run_import(database_url, str(nginx), "--format", "nginx-json")

    stored = [(h.ts, h.site, h.path, h.is_bot) for h in hits(engine)]
    assert stored == [
        (ts, "a.example", "/", True),  # the common format has no user agent: a script
        (ts + timedelta(minutes=1), "b.example", "/json", False),
        (ts + timedelta(minutes=2), "b.example", "/split?ref=x", True),
        (ts + timedelta(minutes=3), "c.example", "/local", True),
    ]
    assert "line 4: not a JSON object" in output


def test_a_closed_periods_hits_are_hashed_with_a_key_that_is_not_kept(
    database_url, engine, tmp_path
):
    log = tmp_path / "old.log"
    log.write_text(
        clf("192.0.2.10", OLD)
        + clf("192.0.2.10", OLD + timedelta(minutes=5))
        + clf("192.0.2.11", OLD + timedelta(minutes=6))
        + clf("192.0.2.10", NOW - timedelta(hours=1))
    )

    output = run_import(database_url, str(log))

    old_period = period_bounds("monthly", OLD)[0]
    with engine.connect() as connection:
        periods = set(connection.scalars(sa.select(HashSalt.period)))
    assert old_period not in periods  # never made again, so never linkable
    assert period_bounds("monthly", NOW)[0] in periods
    assert "one-off key" in output and old_period in output
    stored = hits(engine)
    # Within the import, one visitor keeps one hash in the closed period ...
    assert stored[0].ip_hash == stored[1].ip_hash != stored[2].ip_hash
    # ... which is not the hash of any key still held.
    assert stored[0].ip_hash not in address_hashes(engine, "192.0.2.10").values()
    assert stored[3].ip_hash in address_hashes(engine, "192.0.2.10").values()
    assert scalar(engine, "SELECT count(DISTINCT ip_hash) FROM visitors_daily WHERE hits > 0") == 3


def test_lines_older_than_raw_retention_are_left_out(database_url, engine, tmp_path):
    log = tmp_path / "access.log"
    log.write_text(clf("192.0.2.1", NOW - timedelta(days=40)) + clf("192.0.2.1", NOW))
    result = CliRunner().invoke(
        main,
        ["import", str(log)],
        env={"TELEMETRY_DATABASE_URL": database_url, "TELEMETRY_RETENTION_DAYS": "30"},
    )
    assert result.exit_code == 0, result.output
    assert "1 older than retention" in result.output
    assert scalar(engine, "SELECT count(*) FROM hits") == 1


def test_import_refuses_a_missing_file(database_url, tmp_path):
    output = run_import(database_url, str(tmp_path / "nope.log"), expect_ok=False)
    assert "does not exist" in output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_time_before_the_year_1000_is_malformed(database_url, engine, tmp_path):
    log = tmp_path / "access.log"
    log.write_text(clf("192.0.2.1", NOW - timedelta(hours=3)).replace(f"/{NOW.year}:", "/0999:"))

    output = run_import(database_url, str(log))

    assert "line 1: bad timestamp" in output
    assert scalar(engine, "SELECT count(*) FROM hits") == 0


def test_clf_times_read_by_numpy_are_strptimes():
    # The fast reading of `[10/Oct/2000:13:55:36 -0700]` must agree with
    # Arrow's strptime on every time, including those it leaves to strptime.
    rng = random.Random(7)
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    times, zones = [], []
    for _ in range(20_000):
        day = rng.choice([rng.randint(1, 28), 0, 29, 30, 31, 32])
        month = rng.choice([*months, "jan", "Foo"])
        year = rng.choice([rng.randint(1000, 9999), 1900, 2000, 2024, 2100, 999])
        hour, minute = rng.choice([rng.randint(0, 23), 24]), rng.choice([rng.randint(0, 59), 60])
        second = rng.choice([rng.randint(0, 59), 60])
        zone = rng.choice(["+0000", "-0700", "+0530", "-2359", "+2400", "+0060", "0000", "+0a00"])
        time = f"[{day:02d}/{month}/{year:04d}:{hour:02d}:{minute:02d}:{second:02d}"
        if rng.random() < 0.05:
            time = time.replace("/", "-", 1)
        times.append(time)
        zones.append(zone + "]")
    time_column, zone_column = pa.array(times), pa.array(zones)

    micros, valid = _clf_micros(time_column, zone_column)

    joined = pc.binary_join_element_wise(time_column, zone_column, " ")
    expected = pc.strptime(joined, format="[%d/%b/%Y:%H:%M:%S %z]", unit="us", error_is_null=True)
    assert valid.tolist() == expected.is_valid().to_pylist()
    assert 1000 < valid.sum() < len(times)  # both kinds were tried
    assert micros[valid].tolist() == expected.drop_null().cast(pa.int64()).to_pylist()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("last_newline", [True, False])
def test_lines_are_read_in_batches_as_written(tmp_path, compressed, last_newline):
    # Lines of many lengths, empty ones included.
    lines = [b"" if n % 13 == 0 else f"line {n} {'x' * (n % 70)}".encode() for n in range(3000)]
    lines = [line + b"\n" for line in lines]
    if not last_newline:
        lines[-1] = lines[-1].rstrip(b"\n") or b"x"
    data = b"".join(lines)
    path = tmp_path / "access.log"
    path.write_bytes(gzip.compress(data) if compressed else data)
    _LineReader.BLOCK = 1000  # many blocks per batch, and batches ending inside blocks
    try:
        with path.open("rb") as raw:
            reader = _LineReader(raw)
            assert reader.peek_line() == lines[0]
            batches = [reader.read(count) for count in (1, 700, 1, 2000, 700, 5)]
    finally:
        _LineReader.BLOCK = 1 << 20
    assert [count for _, count in batches] == [1, 700, 1, 2000, 298, 0]
    assert b"".join(batch for batch, _ in batches) == data
    assert batches[3][0] == b"".join(lines[702:2702])
