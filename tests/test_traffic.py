"""The seeded traffic generator (bench/traffic.py): deterministic, shaped like
real traffic, and in the shape the bulk loader takes."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest

from api.useragent import classify
from bench.traffic import SMALL, Traffic, TrafficConfig, generate
from db.bulk import HitChunk
from db.hits import HIT_COLUMNS


def frame(config: TrafficConfig) -> pd.DataFrame:
    chunks = list(Traffic(config).chunks())
    return pd.DataFrame({name: np.concatenate([getattr(c, name) for c in chunks])
                         for name in HIT_COLUMNS})  # fmt: skip


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return frame(SMALL)


def test_same_seed_same_rows() -> None:
    first, second = Traffic(SMALL).chunks(), Traffic(SMALL).chunks()
    for a, b in zip(first, second, strict=True):
        for name in HIT_COLUMNS:
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_another_seed_other_rows() -> None:
    a = next(Traffic(SMALL).chunks())
    b = next(Traffic(replace(SMALL, seed=SMALL.seed + 1)).chunks())
    assert not np.array_equal(a.ts, b.ts)
    assert set(a.ip_hash.tolist()).isdisjoint(b.ip_hash.tolist())


def test_chunks_have_the_columns_of_hits() -> None:
    chunks = list(Traffic(SMALL).chunks())
    assert [len(c) for c in chunks] == [5_000] * 4
    assert tuple(f.name for f in fields(HitChunk)) == HIT_COLUMNS
    chunk = chunks[0]
    assert chunk.ts.dtype == np.dtype("datetime64[us]")
    assert chunk.is_bot.dtype == np.dtype(bool)
    for name in HIT_COLUMNS[1:9]:
        column = getattr(chunk, name)
        assert column.dtype == object and len(column) == len(chunk), name
    assert {len(h) for h in chunk.ip_hash} == {16}
    assert all(isinstance(s, str) for s in chunk.site)
    assert all(r is None or isinstance(r, str) for r in chunk.referrer)


def test_events_fall_in_the_days_before_end(small: pd.DataFrame) -> None:
    assert len(small) == SMALL.events
    assert small.ts.min() >= pd.Timestamp("2026-02-02")
    assert small.ts.max() < pd.Timestamp("2026-03-02")
    # Every day has traffic.
    assert small.ts.dt.normalize().nunique() == SMALL.days


def test_daily_and_weekly_seasonality(small: pd.DataFrame) -> None:
    people = small[~small.is_bot]
    by_hour = people.ts.dt.hour.value_counts().sort_index()
    assert by_hour.loc[14:16].mean() > 3 * by_hour.loc[2:4].mean()  # afternoon vs night (UTC)
    by_weekday = people.ts.dt.day_of_week.value_counts().sort_index()
    assert by_weekday[[1, 2]].mean() > 1.4 * by_weekday[[5, 6]].mean()  # Tue/Wed vs weekend


def test_bots_share_and_classification(small: pd.DataFrame) -> None:
    assert 0.05 <= small.is_bot.mean() <= 0.10
    # Browser, OS, device and bot flag are what ingestion would have parsed.
    for chunk in Traffic(SMALL).chunks():
        for row in set(zip(*(chunk.columns()[5:]), strict=True)):
            assert row[1:] == tuple(classify(row[0]))
    devices = small[~small.is_bot].device.value_counts(normalize=True)
    assert 0.3 < devices["desktop"] < 0.65 and 0.25 < devices["mobile"] < 0.6
    assert "tablet" in devices


def test_paths_are_zipf_and_visitors_heavy_tailed(small: pd.DataFrame) -> None:
    people = small[~small.is_bot]
    paths = people.path.value_counts()
    assert paths.index[0] == "/"
    assert paths.iloc[0] > 5 * paths.iloc[20]
    assert paths.size > 200  # a long tail
    visits = people.ip_hash.value_counts()
    assert visits.iloc[0] > 10 * visits.median()  # a top 15 is meaningful
    assert visits.iloc[:15].is_monotonic_decreasing


def test_visitor_hashes_change_with_the_month() -> None:
    config = replace(SMALL, days=10, end=date(2026, 3, 6), visitors=20, bot_share=0.0)
    hits = frame(config)
    hashes = hits.groupby(hits.ts.dt.month).ip_hash.agg(set)
    assert len(hashes) == 2 and hashes.iloc[0].isdisjoint(hashes.iloc[1])


def test_generate_takes_knobs() -> None:
    chunks = list(generate(days=2, events=1_000, seed=3, end=date(2026, 1, 1), chunk_rows=400))
    assert [len(c) for c in chunks] == [400, 400, 200]
    first = chunks[0].ts[0].astype("datetime64[us]").item().replace(tzinfo=UTC)
    assert datetime(2025, 12, 30, tzinfo=UTC) <= first
