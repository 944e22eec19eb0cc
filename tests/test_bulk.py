"""The bulk loader (db/bulk.py) stores exactly what the hot writer stores."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.traffic import SMALL, Traffic
from db import HitStore, NewHit, make_engine
from db.bulk import HitChunk, arrow_copy_text, copy_text, load_hits
from db.hits import HIT_COLUMNS, _sqlite_ts
from db.models import Hit

# Values the generator never makes: COPY escapes, NULLs, odd bytes, microsecond edges.
AWKWARD = [
    NewHit(datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), "example.com",
           "/a\tb\\c\nd\re?utm_source=x", None, bytes(16), None, None, None, "bot", True),
    NewHit(datetime(2026, 2, 1, tzinfo=UTC), "ünïcødé.example", "/päth/😀",
           "https://ref.example/\\x", b"\\\t\n\x00" * 4, "UA \\N", "Chrome", "Linux",
           "desktop", False),
    NewHit(datetime(1999, 12, 31, 12, 0, 0, 5, tzinfo=UTC), "s", "\\N", "", b"\xff" * 16,
           "", "", "", "other", False),
]  # fmt: skip


def read_back(url: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            hits = session.scalars(sa.select(Hit).order_by(Hit.id))
            return [tuple(getattr(h, c) for c in HIT_COLUMNS) for h in hits]
    finally:
        engine.dispose()


def empty(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.delete(Hit))
    engine.dispose()


@pytest.fixture
def generated() -> list[HitChunk]:
    return list(islice(Traffic(SMALL).chunks(), 2))


def test_bulk_rows_equal_hitstore_rows(database_url: str, generated: list[HitChunk]) -> None:
    hits = AWKWARD + generated[0].to_hits()[:500]
    engine = make_engine(database_url)
    store = HitStore(engine)
    try:
        assert store.write(hits) == len(hits)
        written = read_back(database_url)
        empty(database_url)
        assert load_hits(engine, [HitChunk.from_hits(hits)]) == len(hits)
        loaded = read_back(database_url)
    finally:
        store.close()
        engine.dispose()
    assert loaded == written
    assert loaded == [tuple(h[:10]) for h in hits]
    assert all(row[0].tzinfo is UTC for row in loaded)


def test_generated_chunks_read_back_identical(database_url: str, generated: list[HitChunk]) -> None:
    engine = make_engine(database_url)
    try:
        assert load_hits(engine, iter(generated)) == 10_000
    finally:
        engine.dispose()
    expected = [tuple(h[:10]) for chunk in generated for h in chunk.to_hits()]
    assert read_back(database_url) == expected


def test_empty_input_stores_nothing(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert load_hits(engine, []) == 0
        assert load_hits(engine, [HitChunk.from_hits([])]) == 0
    finally:
        engine.dispose()
    assert read_back(database_url) == []


def test_chunk_round_trips_through_hits() -> None:
    chunk = HitChunk.from_hits(AWKWARD)
    assert len(chunk) == 3
    assert chunk.to_hits() == [h._replace(event_id=None) for h in AWKWARD]
    assert len(chunk.take(np.array([0, 2]))) == 2


def test_copy_text_escapes_and_formats() -> None:
    lines = copy_text(HitChunk.from_hits(AWKWARD)).split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    first = lines[0].split(b"\t")
    assert first[0] == b"2026-01-31 23:59:59.999999+00"
    assert first[2] == b"/a\\tb\\\\c\\nd\\re?utm_source=x"
    assert first[3] == b"\\N" and first[5:] == [b"\\N", b"\\N", b"\\N", b"bot", b"t"]
    assert first[4] == b"\\\\x" + b"00" * 16
    assert lines[2].split(b"\t")[2] == b"\\\\N"  # the text "\N", not NULL


def test_timestamps_match_the_sqlite_writer() -> None:
    from db.bulk import _iso_timestamps

    moments = [h.ts for h in AWKWARD] + [datetime(2024, 2, 29, 1, 2, 3, 40, tzinfo=UTC)]
    columns = HitChunk.from_hits([AWKWARD[0]._replace(ts=ts) for ts in moments]).ts
    texts = _iso_timestamps(columns, suffix=b"").astype("U26").tolist()
    assert texts == [_sqlite_ts(ts) for ts in moments]


def as_arrow(chunk: HitChunk, *, dictionary: bool) -> pa.Table:
    """The chunk as an Arrow table of hits, text columns plain or dictionary-encoded."""
    columns = {"ts": pa.array(chunk.ts.astype(np.int64), pa.timestamp("us", tz="UTC"))}
    for name in HIT_COLUMNS[1:9]:
        kind = pa.binary() if name == "ip_hash" else pa.string()
        values = pa.array(getattr(chunk, name).tolist(), kind)
        columns[name] = values.dictionary_encode() if dictionary else values
    columns["is_bot"] = pa.array(chunk.is_bot)
    return pa.table(columns)


@pytest.mark.parametrize("dictionary", [False, True])
def test_arrow_tables_give_the_same_copy_text(generated: list[HitChunk], dictionary: bool) -> None:
    for chunk in [HitChunk.from_hits(AWKWARD), generated[0].take(slice(0, 2000))]:
        table = as_arrow(chunk, dictionary=dictionary)
        assert bytes(arrow_copy_text(table)) == copy_text(chunk)
        assert HitChunk.from_arrow(table).to_hits() == chunk.to_hits()


def test_arrow_dictionaries_may_hold_nulls_and_unused_values() -> None:
    # As the import makes them: null codes, a null among the values, values no row uses.
    chunk = HitChunk.from_hits(AWKWARD)
    table = as_arrow(chunk, dictionary=True)
    referrers = pa.DictionaryArray.from_arrays(
        pa.array([2, None, 0], pa.int32()), pa.array(["x\ty", "unused", None])
    )
    table = table.set_column(HIT_COLUMNS.index("referrer"), "referrer", referrers)
    expected = HitChunk(**{**vars(chunk), "referrer": np.array([None, None, "x\ty"], dtype=object)})
    assert bytes(arrow_copy_text(table)) == copy_text(expected)
    assert HitChunk.from_arrow(table).to_hits() == expected.to_hits()
