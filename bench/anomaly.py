"""Anomaly benchmark: precision and recall of analytics.baseline on labelled
synthetic traffic, side by side with a plain fixed rule.

Traffic: 90 days of hourly human hits for one site: the daily and weekly
curves of bench/traffic.py at a peak of about PEAK hits an hour, day-to-day
noise (lognormal), hour-to-hour noise (lognormal) and Poisson counts. Into it
go labelled anomalies, placed at random (seeded) after the first four weeks
(which have no baseline yet), never two at the same hour of the week within
four weeks of each other:

- spikes: x1.8 for 1 h, x2.5 for 2 h, x4 for 1 h, x3 for 6 h, x2 for 3 h;
- drops: x0.4 for 2 h, x0.2 for 4 h, x0.5 for 6 h;
- an outage: no hits at all for 8 h;
- and a slow ramp that is NOT an anomaly: traffic grows by 50 % over six
  weeks and stays there (a growing site; an alert on it would be noise).

What counts (the same for both detectors):

- an alarm is a maximal run of consecutive hours flagged in the same
  direction (what an operator sees as one alert);
- an alarm is true when it overlaps an injected anomaly of its direction
  (the outage is a drop); precision = true alarms / alarms;
- an anomaly is detected when at least one of its hours is flagged in its
  direction; recall = detected anomalies / injected anomalies.

Detectors, over the same hours (those the baseline evaluates: from four
weeks after the first hour on):

- baseline: analytics.baseline.evaluate at its defaults (DEFAULT_MARGIN,
  MIN_MEDIAN), or at --margin / --min-median;
- fixed rule: a spike when an hour has more than 1.5 times the hits of the
  same hour a week earlier, a drop when less than 0.5 times (not judged when
  that hour had none).

    .venv/bin/python bench/anomaly.py                    # seeds 1-5, defaults
    .venv/bin/python bench/anomaly.py --sweep            # margins x minimum medians

Target: precision >= 0.9 and recall >= 0.9 at the defaults, on more than one seed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analytics import baseline  # noqa: E402
from bench.traffic import HOURLY_PROFILE, WEEKLY_PROFILE  # noqa: E402

DAYS = 90
PEAK = 150.0  # expected hits in the busiest hour of a weekday
DAILY_NOISE = 0.08  # lognormal sigma, per day
HOURLY_NOISE = 0.05  # lognormal sigma, per hour
START = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday

# (direction, factor, hours)
ANOMALIES = (
    ("spike", 1.8, 1),
    ("spike", 2.5, 2),
    ("spike", 4.0, 1),
    ("spike", 3.0, 6),
    ("spike", 2.0, 3),
    ("drop", 0.4, 2),
    ("drop", 0.2, 4),
    ("drop", 0.5, 6),
    ("drop", 0.0, 8),  # the outage
)
RAMP_DAYS = 42
RAMP_GROWTH = 0.5

FIXED_RULE_FACTOR = 0.5
TARGET = 0.9


@dataclass(frozen=True)
class Injected:
    direction: str
    factor: float
    start: int  # hour index
    hours: int

    @property
    def span(self) -> range:
        return range(self.start, self.start + self.hours)


@dataclass(frozen=True)
class Scenario:
    hits: pd.Series  # hits per UTC hour
    anomalies: list[Injected]
    ramp_start: int  # hour index


def scenario(seed: int) -> Scenario:
    """Seeded traffic with labelled anomalies and a ramp."""
    rng = np.random.default_rng(seed)
    hours = DAYS * 24
    index = np.arange(hours)
    day = index // 24
    weekday = (START.weekday() + day) % 7
    expected = (
        PEAK
        / max(HOURLY_PROFILE)
        * np.asarray(HOURLY_PROFILE)[index % 24]
        * np.asarray(WEEKLY_PROFILE)[weekday]
        * rng.lognormal(0.0, DAILY_NOISE, DAYS)[day]
        * rng.lognormal(0.0, HOURLY_NOISE, hours)
    )

    # The ramp: somewhere in the evaluated part, traffic grows linearly and stays up.
    ramp_start = int(rng.integers(30, 45)) * 24
    ramp = np.clip((index - ramp_start) / (RAMP_DAYS * 24), 0.0, 1.0)
    expected *= 1.0 + RAMP_GROWTH * ramp

    first_evaluated = (baseline.WEEKS * 7 + 1) * 24
    placed: list[Injected] = []
    for direction, factor, length in ANOMALIES:
        while True:
            start = int(rng.integers(first_evaluated, hours - length))
            candidate = Injected(direction, factor, start, length)
            if not any(_collide(candidate, other) for other in placed):
                break
        placed.append(candidate)
        expected[candidate.start : candidate.start + length] *= factor

    hits = rng.poisson(expected)
    series = pd.Series(hits, index=pd.date_range(START, periods=hours, freq="h"))
    return Scenario(series, sorted(placed, key=lambda a: a.start), ramp_start)


def _collide(a: Injected, b: Injected) -> bool:
    """Too close: the same hours of the week within WEEKS weeks of each other
    (one would be in the other's baseline), or less than a day apart."""
    week = 7 * 24
    for shift in range(-baseline.WEEKS, baseline.WEEKS + 1):
        gap = 24 if shift == 0 else 1
        lo, hi = b.start + shift * week - gap, b.start + b.hours + shift * week + gap
        if a.start < hi and lo < a.start + a.hours:
            return True
    return False


def baseline_flags(
    s: Scenario, margin: float, min_median: float
) -> tuple[np.ndarray, pd.DatetimeIndex]:
    start = s.hits.index[0] + baseline.HISTORY + timedelta(hours=1)
    end = s.hits.index[-1] + timedelta(hours=1)
    judged = baseline.evaluate(
        s.hits, start, end, first_hour=s.hits.index[0], margin=margin, min_median=min_median
    )
    flags = np.array([a if isinstance(a, str) else "" for a in judged["anomaly"]], dtype=object)
    return flags, judged.index


def fixed_rule_flags(s: Scenario, hours: pd.DatetimeIndex) -> np.ndarray:
    week_ago = s.hits.reindex(hours - timedelta(weeks=1), fill_value=0).to_numpy()
    current = s.hits.reindex(hours).to_numpy()
    flags = np.full(len(hours), "", dtype=object)
    judged = week_ago > 0
    flags[judged & (current > (1 + FIXED_RULE_FACTOR) * week_ago)] = "spike"
    flags[judged & (current < FIXED_RULE_FACTOR * week_ago)] = "drop"
    return flags


@dataclass
class Score:
    alarms: int = 0
    true_alarms: int = 0
    anomalies: int = 0
    detected: int = 0

    @property
    def precision(self) -> float:
        return self.true_alarms / self.alarms if self.alarms else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.anomalies if self.anomalies else 1.0

    def add(self, other: Score) -> None:
        for name in ("alarms", "true_alarms", "anomalies", "detected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def score(s: Scenario, flags: np.ndarray, hours: pd.DatetimeIndex) -> Score:
    offset = int((hours[0] - s.hits.index[0]) / timedelta(hours=1))
    flagged = {offset + i: f for i, f in enumerate(flags) if f}
    result = Score(anomalies=len(s.anomalies))
    for a in s.anomalies:
        if any(flagged.get(h) == a.direction for h in a.span):
            result.detected += 1
    for run_hours, direction in _runs(flagged):
        result.alarms += 1
        if any(a.direction == direction and set(a.span) & run_hours for a in s.anomalies):
            result.true_alarms += 1
    return result


def _runs(flagged: dict[int, str]) -> list[tuple[set[int], str]]:
    """Maximal runs of consecutive hours flagged in the same direction."""
    runs: list[tuple[set[int], str]] = []
    for hour in sorted(flagged):
        direction = flagged[hour]
        if runs and hour - 1 in runs[-1][0] and runs[-1][1] == direction:
            runs[-1][0].add(hour)
        else:
            runs.append(({hour}, direction))
    return runs


def evaluate_seed(seed: int, margin: float, min_median: float) -> tuple[Score, Score]:
    s = scenario(seed)
    flags, hours = baseline_flags(s, margin, min_median)
    return score(s, flags, hours), score(s, fixed_rule_flags(s, hours), hours)


def main(argv: list[str] | None = None) -> int:
    global DAILY_NOISE, HOURLY_NOISE, RAMP_GROWTH
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--margin", type=float, default=baseline.DEFAULT_MARGIN)
    parser.add_argument("--min-median", type=float, default=baseline.MIN_MEDIAN)
    parser.add_argument("--sweep", action="store_true", help="try margins x minimum medians")
    parser.add_argument("--daily-noise", type=float, default=DAILY_NOISE)
    parser.add_argument("--hourly-noise", type=float, default=HOURLY_NOISE)
    parser.add_argument("--ramp", type=float, default=RAMP_GROWTH, help="growth of the ramp")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    DAILY_NOISE, HOURLY_NOISE, RAMP_GROWTH = args.daily_noise, args.hourly_noise, args.ramp

    print(
        f"{DAYS} days of hourly traffic (peak ~{PEAK:.0f} hits/h, day-to-day noise "
        f"{DAILY_NOISE:.0%}, hour-to-hour {HOURLY_NOISE:.0%}, Poisson counts), "
        f"{len(ANOMALIES)} labelled anomalies per seed, a +{RAMP_GROWTH:.0%} ramp over "
        f"{RAMP_DAYS} days (not an anomaly); seeds {args.seeds}.\n"
    )
    if args.sweep:
        print("| margin | min median | precision | recall | alarms | false alarms "
              "| seeds meeting both |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for min_median in (5.0, 20.0):
            for margin in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
                total, met = Score(), 0
                for seed in seeds:
                    ours, _fixed = evaluate_seed(seed, margin, min_median)
                    total.add(ours)
                    met += ours.precision >= TARGET and ours.recall >= TARGET
                print(f"| {margin} | {min_median:g} | {total.precision:.2f} | "
                      f"{total.recall:.2f} | {total.alarms} | "
                      f"{total.alarms - total.true_alarms} | {met}/{len(seeds)} |")  # fmt: skip
        return 0

    print(f"Baseline: margin {args.margin}, minimum median {args.min_median:g}. Fixed rule: "
          f"+-{FIXED_RULE_FACTOR:.0%} against the same hour a week earlier.\n")  # fmt: skip
    print("| seed | baseline precision | baseline recall | alarms (false) | fixed precision "
          "| fixed recall | alarms (false) | baseline meets target |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    totals = (Score(), Score())
    met = 0
    for seed in seeds:
        ours, fixed = evaluate_seed(seed, args.margin, args.min_median)
        totals[0].add(ours)
        totals[1].add(fixed)
        ok = ours.precision >= TARGET and ours.recall >= TARGET
        met += ok
        print(f"| {seed} | {_row(ours)} | {_row(fixed)} | {'yes' if ok else 'NO'} |")
    print(f"| all | {_row(totals[0])} | {_row(totals[1])} | {met}/{len(seeds)} seeds |")
    return 0


def _row(score: Score) -> str:
    false_alarms = score.alarms - score.true_alarms
    return f"{score.precision:.2f} | {score.recall:.2f} | {score.alarms} ({false_alarms})"


if __name__ == "__main__":
    sys.exit(main())
