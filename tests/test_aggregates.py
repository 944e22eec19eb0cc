"""The aggregates give exact figures, by the same names and queries on every
backend: live before a refresh, materialised after it, late events after the
next one, and one seeded synthetic dataset gives identical figures everywhere."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conftest import write_hits

from db import NewHit
from db.aggregates import (
    AGGREGATES,
    Bucket,
    Mechanism,
    mechanism_of,
    refresh,
    relation,
    watermarks,
)

HOURLY = relation("hits_hourly")
DAILY = relation("visitors_daily")


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def visitor(name: str) -> bytes:
    return name.encode().ljust(16, b".")


def hit(ts: str | datetime, who: str, path: str = "/", site: str = "a.example", bot=False):
    when = t(ts) if isinstance(ts, str) else ts
    agent = "Googlebot/2.1" if bot else "Mozilla/5.0"
    device = "bot" if bot else "desktop"
    return NewHit(when, site, path, None, visitor(who), agent, None, None, device, bot)


def store(engine: sa.Engine, hits: list[NewHit]) -> None:
    # In groups, as concurrent requests would arrive.
    for start in range(0, len(hits), 500):
        write_hits(engine, hits[start : start + 500])


# -- the dashboard queries, written once for every backend ---------------------------------


def hourly(engine: sa.Engine) -> dict[tuple[datetime, str, str], tuple[int, int, int]]:
    query = sa.select(
        HOURLY.c.bucket, HOURLY.c.site, HOURLY.c.path, HOURLY.c.hits, HOURLY.c.visitors,
        HOURLY.c.bot_hits,
    )  # fmt: skip
    with engine.connect() as connection:
        return {(b, s, p): (h, v, bh) for b, s, p, h, v, bh in connection.execute(query)}


def daily_rows(engine: sa.Engine) -> dict[tuple[datetime, str, bytes], tuple[int, int]]:
    query = sa.select(DAILY.c.bucket, DAILY.c.site, DAILY.c.ip_hash, DAILY.c.hits, DAILY.c.bot_hits)
    with engine.connect() as connection:
        return {(b, s, bytes(ip)): (h, bh) for b, s, ip, h, bh in connection.execute(query)}


def unique_visitors(engine: sa.Engine, site: str, start: datetime, end: datetime) -> int:
    query = sa.select(sa.func.count(sa.distinct(DAILY.c.ip_hash))).where(
        DAILY.c.site == site, DAILY.c.bucket >= start, DAILY.c.bucket < end, DAILY.c.hits > 0
    )
    with engine.connect() as connection:
        return connection.execute(query).scalar_one()


def daily_visitors(engine: sa.Engine, site: str) -> dict[datetime, int]:
    query = (
        sa.select(DAILY.c.bucket, sa.func.count())
        .where(DAILY.c.site == site, DAILY.c.hits > 0)
        .group_by(DAILY.c.bucket)
    )
    with engine.connect() as connection:
        return {day: count for day, count in connection.execute(query)}


def top_visitors(engine: sa.Engine, site: str, start: datetime, end: datetime, n: int = 15):
    total = sa.func.sum(DAILY.c.hits)
    query = (
        sa.select(DAILY.c.ip_hash, total)
        .where(DAILY.c.site == site, DAILY.c.bucket >= start, DAILY.c.bucket < end)
        .group_by(DAILY.c.ip_hash)
        .having(total > 0)
        .order_by(total.desc(), DAILY.c.ip_hash)
        .limit(n)
    )
    with engine.connect() as connection:
        return [(bytes(ip), int(count)) for ip, count in connection.execute(query)]


def top_paths(engine: sa.Engine, site: str, n: int = 10) -> list[tuple[str, int]]:
    total = sa.func.sum(HOURLY.c.hits)
    query = (
        sa.select(HOURLY.c.path, total)
        .where(HOURLY.c.site == site)
        .group_by(HOURLY.c.path)
        .order_by(total.desc(), HOURLY.c.path)
        .limit(n)
    )
    with engine.connect() as connection:
        return [(path, int(count)) for path, count in connection.execute(query)]


def rollup_rows(engine: sa.Engine) -> dict[str, int]:
    if mechanism_of(engine) is not Mechanism.ROLLUP_TABLES:
        return {}
    with engine.connect() as connection:
        return {
            a.name: connection.execute(
                sa.text(f"SELECT count(*) FROM {a.rollup_table}")
            ).scalar_one()
            for a in AGGREGATES
        }


# -- a small hand-built dataset ------------------------------------------------------------

HAND_BUILT = [
    hit("2026-05-30 10:05", "v1"),
    hit("2026-05-30 10:20", "v1", "/pricing"),
    hit("2026-05-30 10:40", "v2"),
    hit("2026-05-30 10:50", "b1", bot=True),
    hit("2026-05-30 11:10", "v1"),
    hit("2026-05-31 09:00", "v3"),
    hit("2026-05-31 09:30", "v1"),
    hit("2026-06-01 00:30", "v2", "/pricing"),
    hit("2026-05-30 10:15", "v1", site="b.example"),
]
HOURLY_FIGURES = {
    (t("2026-05-30 10:00"), "a.example", "/"): (2, 2, 1),
    (t("2026-05-30 10:00"), "a.example", "/pricing"): (1, 1, 0),
    (t("2026-05-30 11:00"), "a.example", "/"): (1, 1, 0),
    (t("2026-05-31 09:00"), "a.example", "/"): (2, 2, 0),
    (t("2026-06-01 00:00"), "a.example", "/pricing"): (1, 1, 0),
    (t("2026-05-30 10:00"), "b.example", "/"): (1, 1, 0),
}
DAILY_FIGURES = {
    (t("2026-05-30 00:00"), "a.example", visitor("v1")): (3, 0),
    (t("2026-05-30 00:00"), "a.example", visitor("v2")): (1, 0),
    (t("2026-05-30 00:00"), "a.example", visitor("b1")): (0, 1),
    (t("2026-05-31 00:00"), "a.example", visitor("v3")): (1, 0),
    (t("2026-05-31 00:00"), "a.example", visitor("v1")): (1, 0),
    (t("2026-06-01 00:00"), "a.example", visitor("v2")): (1, 0),
    (t("2026-05-30 00:00"), "b.example", visitor("v1")): (1, 0),
}
MAY, JUNE, JULY = t("2026-05-01 00:00"), t("2026-06-01 00:00"), t("2026-07-01 00:00")


def assert_hand_built_figures(engine: sa.Engine) -> None:
    assert hourly(engine) == HOURLY_FIGURES
    assert daily_rows(engine) == DAILY_FIGURES
    assert unique_visitors(engine, "a.example", MAY, JUNE) == 3  # the bot is no visitor
    assert unique_visitors(engine, "a.example", JUNE, JULY) == 1
    assert daily_visitors(engine, "a.example") == {
        t("2026-05-30 00:00"): 2, t("2026-05-31 00:00"): 2, t("2026-06-01 00:00"): 1,
    }  # fmt: skip
    assert top_visitors(engine, "a.example", MAY, JUNE) == [
        (visitor("v1"), 4), (visitor("v2"), 1), (visitor("v3"), 1),
    ]  # fmt: skip
    assert top_paths(engine, "a.example") == [("/", 5), ("/pricing", 2)]


def test_figures_before_any_refresh_come_from_live_aggregation(engine):
    store(engine, HAND_BUILT)

    assert_hand_built_figures(engine)


def test_figures_after_a_refresh_come_from_the_materialised_rows(engine):
    store(engine, HAND_BUILT)

    refresh(engine, now=t("2026-06-01 12:00"))

    assert_hand_built_figures(engine)
    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        # All hours are materialised; the day and the month of 1 June are still live.
        assert rollup_rows(engine) == {
            "hits_hourly": 6, "visitors_daily": 6, "site_hourly": 5, "site_daily": 3,
            "site_monthly": 2, "paths_daily": 4, "referrers_daily": 3, "agents_daily": 4,
            "visitors_monthly": 5,
        }  # fmt: skip
        expected = {Bucket.HOUR: t("2026-06-01 12:00"), Bucket.DAY: JUNE, Bucket.MONTH: JUNE}
        assert watermarks(engine) == {a.name: expected[a.bucket] for a in AGGREGATES}


def test_a_late_event_shows_after_the_next_refresh(engine):
    store(engine, HAND_BUILT)
    refresh(engine, now=t("2026-06-01 12:00"))

    # Arrives at 12:30 on 1 June, for a bucket materialised already.
    store(engine, [hit("2026-05-31 09:45", "v2")])
    refresh(engine, now=t("2026-06-01 13:00"))

    figures = hourly(engine)
    assert figures[(t("2026-05-31 09:00"), "a.example", "/")] == (3, 3, 0)
    assert daily_rows(engine)[(t("2026-05-31 00:00"), "a.example", visitor("v2"))] == (1, 0)
    assert unique_visitors(engine, "a.example", MAY, JUNE) == 3
    assert top_visitors(engine, "a.example", MAY, JUNE)[:2] == [
        (visitor("v1"), 4), (visitor("v2"), 2),
    ]  # fmt: skip


def test_the_current_bucket_shows_before_it_is_complete(engine):
    store(engine, HAND_BUILT)
    refresh(engine, now=t("2026-06-01 12:00"))

    store(engine, [hit("2026-06-01 12:10", "v4"), hit("2026-06-01 12:20", "v4")])

    figures = hourly(engine)
    assert figures[(t("2026-06-01 12:00"), "a.example", "/")] == (2, 1, 0)
    assert daily_rows(engine)[(t("2026-06-01 00:00"), "a.example", visitor("v4"))] == (2, 0)


def test_a_range_refresh_takes_erased_hits_out(engine):
    store(engine, HAND_BUILT)
    refresh(engine, now=t("2026-06-01 12:00"))

    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM hits WHERE site = 'b.example'"))
    refresh(engine, t("2026-05-30 10:00"), t("2026-05-30 11:00"))

    assert not any(site == "b.example" for _b, site, _p in hourly(engine))
    assert not any(site == "b.example" for _b, site, _ip in daily_rows(engine))


# -- parity: one seeded synthetic dataset, the same figures on every backend ----------------

SEED = 20261203
START = t("2026-05-26 00:00")
DAYS = 10


def synthetic_hits(seed: int = SEED, count: int = 3000) -> list[NewHit]:
    """Two sites, Zipf-like paths, returning visitors, some bots, over 10 days."""
    rng = random.Random(seed)
    paths = [f"/page/{n}" for n in range(40)]
    weights = [1 / (rank + 1) for rank in range(len(paths))]
    visitors = [f"visitor{n}" for n in range(300)]
    hits = []
    for _ in range(count):
        ts = START + timedelta(
            seconds=rng.randrange(DAYS * 86400), microseconds=rng.randrange(10**6)
        )
        site = rng.choice(("a.example", "a.example", "b.example"))
        bot = rng.random() < 0.08
        who = f"bot{rng.randrange(5)}" if bot else visitors[int(rng.paretovariate(1.2)) % 300]
        hits.append(hit(ts, who, rng.choices(paths, weights)[0], site, bot))
    return hits


def reference_figures(hits: list[NewHit]) -> dict[str, object]:
    """The same figures, computed in Python from the generated hits."""
    humans = [h for h in hits if not h.is_bot]
    per_day: Counter[tuple[str, datetime]] = Counter()
    day_visitors: defaultdict[tuple[str, datetime], set[bytes]] = defaultdict(set)
    hour_visitors: defaultdict[tuple[str, str, datetime], set[bytes]] = defaultdict(set)
    for h in humans:
        day = h.ts.replace(hour=0, minute=0, second=0, microsecond=0)
        per_day[h.site, day] += 1
        day_visitors[h.site, day].add(h.ip_hash)
        hour_visitors[h.site, h.path, h.ts.replace(minute=0, second=0, microsecond=0)].add(
            h.ip_hash
        )
    figures: dict[str, object] = {
        "bot_hits": sum(h.is_bot for h in hits),
        "hourly_visitor_sum": sum(len(v) for v in hour_visitors.values()),
    }
    for site in ("a.example", "b.example"):
        figures[f"{site} hits per day"] = {d: n for (s, d), n in per_day.items() if s == site}
        figures[f"{site} visitors per day"] = {
            d: len(v) for (s, d), v in day_visitors.items() if s == site
        }
        paths = Counter(h.path for h in humans if h.site == site)
        figures[f"{site} top paths"] = sorted(paths.items(), key=lambda pc: (-pc[1], pc[0]))[:10]
        for month, (start, end) in {"May": (MAY, JUNE), "June": (JUNE, JULY)}.items():
            mine = [h for h in humans if h.site == site and start <= h.ts < end]
            figures[f"{site} visitors in {month}"] = len({h.ip_hash for h in mine})
            top = Counter(h.ip_hash for h in mine)
            figures[f"{site} top visitors in {month}"] = sorted(
                top.items(), key=lambda vc: (-vc[1], vc[0])
            )[:15]
    return figures


def database_figures(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as connection:
        totals = connection.execute(
            sa.select(sa.func.sum(HOURLY.c.bot_hits), sa.func.sum(HOURLY.c.visitors))
        ).one()
        per_hour = connection.execute(
            sa.select(HOURLY.c.site, HOURLY.c.bucket, sa.func.sum(HOURLY.c.hits)).group_by(
                HOURLY.c.site, HOURLY.c.bucket
            )
        ).all()
    figures: dict[str, object] = {
        "bot_hits": int(totals[0]),
        "hourly_visitor_sum": int(totals[1]),
    }
    for site in ("a.example", "b.example"):
        per_day: Counter[datetime] = Counter()
        for s, bucket, n in per_hour:
            if s == site and n:
                per_day[bucket.replace(hour=0)] += int(n)
        figures[f"{site} hits per day"] = dict(per_day)
        figures[f"{site} visitors per day"] = daily_visitors(engine, site)
        # All paths, ranked here: tie order by text would follow the server's collation.
        ranked = sorted(top_paths(engine, site, n=1000), key=lambda pc: (-pc[1], pc[0]))
        figures[f"{site} top paths"] = ranked[:10]
        for month, (start, end) in {"May": (MAY, JUNE), "June": (JUNE, JULY)}.items():
            figures[f"{site} visitors in {month}"] = unique_visitors(engine, site, start, end)
            figures[f"{site} top visitors in {month}"] = top_visitors(engine, site, start, end)
    return figures


def test_parity_of_a_seeded_synthetic_dataset(engine):
    hits = synthetic_hits()
    expected = reference_figures(hits)
    store(engine, hits)

    assert database_figures(engine) == expected  # all live
    refresh(engine, now=t("2026-05-31 07:00"))
    assert database_figures(engine) == expected  # materialised before, live after
    store(engine, [])
    refresh(engine, now=START + timedelta(days=DAYS + 1))
    assert database_figures(engine) == expected  # all materialised


# -- the coarse aggregates (migration 0003): every row equals the raw hits' figures -----------

REFERRERS = (None, "https://search.example/", "https://news.example.org/item")
AGENTS = (
    ("Firefox", "Linux", "desktop"),
    ("Chrome Mobile", "Android", "mobile"),
    (None, None, "desktop"),
)


def varied_hits(seed: int = SEED) -> list[NewHit]:
    """The synthetic hits with referrers and parsed user agents, spanning May and June."""
    rng = random.Random(seed + 1)
    varied = []
    for h in synthetic_hits(seed):
        browser, os_name, device = ("Googlebot", None, "bot") if h.is_bot else rng.choice(AGENTS)
        varied.append(
            h._replace(referrer=rng.choice(REFERRERS), browser=browser, os=os_name, device=device)
        )
    return varied


def floor(ts: datetime, width: str) -> datetime:
    ts = ts.replace(minute=0, second=0, microsecond=0)
    if width == "hour":
        return ts
    ts = ts.replace(hour=0)
    return ts if width == "day" else ts.replace(day=1)


def reference_rows(hits: list[NewHit], name: str) -> dict[tuple[object, ...], tuple[int, ...]]:
    """An aggregate's rows computed in Python: group key -> measures."""
    aggregate = next(a for a in AGGREGATES if a.name == name)
    groups: defaultdict[tuple[object, ...], list[NewHit]] = defaultdict(list)
    for h in hits:
        groups[
            (floor(h.ts, aggregate.bucket.value), *(getattr(h, c) for c in aggregate.group_by))
        ].append(h)
    rows = {}
    for key, members in groups.items():
        humans = [h for h in members if not h.is_bot]
        measures = {
            "hits": len(humans),
            "visitors": len({h.ip_hash for h in humans}),
            "bot_hits": len(members) - len(humans),
        }
        rows[key] = tuple(measures[m.name] for m in aggregate.measures)
    return rows


