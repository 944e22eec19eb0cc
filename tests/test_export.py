"""`telemetry export`: raw hits of a range as CSV or Parquet, streamed."""

from __future__ import annotations

import csv
import tracemalloc
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from bench.traffic import generate
from db import HitStore, NewHit
from db.bulk import load_hits
from db.export import export_hits

DAY = datetime(2026, 3, 1, tzinfo=UTC)


def a_hit(ts: datetime, site: str = "a.example", **fields: object) -> NewHit:
    hit = NewHit(ts, site, "/", None, b"\x01" * 16, "Mozilla/5.0", None, None, "desktop", False)
    return hit._replace(**fields)


def export(database_url: str, *args: str, expect_ok: bool = True) -> str:
    result = CliRunner().invoke(
        main, ["export", *args], env={"TELEMETRY_DATABASE_URL": database_url}
    )
    assert (result.exit_code == 0) is expect_ok, result.output
    return result.output


@pytest.fixture
def stored(engine) -> None:
    store = HitStore(engine)
    store.write(
        [
            a_hit(DAY - timedelta(seconds=1)),  # before the range
            a_hit(DAY, path='/q?a="1",b', referrer="https://r.example/", is_bot=True),
            a_hit(DAY + timedelta(hours=5), site="b.example", ip_hash=bytes(range(16))),
            a_hit(DAY + timedelta(days=1)),  # the end is excluded
        ]
    )
    store.close()


@pytest.mark.usefixtures("stored")
def test_csv_export_of_a_range(database_url, tmp_path):
    out = tmp_path / "hits.csv"
    output = export(
        database_url, "--from", "2026-03-01", "--to", "2026-03-02", "--format", "csv",
        "--out", str(out),
    )  # fmt: skip
    assert "wrote 2 hits" in output
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["ts"] for r in rows] == ["2026-03-01T00:00:00+00:00", "2026-03-01T05:00:00+00:00"]
    assert rows[0]["path"] == '/q?a="1",b'
    assert rows[0]["referrer"] == "https://r.example/"
    assert rows[0]["ip_hash"] == "01" * 16
    assert rows[0]["is_bot"] == "true" and rows[1]["is_bot"] == "false"
    assert rows[1]["ip_hash"] == bytes(range(16)).hex()
    assert set(rows[0]) == {"ts", "site", "path", "referrer", "ip_hash", "user_agent",
                            "browser", "os", "device", "is_bot"}  # fmt: skip


@pytest.mark.usefixtures("stored")
def test_parquet_export_of_one_site(database_url, tmp_path):
    out = tmp_path / "hits.parquet"
    export(
        database_url, "--from", "2026-03-01T00:00:00+00:00", "--to", "2026-03-02",
        "--site", "b.example", "--format", "parquet", "--out", str(out),
    )  # fmt: skip
    table = pq.read_table(out)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["ts"] == DAY + timedelta(hours=5)
    assert row["site"] == "b.example"
    assert row["ip_hash"] == bytes(range(16)).hex()
    assert row["is_bot"] is False


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_export_refuses_an_empty_range_and_leaves_no_file(database_url, tmp_path):
    out = tmp_path / "hits.csv"
    output = export(
        database_url, "--from", "2026-03-02", "--to", "2026-03-01", "--out", str(out),
        expect_ok=False,
    )  # fmt: skip
    assert "--to must be after --from" in output
    assert not out.exists()


def peak_memory(engine: sa.Engine, out: Path, file_format: str) -> int:
    tracemalloc.start()
    try:
        # Batches of 2,000: both sizes span several.
        start, end = DAY - timedelta(days=60), DAY + timedelta(days=1)
        export_hits(engine, out, start, end, file_format=file_format, batch_rows=2_000)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_whatever_the_number_of_rows(engine, tmp_path):
    def load(events: int) -> None:
        with engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM hits"))
        load_hits(engine, generate(days=28, events=events, end=date(2026, 3, 2), chunk_rows=50_000))

    formats = ("csv", "parquet")
    load(8_000)
    small = {f: peak_memory(engine, tmp_path / f"small.{f}", f) for f in formats}
    load(64_000)
    large = {f: peak_memory(engine, tmp_path / f"large.{f}", f) for f in formats}

    for file_format in formats:
        size = {n: (tmp_path / f"{n}.{file_format}").stat().st_size for n in ("small", "large")}
        assert size["large"] > 5 * size["small"]
        # Eight times the rows, not eight times the memory: a batch at a time.
        assert large[file_format] < 1.5 * small[file_format], (file_format, small, large)
