"""The anomaly baseline: ONE definition, shared by the report, /api/stats and
Grafana's panel and alert (which import these constants when they are generated).

For a complete UTC hour t, with `hits` the site's human hits in an hour
(site_hourly; 0 when there is no row):

- median(t): the median of the hits at t - 7 days * k for k = 1..WEEKS (the
  same hour of the week in the previous four weeks; a missing row counts as 0).
- deviation(s) = (hits(s) - median(s)) / sqrt(median(s) + 1): how far an hour
  was from its own median, in units of Poisson noise. Defined for the hours s
  that have WEEKS weeks of history (the site has a row before s - WEEKS weeks).
- the band's shape: the LOW_Q and HIGH_Q percentiles (linear interpolation,
  numpy.percentile's default and PostgreSQL's percentile_cont) of the
  deviations of every hour in the POOL_DAYS days before t's UTC day. It is
  learned once a day from about 720 hours, not from the four samples of one
  hour of the week, and since each hour's deviation is from its own past
  weeks, a steady growth shows up in the pool and shifts the band with it.
- low = max(median + q_low * sqrt(median + 1), 0) (hits are never negative),
  high = median + q_high * sqrt(median + 1); spread = max(high - low,
  sqrt(median + 1)) (never narrower than Poisson noise, for a site so flat
  that its deviations are all alike).
- a spike if hits > high + margin * spread, a drop if hits < low - margin *
  spread; score = (hits - high) / spread or (low - hits) / spread: how many
  band widths beyond the band.
- t is evaluated (median, low and high are set) when the site's first row is
  more than WEEKS weeks + MIN_POOL_DAYS days before t's UTC day, so the pool
  holds at least MIN_POOL_DAYS days of deviations; a new site waits about five
  weeks for its first band.
- hours whose median is below MIN_MEDIAN are never anomalies: at a handful of
  hits an hour any change is noise.

DEFAULT_MARGIN is tuned by bench/anomaly.py (precision and recall on labelled
synthetic traffic, seeds 1-5, checked on held-out seeds 6-15);
TELEMETRY_ANOMALY_MARGIN overrides it. 0.8 band widths beyond the band is
about four standard deviations of ordinary traffic: a narrower margin raised
false alarms faster than it found anomalies, a wider one missed the smallest
one-hour spikes.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

WEEKS = 4
POOL_DAYS = 30
MIN_POOL_DAYS = 7
LOW_Q = 0.05
HIGH_Q = 0.95
MIN_MEDIAN = 5.0
DEFAULT_MARGIN = 0.8

HOUR = timedelta(hours=1)
WEEK = timedelta(weeks=1)
DAY = timedelta(days=1)
# The history an hour's median needs, and how long after its first row a site's
# UTC day must start to be evaluated.
MEDIAN_HISTORY = WEEKS * WEEK
EVALUATION_DELAY = MEDIAN_HISTORY + MIN_POOL_DAYS * DAY
# How far before `start` evaluate() needs hits: the pool of start's UTC day
# (which may begin up to a day before start) and the medians of that pool.
HISTORY = DAY + POOL_DAYS * DAY + MEDIAN_HISTORY

SPIKE = "spike"
DROP = "drop"


def utc_day(moment: datetime | pd.Timestamp) -> pd.Timestamp:
    return pd.Timestamp(moment).tz_convert("UTC").floor("D")


def history_start(first_hour: datetime) -> datetime:
    """The first hour that is evaluated for a site whose first site_hourly row
    is `first_hour`: the first UTC midnight more than EVALUATION_DELAY after it."""
    return (utc_day(pd.Timestamp(first_hour) + EVALUATION_DELAY) + DAY).to_pydatetime()


def evaluate(
    hits: pd.Series,
    start: datetime,
    end: datetime,
    *,
    first_hour: datetime | None,
    margin: float = DEFAULT_MARGIN,
    min_median: float = MIN_MEDIAN,
) -> pd.DataFrame:
    """The baseline of every hour in [start, end).

    `hits` holds human hits per UTC hour (a DatetimeIndex of hour starts, aware
    UTC) from at least start - HISTORY on; hours it lacks count as 0.
    `first_hour` is the site's first site_hourly row (None: no data at all).
    `end` must not go past the last complete hour: the current hour is not
    finished and would look like a drop.

    Returns one row per hour (index: the UTC hour) with columns hits, median,
    low, high (NaN where not evaluated), anomaly (None, SPIKE or DROP) and
    score (NaN unless an anomaly).
    """
    hours = pd.date_range(start, end, freq="h", inclusive="left", tz="UTC")
    first_day = utc_day(start)
    # Medians are needed from the first pool's start on; their samples go back WEEKS more.
    medians_from = first_day - POOL_DAYS * DAY
    span = pd.date_range(medians_from - MEDIAN_HISTORY, end, freq="h", inclusive="left", tz="UTC")
    series = hits.reindex(span, fill_value=0).astype("float64").to_numpy()

    week = 7 * 24
    lead = WEEKS * week  # hours of span before medians_from
    index = np.arange(lead, len(span))
    samples = np.stack([series[index - week * k] for k in range(1, WEEKS + 1)], axis=1)
    median = np.percentile(samples, 50, axis=1) if len(index) else np.empty(0)
    current = series[index]
    scale = np.sqrt(median + 1)
    deviation = (current - median) / scale
    hour_of = span[lead:]  # the hour of each median
    if first_hour is None:
        has_history = np.zeros(len(index), dtype=bool)
    else:
        has_history = hour_of > pd.Timestamp(first_hour) + MEDIAN_HISTORY

    low = np.full(len(index), np.nan)
    high = np.full(len(index), np.nan)
    pool_hours = POOL_DAYS * 24
    days = pd.date_range(first_day, end, freq="D", inclusive="left", tz="UTC")
    evaluated_from = pd.Timestamp(history_start(first_hour)) if first_hour is not None else None
    for day in days:
        if evaluated_from is None or day < evaluated_from:
            continue
        day_at = int((day - medians_from) / HOUR)  # the index of the day's first hour
        pool = deviation[day_at - pool_hours : day_at][has_history[day_at - pool_hours : day_at]]
        q_low, q_high = np.percentile(pool, [LOW_Q * 100, HIGH_Q * 100])
        today = slice(day_at, day_at + 24)
        low[today] = np.maximum(median[today] + q_low * scale[today], 0.0)
        high[today] = median[today] + q_high * scale[today]

    # Keep the hours of [start, end): the medians start at the first pool's start.
    skipped = int((pd.Timestamp(start) - medians_from) / HOUR)
    keep = slice(skipped, skipped + len(hours))
    current, median, low, high, scale = (a[keep] for a in (current, median, low, high, scale))
    evaluated = ~np.isnan(low)
    median = np.where(evaluated, median, np.nan)

    spread = np.maximum(high - low, scale)
    judged = evaluated & (median >= min_median)
    spike = judged & (current > high + margin * spread)
    drop = judged & (current < low - margin * spread)
    anomaly = np.full(len(hours), None, dtype=object)
    anomaly[spike] = SPIKE
    anomaly[drop] = DROP
    beyond = np.where(drop, (low - current) / spread, np.nan)
    score = np.where(spike, (current - high) / spread, beyond)

    return pd.DataFrame(
        {
            "hits": current.astype("int64"),
            "median": median,
            "low": low,
            "high": high,
            "anomaly": anomaly,
            "score": score,
        },
        index=hours,
    )