def database_rows(engine: sa.Engine, name: str) -> dict[tuple[object, ...], tuple[int, ...]]:
    table = relation(name)
    aggregate = next(a for a in AGGREGATES if a.name == name)
    keys = 1 + len(aggregate.group_by)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(table)).all()
    as_python = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
    found = {row[:keys]: tuple(int(v) for v in row[keys:]) for row in as_python}
    assert len(found) == len(rows), f"{name}: a group has more than one row"
    return found


COARSE = ("site_hourly", "site_daily", "site_monthly", "paths_daily", "referrers_daily",
          "agents_daily", "visitors_monthly")  # fmt: skip


def top_visitors_of_month(engine: sa.Engine, site: str, month: datetime, n: int = 15):
    """The dashboard's query: one row per visitor and month, read in index order."""
    monthly = relation("visitors_monthly")
    query = (
        sa.select(monthly.c.ip_hash, monthly.c.hits)
        .where(monthly.c.site == site, monthly.c.bucket == month, monthly.c.hits > 0)
        .order_by(monthly.c.hits.desc(), monthly.c.ip_hash.desc())
        .limit(n)
    )
    with engine.connect() as connection:
        return [(bytes(ip), hits) for ip, hits in connection.execute(query)]


def reference_top_visitors(hits: list[NewHit], site: str, month: datetime, n: int = 15):
    counts = Counter(
        h.ip_hash for h in hits if h.site == site and not h.is_bot and floor(h.ts, "month") == month
    )
    return sorted(counts.items(), key=lambda vc: (vc[1], vc[0]), reverse=True)[:n]


