"""The baseline's arithmetic on plain series (no database): the definition in
analytics/baseline.py, hand-computed."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from analytics import baseline
from api.settings import load_settings

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def flat(value: int, days: int) -> pd.Series:
    """`value` hits in every hour of `days` days from START."""
    index = pd.date_range(START, periods=days * 24, freq="h")
    return pd.Series(value, index=index, dtype="int64")


def one_day(hits: pd.Series, day: datetime, margin: float = 1.0) -> pd.DataFrame:
    return baseline.evaluate(hits, day, day + DAY, first_hour=START, margin=margin)


def test_the_margin_setting_defaults_to_the_tuned_margin():
    assert load_settings({}).anomaly_margin == baseline.DEFAULT_MARGIN


def test_the_band_is_the_pooled_percentiles_of_30_days_of_deviations():
    # 99 hits an hour (sqrt(99 + 1) = 10), except in one week of the day's 30-day pool,
    # where each changed hour is a different hour of the week: every median stays 99
    # (at most one of its four samples changed) and the changed hours' deviations are
    # (hits - 99) / 10.
    day = START + 70 * DAY
    hits = flat(99, 71)
    changed = pd.date_range(START + 42 * DAY, periods=74, freq="h")
    hits[changed[:36]] = 69  # deviation -3
    hits[changed[36]] = 89  # -1
    hits[changed[37]] = 109  # +1
    hits[changed[38:]] = 139  # +4
    hour = day + 10 * HOUR

    def judged(n: int) -> pd.Series:
        hits[hour] = n
        return one_day(hits, day).loc[hour]

    # 720 deviations sorted: 36 x -3, -1, 646 x 0, +1, 36 x +4. The 5th percentile is at
    # position 0.05 x 719 = 35.95: 0.95 of the way from -3 to -1; the 95th at 683.05:
    # 0.05 of the way from +1 to +4 (linear, like percentile_cont).
    q_low, q_high = -3 + 0.95 * 2, 1 + 0.05 * 3
    low, high = 99 + 10 * q_low, 99 + 10 * q_high
    spread = high - low  # 22.5 > sqrt(100)
    row = judged(140)
    assert (row["median"], row["low"], row["high"]) == pytest.approx((99, low, high))
    assert row["anomaly"] == "spike"
    assert row["score"] == pytest.approx((140 - high) / spread)
    assert judged(int(high + spread) - 1)["anomaly"] is None
    row = judged(60)
    assert row["anomaly"] == "drop"
    assert row["score"] == pytest.approx((low - 60) / spread)


def test_a_flat_history_is_widened_to_poisson_noise():
    # Every deviation is 0: a band of zero width at the median, widened to sqrt(100).
    day = START + 40 * DAY
    hits = flat(99, 41)
    hour = day + 12 * HOUR

    def judged(n: int, margin: float) -> str | None:
        hits[hour] = n
        value = one_day(hits, day, margin).loc[hour]["anomaly"]
        return value if isinstance(value, str) else None

    assert judged(99 + 11, 1.0) == "spike"
    assert judged(99 + 11, 1.5) is None
    assert judged(99 - 11, 1.0) == "drop"


def test_a_steady_growth_moves_the_band_with_it():
    # From 20 to 200 hits an hour over 70 days: each hour's median (2.5 weeks back on
    # average) lags by about 45 hits, and the 30 days of deviations carry that lag.
    days = 71
    growth = 20 + 180 * np.arange(days * 24) / (70 * 24)
    index = pd.date_range(START, periods=days * 24, freq="h")
    hits = pd.Series(np.round(growth).astype("int64"), index=index)

    band = one_day(hits, START + 70 * DAY, margin=baseline.DEFAULT_MARGIN)

    assert band["anomaly"].isna().all()
    assert (band["low"] > band["median"] + 3 * np.sqrt(band["median"] + 1)).all()


def test_hours_before_five_weeks_of_history_are_not_judged():
    hits = flat(50, 40)
    # The first row at START: medians from START + 4 weeks, and the pool must hold
    # 7 days of their deviations: the first UTC day more than 35 days after START.
    assert baseline.history_start(START) == START + 36 * DAY
    assert baseline.history_start(START + 5 * HOUR) == START + 36 * DAY
    assert baseline.history_start(START - HOUR) == START + 35 * DAY

    frame = baseline.evaluate(hits, START + 35 * DAY, START + 37 * DAY, first_hour=START)

    assert frame["median"][:24].isna().all() and frame["low"][:24].isna().all()
    assert frame["median"][24:].eq(50).all() and frame["low"][24:].notna().all()
    no_data = baseline.evaluate(hits, START + 35 * DAY, START + 37 * DAY, first_hour=None)
    assert no_data["median"].isna().all()


def test_a_range_that_starts_mid_day_uses_its_day_s_band():
    hits = flat(99, 41)
    hits[START + 40 * DAY + 15 * HOUR] = 150
    whole_day = one_day(hits, START + 40 * DAY)
    afternoon = baseline.evaluate(
        hits, START + 40 * DAY + 13 * HOUR, START + 41 * DAY, first_hour=START, margin=1.0
    )
    pd.testing.assert_frame_equal(afternoon, whole_day.iloc[13:])
    assert afternoon["anomaly"].notna().sum() == 1


def test_low_medians_are_never_anomalies():
    day = START + 40 * DAY
    hits = flat(4, 41)
    hits[day + 12 * HOUR] = 400

    row = one_day(hits, day).loc[day + 12 * HOUR]

    assert row["median"] == 4 < baseline.MIN_MEDIAN
    assert not isinstance(row["anomaly"], str)
    assert not math.isnan(row["high"])
