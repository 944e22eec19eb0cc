"""The anomaly baseline: ONE definition, shared by the report, /api/stats and
Grafana's panel and alert (which import these constants when they are generated).

For a complete UTC hour t, with `hits` the site's human hits in that hour
(site_hourly; 0 when there is no row):

- samples: the hits at t - 7 days * k for k = 1..WEEKS (the same hour of the
  week in the previous four weeks; a missing row counts as 0). If the site has
  no row at all before t - WEEKS weeks, t is not evaluated (a new site has no
  history to compare with).
- median, low, high: the 50th, LOW_Q and HIGH_Q percentiles of the samples,
  linearly interpolated (numpy.percentile's default, PostgreSQL's
  percentile_cont).
- spread = max(high - low, sqrt(median + 1)): the band's width, but never
  narrower than Poisson noise, so a flat history does not flag every wiggle.
- a spike if hits > high + margin * spread, a drop if hits < low - margin *
  spread; score = (hits - high) / spread or (low - hits) / spread: how many
  spreads beyond the band.
- hours whose median is below MIN_MEDIAN are never anomalies: at a handful of
  hits an hour any change is noise.

DEFAULT_MARGIN and MIN_MEDIAN are tuned by bench/anomaly.py (precision and
recall on labelled synthetic traffic); TELEMETRY_ANOMALY_MARGIN overrides the
margin. No margin meets the target there (precision and recall >= 0.9): with
four samples, high - low is a noisy estimate of the spread, so a narrow margin
floods with false alarms and a wide one misses the smaller anomalies. 3.0
keeps false alarms near one per real anomaly (precision 0.43, recall 0.71 on
realistic noise; 0.93 and 0.80 on Poisson noise alone), where 1.0 raised
thirteen false alarms for each real one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

WEEKS = 4
LOW_Q = 0.05
HIGH_Q = 0.95
MIN_MEDIAN = 5.0
DEFAULT_MARGIN = 3.0

HISTORY = timedelta(weeks=WEEKS)
HOUR = pd.Timedelta(hours=1)

SPIKE = "spike"
DROP = "drop"


def history_start(first_hour: datetime) -> datetime:
    """The first hour that is evaluated for a site whose first site_hourly row
    is `first_hour`: the first one with a row strictly before t - HISTORY."""
    return first_hour + HISTORY + timedelta(hours=1)


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
    span = pd.date_range(pd.Timestamp(start) - HISTORY, end, freq="h", inclusive="left", tz="UTC")
    series = hits.reindex(span, fill_value=0).astype("float64").to_numpy()
    offset = len(span) - len(hours)  # = hours in HISTORY
    week = 7 * 24
    index = np.arange(len(hours)) + offset
    samples = np.stack([series[index - week * k] for k in range(1, WEEKS + 1)], axis=1)
    current = series[index]

    if len(hours):
        median, low, high = np.percentile(samples, [50, LOW_Q * 100, HIGH_Q * 100], axis=1)
    else:
        median = low = high = np.empty(0)
    evaluated = np.zeros(len(hours), dtype=bool)
    if first_hour is not None:
        evaluated = hours >= pd.Timestamp(history_start(first_hour))
    median = np.where(evaluated, median, np.nan)
    low = np.where(evaluated, low, np.nan)
    high = np.where(evaluated, high, np.nan)

    spread = np.maximum(high - low, np.sqrt(median + 1))
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