@pytest.mark.parametrize(
    "refreshed_at",
    [None, "2026-05-31 07:00", "2026-06-02 10:00", "2026-06-08 00:00"],
    ids=["all live", "hours and days materialised", "May materialised", "all materialised"],
)
def test_coarse_aggregates_equal_the_raw_hits(engine, refreshed_at):
    hits = varied_hits()
    store(engine, hits)
    if refreshed_at:
        refresh(engine, now=t(refreshed_at))

    for name in COARSE:
        assert database_rows(engine, name) == reference_rows(hits, name), name
    for site in ("a.example", "b.example"):
        for month in (MAY, JUNE):
            expected = reference_top_visitors(hits, site, month)
            assert len(expected) == 15
            assert top_visitors_of_month(engine, site, month) == expected


def test_metrics_show_how_far_each_rollup_is_behind(database_url, make_app):
    app = make_app()
    engine = app.extensions["telemetry.engine"]
    client = app.test_client()
    assert client.post("/track", json={"url": "https://example.com/"}).status_code == 202
    refresh(engine)

    lines = client.get("/metrics").get_data(as_text=True).splitlines()

    lags = {
        line.split('rollup="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("telemetry_rollup_lag_seconds{")
    }
    assert set(lags) == {aggregate.name for aggregate in AGGREGATES}
    # Materialised up to the last complete bucket: at most one bucket behind, never ahead.
    longest = {Bucket.HOUR: 3600, Bucket.DAY: 86_400, Bucket.MONTH: 31 * 86_400}
    assert all(0 <= lags[a.name] <= longest[a.bucket] for a in AGGREGATES), lags
