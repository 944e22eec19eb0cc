"""Hand-written analytics data in the shape `analytics.figures.compute` returns
(notes/analytics-contract.md), for rendering tests that need no database."""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

HOSTILE = "<script>alert(1)</script>"
# What plotly.js itself would turn into markup in a label, were it not escaped.
MARKUP = '<b>bold</b><br><a href="https://evil.example/">link</a>'


def month_of_traffic(
    site: str | None = "shop.example",
    path: str = "/pricing",
    referrer_host: str = "news.example.org",
    browser: str = "Firefox",
) -> dict[str, Any]:
    """November 2026 of a site with a daily rhythm, one spike and one drop.

    `path`, `referrer_host` and `browser` name one entry of the top lists each,
    so a test can put visitor-controlled text there."""
    first = date(2026, 11, 1)
    days = [first + timedelta(days=n) for n in range(30)]
    hourly = []
    for day_index, day in enumerate(days):
        for hour in range(24):
            expected = 40 + 35 * math.sin((hour - 8) / 24 * 2 * math.pi)
            evaluated = day_index >= 7  # the site's first week has no 4-week history
            hits = round(expected + (day_index % 5))
            hourly.append(
                {
                    "hour": f"{day.isoformat()}T{hour:02d}:00:00+00:00",
                    "hits": hits,
                    "median": round(expected, 1) if evaluated else None,
                    "low": round(expected * 0.8, 1) if evaluated else None,
                    "high": round(expected * 1.2 + 4, 1) if evaluated else None,
                    "anomaly": None,
                    "score": None,
                }
            )
    spike, drop = hourly[10 * 24 + 15], hourly[20 * 24 + 14]
    spike.update(hits=400, anomaly="spike", score=round((400 - spike["high"]) / 12, 2))
    drop.update(hits=2, anomaly="drop", score=round((drop["low"] - 2) / 12, 2))
    anomalies = [
        {
            "hour": row["hour"],
            "hits": row["hits"],
            "median": row["median"],
            "low": row["low"],
            "high": row["high"],
            "direction": row["anomaly"],
            "score": row["score"],
        }
        for row in (spike, drop)
    ]
    daily = []
    for day_index, day in enumerate(days):
        hits = sum(row["hits"] for row in hourly[day_index * 24 : (day_index + 1) * 24])
        visitors = hits // 3
        daily.append(
            {
                "date": day.isoformat(),
                "hits": hits,
                "visitors": visitors,
                "hits_per_visitor": round(hits / visitors, 3),
            }
        )
    total = sum(row["hits"] for row in daily)
    visitors = 9_000
    top_visitors = [
        {"visitor": f"{0xA1B2C3D4 - n * 7919:08x}", "hits": 300 - n * 15, "share": 0.0}
        for n in range(15)
    ]
    for visitor in top_visitors:
        visitor["share"] = round(visitor["hits"] / total, 4)
    return {
        "site": site,
        "from": "2026-11-01",
        "to": "2026-11-30",
        "timezone": "UTC",
        "include_bots": False,
        "summary": {
            "hits": total,
            "visitors": visitors,
            "hits_per_visitor": round(total / visitors, 3),
            "bot_hits": 2_345,
            "bot_share": round(2_345 / (total + 2_345), 4),
            "peak_hour": 14,
            "anomalies": 2,
        },
        "daily": daily,
        "monthly": [
            {
                "month": "2026-09",
                "hits": 21_000,
                "visitors": 7_000,
                "hits_per_visitor": 3.0,
                "hits_growth": None,
                "visitors_growth": None,
            },
            {
                "month": "2026-10",
                "hits": 25_200,
                "visitors": 7_700,
                "hits_per_visitor": 3.273,
                "hits_growth": 0.2,
                "visitors_growth": 0.1,
            },
            {
                "month": "2026-11",
                "hits": total,
                "visitors": visitors,
                "hits_per_visitor": round(total / visitors, 3),
                "hits_growth": round(total / 25_200 - 1, 4),
                "visitors_growth": round(visitors / 7_700 - 1, 4),
            },
        ],
        "hourly": hourly,
        "anomalies": anomalies,
        "heatmap": {
            "weekdays": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
            "hours": list(range(24)),
            "hits": [
                [
                    round((60 if weekday < 5 else 30) * (1.2 + math.sin((hour - 8) / 3.82)))
                    for hour in range(24)
                ]
                for weekday in range(7)
            ],
        },
        "top_visitors": top_visitors,
        "top_paths": [
            {"path": "/", "hits": 9_000, "visitors": 4_000},
            {"path": path, "hits": 3_100, "visitors": 1_900},
            {"path": "/blog/first-post?utm_source=news", "hits": 1_200, "visitors": 900},
            {"path": "/about", "hits": 640, "visitors": 500},
        ],
        "referrers": [
            {"host": "(direct)", "hits": 12_000},
            {"host": referrer_host, "hits": 2_600},
            {"host": "www.google.com", "hits": 2_100},
        ],
        "browsers": [
            {"name": "Chrome", "hits": 11_000},
            {"name": "Mobile Safari", "hits": 6_000},
            {"name": browser, "hits": 2_000},
        ],
        "os": [
            {"name": "Windows", "hits": 9_000},
            {"name": "iOS", "hits": 6_500},
            {"name": "Linux", "hits": 1_500},
        ],
        "devices": [
            {"name": "desktop", "hits": 12_000},
            {"name": "mobile", "hits": 7_500},
            {"name": "tablet", "hits": 700},
        ],
        "affinity": [
            {"a": "/", "b": path, "visitors": 800, "support": 0.0889, "lift": 1.8},
            {"a": path, "b": "/about", "visitors": 120, "support": 0.0133, "lift": 2.4},
        ],
    }


def hostile_month() -> dict[str, Any]:
    """The month with markup wherever a visitor or an operator chooses the text."""
    return month_of_traffic(site=HOSTILE, path=HOSTILE, referrer_host=MARKUP, browser=HOSTILE)


def empty_month(site: str | None = "quiet.example") -> dict[str, Any]:
    return {
        "site": site,
        "from": "2026-11-01",
        "to": "2026-11-30",
        "timezone": "UTC",
        "include_bots": False,
        "summary": {
            "hits": 0,
            "visitors": 0,
            "hits_per_visitor": None,
            "bot_hits": 0,
            "bot_share": None,
            "peak_hour": None,
            "anomalies": 0,
        },
        "daily": [],
        "monthly": [],
        "hourly": [],
        "anomalies": [],
        "heatmap": {
            "weekdays": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
            "hours": list(range(24)),
            "hits": [[0] * 24 for _ in range(7)],
        },
        "top_visitors": [],
        "top_paths": [],
        "referrers": [],
        "browsers": [],
        "os": [],
        "devices": [],
        "affinity": [],
    }
