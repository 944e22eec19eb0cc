"""The baseline's arithmetic on plain series (no database): the definition in
analytics/baseline.py, hand-computed."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from analytics import baseline
from api.settings import load_settings

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def series(values: dict[datetime, int]) -> pd.Series:
    return pd.Series(values, dtype="int64").rename_axis(None)


def test_the_margin_setting_defaults_to_the_tuned_margin():
    assert load_settings({}).anomaly_margin == baseline.DEFAULT_MARGIN


def test_percentiles_interpolate_linearly_like_percentile_cont():
    week = timedelta(weeks=1)
    t = START + 4 * week
    hits = series({t - k * week: n for k, n in zip(range(1, 5), (30, 10, 20, 40), strict=True)})
    hits[t] = 100

    end = t + timedelta(hours=1)
    row = baseline.evaluate(hits, t, end, first_hour=START - week, margin=1.0).iloc[0]

    # Sorted 10, 20, 30, 40: median 25; 5th percentile at 0.15 of the way from 10 to 20;
    # 95th at 0.85 of the way from 30 to 40. spread = 38.5 - 11.5 = 27 (> sqrt(26)).
    assert (row["median"], row["low"], row["high"]) == pytest.approx((25, 11.5, 38.5))
    assert row["anomaly"] == "spike"
    assert row["score"] == pytest.approx((100 - 38.5) / 27)


def test_a_flat_history_is_widened_to_poisson_noise():
    week = timedelta(weeks=1)
    t = START + 4 * week
    hits = series({t - k * week: 100 for k in range(1, 5)})
    hits[t] = 121  # beyond 100 + 1 * sqrt(101), within 100 + 2.5 * sqrt(101)

    def judged(margin: float) -> str | None:
        row = baseline.evaluate(
            hits, t, t + timedelta(hours=1), first_hour=START - week, margin=margin
        )
        value = row.iloc[0]["anomaly"]
        return value if isinstance(value, str) else None

    assert judged(1.0) == "spike"
    assert judged(2.5) is None


def test_hours_without_four_weeks_of_history_are_not_judged():
    first = START
    hits = series({first: 50, first + timedelta(weeks=4): 500})
    end = first + timedelta(weeks=4, hours=2)

    frame = baseline.evaluate(hits, first + timedelta(weeks=4), end, first_hour=first)

    # t = first + 4 weeks has no row strictly before t - 4 weeks; the next hour has.
    assert math.isnan(frame.iloc[0]["median"])
    assert frame.iloc[1]["median"] == 0
    assert baseline.history_start(first) == first + timedelta(weeks=4, hours=1)
    assert baseline.evaluate(hits, first, end, first_hour=None)["median"].isna().all()


def test_low_medians_are_never_anomalies():
    week = timedelta(weeks=1)
    t = START + 4 * week
    hits = series({t - k * week: 4 for k in range(1, 5)})
    hits[t] = 400

    row = baseline.evaluate(hits, t, t + timedelta(hours=1), first_hour=START - week).iloc[0]

    assert row["median"] == 4 < baseline.MIN_MEDIAN
    assert not isinstance(row["anomaly"], str)
