"""A seeded generator of realistic traffic, for benchmarks, parity tests,
reports and dashboards.

    from bench.traffic import generate
    for chunk in generate(days=90, events=10_000_000, seed=1):   # db.bulk.HitChunk
        ...

What makes it realistic enough for dashboards to look like dashboards:

- Time: hits follow a daily curve (quiet at night, peak in the afternoon UTC),
  a weekly one (weekends quieter), a slow growth trend and day-to-day noise.
  Bots ignore all of that and crawl around the clock.
- Visits: a visitor arrives, views a geometric number of pages a minute or so
  apart, the first with an outside referrer (search, social, other sites or
  none), the next ones with the previous page of the same site as referrer.
- Visitors: a pool whose activity is heavy-tailed (lognormal), so a few
  visitors come back very often (a top 15 means something) and most come
  once or twice. Each visitor keeps one site and one user agent. Their
  `ip_hash` changes every calendar month, as with the service's default
  monthly hashing key.
- Paths: a few thousand per site, Zipf-distributed (the home page and a few
  articles take most hits), some with allowlisted utm parameters.
- User agents: a realistic browser/OS/device mix; bots (search engines, SEO
  crawlers, scripts) make `bot_share` of the hits. Browser, OS, device and
  bot flag come from the service's own classifier (`api.useragent`), so they
  are what ingestion would have stored.

Memory is constant (one chunk at a time plus per-visitor arrays), everything
is vectorised with numpy (10 million hits in a few tens of seconds), and the
output is a pure function of the `TrafficConfig`: the same seed gives the same
rows. Chunks are ordered by time; visits spanning a chunk boundary make
neighbouring chunks overlap by a few minutes, as late hits do in real life.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from api.useragent import classify
from db.bulk import HitChunk

# (user agent, share of human visitors). Classified by api.useragent at first use.
HUMAN_AGENTS: tuple[tuple[str, float], ...] = (
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 0.22),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0", 0.06),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0", 0.04),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 0.07),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Safari/605.1.15", 0.05),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
     0.015),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 0.02),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", 0.015),
    ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 0.01),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", 0.17),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1", 0.05),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1", 0.02),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Mobile Safari/537.36", 0.15),
    ("Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36", 0.03),
    ("Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0", 0.01),
    ("Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Mobile/15E148 Safari/604.1", 0.025),
    ("Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 0.01),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36 OPR/115.0.0.0", 0.01),
)  # fmt: skip

# (user agent, share of bot hits).
BOT_AGENTS: tuple[tuple[str, float], ...] = (
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", 0.30),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", 0.15),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", 0.15),
    ("Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)", 0.10),
    ("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)", 0.05),
    ("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
     "+https://openai.com/gptbot)", 0.10),
    ("curl/8.5.0", 0.05),
    ("python-requests/2.32.3", 0.10),
)  # fmt: skip

# (referrer of a visit's first page, share). None is direct traffic.
REFERRERS: tuple[tuple[str | None, float], ...] = (
    (None, 0.42),
    ("https://www.google.com/", 0.26),
    ("https://www.bing.com/", 0.03),
    ("https://duckduckgo.com/", 0.03),
    ("https://news.ycombinator.com/", 0.03),
    ("https://www.reddit.com/", 0.03),
    ("https://t.co/", 0.02),
    ("https://www.linkedin.com/", 0.015),
    ("https://www.facebook.com/", 0.015),
    ("https://github.com/", 0.02),
)
# The rest of first pages come from a long tail of other sites.
OTHER_REFERRERS = 400

# Relative traffic per hour of day (UTC), midnight first: a European-American audience.
HOURLY_PROFILE = (0.35, 0.28, 0.22, 0.2, 0.2, 0.25, 0.38, 0.55, 0.75, 0.9, 1.0, 1.05,
                  1.1, 1.15, 1.2, 1.25, 1.25, 1.2, 1.1, 1.0, 0.9, 0.75, 0.6, 0.45)  # fmt: skip
# Relative traffic per weekday, Monday first.
WEEKLY_PROFILE = (1.0, 1.05, 1.05, 1.0, 0.9, 0.55, 0.6)

SECTIONS = ("blog", "docs", "products", "guides", "changelog", "tags", "careers", "help")
WORDS = ("postgres", "sqlite", "privacy", "analytics", "dashboard", "pricing", "setup", "api",
         "python", "release", "hosting", "metrics", "faster", "cookies", "gdpr", "grafana",
         "migrate", "backup", "scaling", "team", "guide", "why", "how", "new", "open", "source",
         "self", "hosted", "report", "alerts", "timeseries", "rollup", "index")  # fmt: skip


@dataclass(frozen=True)
class TrafficConfig:
    """Everything the generated traffic depends on: the same config, the same rows."""

    events: int = 10_000_000
    days: int = 90
    # Hits fall in the `days` days before this midnight (UTC); default: today's.
    end: date | None = None
    seed: int = 1
    # Sites and their share of visitors.
    sites: tuple[str, ...] = ("example.com", "shop.example.com", "docs.example.org")
    site_weights: tuple[float, ...] = (0.6, 0.25, 0.15)
    paths_per_site: int = 1500
    # Zipf exponent of path popularity (1.0: the classic web; higher: more concentrated).
    path_zipf: float = 1.05
    # Size of the visitor pool; None: one visitor per 6 hits.
    visitors: int | None = None
    # Lognormal sigma of visitor activity: the higher, the more a few visitors dominate.
    visitor_activity_sigma: float = 1.8
    mean_pages_per_visit: float = 2.6
    mean_seconds_between_pages: float = 50.0
    bot_share: float = 0.07
    bot_addresses: int = 300
    # Traffic at the end of the period relative to its start.
    growth: float = 1.3
    # Lognormal sigma of day-to-day noise.
    daily_noise: float = 0.12
    chunk_rows: int = 100_000

    @property
    def end_time(self) -> datetime:
        end = self.end or datetime.now(UTC).date()
        return datetime(end.year, end.month, end.day, tzinfo=UTC)

    @property
    def start_time(self) -> datetime:
        return self.end_time - timedelta(days=self.days)

    @property
    def visitor_pool(self) -> int:
        return self.visitors or max(100, self.events // 6)


# A small config for tests: a few weeks, a few thousand hits, fixed dates.
SMALL = TrafficConfig(events=20_000, days=28, end=date(2026, 3, 2), chunk_rows=5_000,
                      paths_per_site=200, visitors=2_000)  # fmt: skip


def generate(
    days: int = 90,
    events: int = 10_000_000,
    seed: int = 1,
    *,
    end: date | None = None,
    **knobs: Any,
) -> Iterator[HitChunk]:
    """Chunks of generated hits (`db.bulk.HitChunk`) in time order.

    `knobs` are any other `TrafficConfig` fields; `Traffic(config).chunks()`
    does the same for a whole config (e.g. `SMALL`).
    """
    config = TrafficConfig(events=events, days=days, end=end, seed=seed, **knobs)
    return Traffic(config).chunks()


class Traffic:
    """The generator behind `generate`: per-visitor and per-hour tables, then chunks."""

    def __init__(self, config: TrafficConfig) -> None:
        if config.events < 0 or config.days < 1 or config.chunk_rows < 1:
            raise ValueError("events >= 0, days >= 1 and chunk_rows >= 1 are required")
        self.config = c = config
        self.start = np.datetime64(c.start_time.replace(tzinfo=None), "us")
        rng = np.random.default_rng([c.seed, 0])

        # Hits per hour: daily and weekly curves, growth, day-to-day noise.
        hours = c.days * 24
        hour_of_day = np.arange(hours) % 24
        day = np.arange(hours) // 24
        first_weekday = c.start_time.weekday()
        weekday = (first_weekday + day) % 7
        human = (
            np.asarray(HOURLY_PROFILE)[hour_of_day]
            * np.asarray(WEEKLY_PROFILE)[weekday]
            * c.growth ** (np.arange(hours) / hours)
            * rng.lognormal(0.0, c.daily_noise, c.days)[day]
        )
        human *= (1 - c.bot_share) / human.sum()
        bots = np.full(hours, c.bot_share / hours)
        self.bot_probability = bots / (human + bots)
        self.hour_end = np.cumsum(rng.multinomial(c.events, (human + bots) / (human + bots).sum()))

        # Visitors: activity, site and user agent each.
        pool = c.visitor_pool
        activity = rng.lognormal(0.0, c.visitor_activity_sigma, pool)
        self.visitor_cdf = _cdf(activity)
        self.visitor_site = rng.choice(len(c.sites), pool, p=_normalised(c.site_weights))
        self.visitor_agent = rng.choice(
            len(HUMAN_AGENTS), pool, p=_normalised([w for _, w in HUMAN_AGENTS])
        )
        self.bot_agent = rng.choice(
            len(BOT_AGENTS), c.bot_addresses, p=_normalised([w for _, w in BOT_AGENTS])
        )
        self.bot_site = rng.choice(len(c.sites), c.bot_addresses, p=_normalised(c.site_weights))
        self.hash_key = np.uint64(rng.integers(0, 2**63))

        # Paths: per site, ranked by popularity.
        self.paths = np.array(
            [p for i in range(len(c.sites)) for p in _paths(c.paths_per_site, c.seed, i)],
            dtype=object,
        )
        self.path_cdf = _cdf(1.0 / np.arange(1, c.paths_per_site + 1) ** c.path_zipf)
        self.sites = np.array(c.sites, dtype=object)
        self.internal_referrers = np.array(
            [f"https://{site}{path.split('?')[0]}" for i, site in enumerate(c.sites)
             for path in _paths(c.paths_per_site, c.seed, i)],
            dtype=object,
        )  # fmt: skip
        others = [f"https://{w1}-{w2}.example.net/" for w1 in WORDS for w2 in WORDS]
        others = [others[i] for i in rng.permutation(len(others))[:OTHER_REFERRERS]]
        self.outside_referrers = np.array([r for r, _ in REFERRERS] + others, dtype=object)
        named = np.array([w for _, w in REFERRERS])
        tail = (1 - named.sum()) * _normalised(1.0 / np.arange(1, len(others) + 1))
        self.referrer_cdf = _cdf(np.concatenate([named, tail]))

        agents = [ua for ua, _ in HUMAN_AGENTS] + [ua for ua, _ in BOT_AGENTS]
        parsed = [classify(ua) for ua in agents]
        self.agent_columns = {
            "user_agent": np.array(agents, dtype=object),
            "browser": np.array([a.browser for a in parsed], dtype=object),
            "os": np.array([a.os for a in parsed], dtype=object),
            "device": np.array([a.device for a in parsed], dtype=object),
            "is_bot": np.array([a.is_bot for a in parsed], dtype=bool),
        }

    def chunks(self) -> Iterator[HitChunk]:
        c = self.config
        for index, start in enumerate(range(0, c.events, c.chunk_rows)):
            yield self.chunk(index, start, min(start + c.chunk_rows, c.events))

    def chunk(self, index: int, start: int, stop: int) -> HitChunk:
        """Hits `start` to `stop` of the whole sequence, from their own random stream."""
        c = self.config
        rng = np.random.default_rng([c.seed, 1, index])
        n = stop - start
        hour = np.searchsorted(self.hour_end, np.arange(start, stop), side="right")
        base_us = hour * 3_600_000_000 + rng.integers(0, 3_600_000_000, n)
        base_us.sort()

        # Group consecutive hits into visits of geometric length.
        lengths = rng.geometric(1 / c.mean_pages_per_visit, n)
        visit_start = np.concatenate([[0], np.cumsum(lengths)])
        visit_start = visit_start[visit_start < n]
        visits = len(visit_start)
        visit = np.repeat(np.arange(visits), np.diff(np.append(visit_start, n)))
        first = np.zeros(n, dtype=bool)
        first[visit_start] = True
        gaps = rng.exponential(c.mean_seconds_between_pages * 1e6, n).astype(np.int64)
        gaps[first] = 0
        elapsed = np.cumsum(gaps)
        ts_us = base_us[visit_start][visit] + elapsed - elapsed[visit_start][visit]
        last_us = c.days * 86_400_000_000 - 1
        np.minimum(ts_us, last_us, out=ts_us)

        # Who: a human from the pool or a bot, per visit.
        is_bot_visit = rng.random(visits) < self.bot_probability[hour[visit_start]]
        human = np.searchsorted(self.visitor_cdf, rng.random(visits), side="right")
        bot = rng.integers(0, c.bot_addresses, visits)
        who = np.where(is_bot_visit, c.visitor_pool + bot, human)[visit]
        site = np.where(is_bot_visit, self.bot_site[bot], self.visitor_site[human])[visit]
        agent = np.where(
            is_bot_visit, len(HUMAN_AGENTS) + self.bot_agent[bot], self.visitor_agent[human]
        )[visit]
        bot_hit = is_bot_visit[visit]

        # Where: Zipf for people, uniform for crawlers.
        rank = np.where(
            bot_hit,
            rng.integers(0, c.paths_per_site, n),
            np.searchsorted(self.path_cdf, rng.random(n), side="right"),
        )
        path_index = site * c.paths_per_site + rank
        outside = np.searchsorted(self.referrer_cdf, rng.random(n), side="right")
        referrer = np.full(n, None, dtype=object)
        referrer[first] = self.outside_referrers[outside[first]]
        previous = np.roll(path_index, 1)
        referrer[~first] = self.internal_referrers[previous[~first]]
        referrer[bot_hit] = None

        ts = self.start + ts_us.astype("timedelta64[us]")
        month = ts.astype("datetime64[M]").astype(np.int64)
        order = np.argsort(ts_us, kind="stable")
        return HitChunk(
            ts=ts[order],
            site=self.sites[site][order],
            path=self.paths[path_index][order],
            referrer=referrer[order],
            ip_hash=_ip_hashes(self.hash_key, who[order], month[order]),
            **{name: column[agent][order] for name, column in self.agent_columns.items()},
        )


def _ip_hashes(
    key: np.uint64, visitor: npt.NDArray[np.int64], month: npt.NDArray[np.int64]
) -> npt.NDArray[np.object_]:
    # 16 pseudo-random bytes per (visitor, month), like HMAC under a monthly key.
    words = np.empty((len(visitor), 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        seed = key ^ (visitor.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        seed = seed + month.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
        words[:, 0] = _splitmix64(seed)
        words[:, 1] = _splitmix64(words[:, 0] ^ key)
    return np.array(words.view("V16").ravel().tolist(), dtype=object)


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _normalised(weights: object) -> npt.NDArray[np.float64]:
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()


def _cdf(weights: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0 + 1e-12  # a draw of 1.0 - eps never lands past the end
    return cdf


@functools.cache
def _paths(count: int, seed: int, site: int) -> tuple[str, ...]:
    """`count` plausible paths of one site, most popular first: the home page,
    landing pages, then a long tail of articles."""
    rng = np.random.default_rng([seed, 2, site])
    head = ["/", "/pricing", "/blog", "/docs", "/about", "/features", "/contact", "/signup",
            "/login", "/docs/getting-started", "/pricing?utm_source=newsletter&utm_medium=email",
            "/?ref=producthunt", "/blog?utm_source=twitter&utm_campaign=launch"]  # fmt: skip
    paths = head[:count]
    seen = set(paths)
    while len(paths) < count:
        section = SECTIONS[rng.integers(len(SECTIONS))]
        words = rng.choice(WORDS, rng.integers(2, 5))
        path = f"/{section}/{'-'.join(words)}"
        if rng.random() < 0.3:
            path += f"-{rng.integers(2, 999)}"
        if path not in seen:
            seen.add(path)
            paths.append(path)
    return tuple(paths)
