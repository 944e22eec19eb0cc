"""Anomaly benchmark: precision and recall of analytics.baseline on labelled
synthetic traffic, side by side with a plain fixed rule and an oracle.

Traffic: 90 days of hourly human hits for one site: the daily and weekly
curves of bench/traffic.py at a peak of about PEAK hits an hour (the expected
traffic), times day-to-day noise (lognormal, sigma 8 %) and hour-to-hour noise
(lognormal, 5 %), drawn as Poisson counts. Into it go labelled anomalies,
placed at random (seeded) in the hours the baseline evaluates, never two at
the same hour of the week within four weeks of each other nor within a day:

- spikes: x1.8 for 1 h, x2.5 for 2 h, x4 for 1 h, x3 for 6 h, x2 for 3 h;
- drops: x0.3 for 2 h, x0.2 for 4 h, x0.25 for 6 h;
- an outage: no hits at all for 8 h;
- and a slow ramp that is NOT an anomaly: traffic grows by 50 % over six
  weeks and stays there (a growing site; an alert on it would be noise).

Every labelled anomaly is a real one: a placement is kept only if, in every
hour it covers, the change it makes to the expected hits is at least
MIN_SIGMAS (5) standard deviations of that hour's noise (Poisson plus the
day and hour noise: sqrt(mean + variance of the lognormal factors x mean^2)).
So x1.8 goes to hours expected to have about 60 hits or more, never to a night
hour of 20 where it is 3.6 standard deviations and no detector could tell it
from noise without false alarms every few days. Drops are deeper than the
spikes are high for the same reason: the day and hour noise alone is 9 % of an
hour's traffic, so a drop to x0.5 is at most 4 standard deviations even in the
busiest hour.

What counts (the same for every detector):

- an alarm is a maximal run of consecutive hours flagged in the same
  direction (what an operator sees as one alert);
- an alarm is true when it overlaps an injected anomaly of its direction
  (the outage is a drop); precision = true alarms / alarms;
- an anomaly is detected when at least one of its hours is flagged in its
  direction; recall = detected anomalies / injected anomalies.

Detectors, over the same hours (those the baseline evaluates: from about five
weeks after the first hour on):

- baseline: analytics.baseline.evaluate at its defaults (DEFAULT_MARGIN,
  MIN_MEDIAN), or at --margin / --min-median;
- fixed rule: a spike when an hour has more than 1.5 times the hits of the
  same hour a week earlier, a drop when less than 0.5 times (not judged when
  that hour had none);
- oracle: told the true expected traffic and its noise (what no real detector
  knows), flags hours more than ORACLE_SIGMAS (4) standard deviations away.
  It shows what the benchmark allows: if the oracle missed anomalies, they
  would be too small to ask for; if the baseline did as well as it, the
  benchmark would be too easy to tell detectors apart.

    .venv/bin/python bench/anomaly.py                    # seeds 1-5, defaults
    .venv/bin/python bench/anomaly.py --seeds 6-15       # held-out seeds
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
    ("drop", 0.3, 2),
    ("drop", 0.2, 4),
    ("drop", 0.25, 6),
    ("drop", 0.0, 8),  # the outage
)
RAMP_DAYS = 42
RAMP_GROWTH = 0.5
MIN_SIGMAS = 5.0  # an injected change is at least this many SDs of its hour's noise
ORACLE_SIGMAS = 4.0
SEPARATION_WEEKS = 4  # anomalies at the same hour of the week are further apart

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
    mean: np.ndarray  # expected hits per hour without anomalies (what the oracle knows)
    sd: np.ndarray  # the standard deviation of those hits


def first_evaluated() -> int:
    """The hour index of the first hour the baseline evaluates."""
    return int((baseline.history_start(START) - START) / timedelta(hours=1))


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
    )
    # The ramp: somewhere in the evaluated part, traffic grows linearly and stays up.
    ramp_start = int(rng.integers(30, 45)) * 24
    ramp = np.clip((index - ramp_start) / (RAMP_DAYS * 24), 0.0, 1.0)
    expected *= 1.0 + RAMP_GROWTH * ramp

    # Hits are Poisson(expected x day factor x hour factor), both factors lognormal:
    # their mean and variance.
    noise_var = DAILY_NOISE**2 + HOURLY_NOISE**2
    mean = expected * np.exp(noise_var / 2)
    sd = np.sqrt(mean + expected**2 * (np.exp(2 * noise_var) - np.exp(noise_var)))
    rate = (
        expected
        * rng.lognormal(0.0, DAILY_NOISE, DAYS)[day]
        * rng.lognormal(0.0, HOURLY_NOISE, hours)
    )

    placed: list[Injected] = []
    for direction, factor, length in ANOMALIES:
        for _attempt in range(100_000):
            start = int(rng.integers(first_evaluated(), hours - length))
            candidate = Injected(direction, factor, start, length)
            span = slice(start, start + length)
            # Only real anomalies: a big enough change in every hour they cover.
            if np.any(abs(factor - 1) * mean[span] < MIN_SIGMAS * sd[span]):
                continue
            if not any(_collide(candidate, other) for other in placed):
                break
        else:
            raise ValueError(f"no hours fit a x{factor} {direction} of {length} h")
        placed.append(candidate)
        rate[span] *= factor

    hits = rng.poisson(rate)
    series = pd.Series(hits, index=pd.date_range(START, periods=hours, freq="h"))
    return Scenario(series, sorted(placed, key=lambda a: a.start), ramp_start, mean, sd)


def _collide(a: Injected, b: Injected) -> bool:
    """Too close: the same hours of the week within SEPARATION_WEEKS weeks of
    each other (one would be among the other's median samples), or less than
    a day apart."""
    week = 7 * 24
    for shift in range(-SEPARATION_WEEKS, SEPARATION_WEEKS + 1):
        gap = 24 if shift == 0 else 1
        lo, hi = b.start + shift * week - gap, b.start + b.hours + shift * week + gap
        if a.start < hi and lo < a.start + a.hours:
            return True
    return False


def baseline_flags(
    s: Scenario, margin: float, min_median: float
) -> tuple[np.ndarray, pd.DatetimeIndex]:
    start = baseline.history_start(s.hits.index[0])
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


def oracle_flags(s: Scenario, hours: pd.DatetimeIndex) -> np.ndarray:
    evaluated = slice(len(s.hits) - len(hours), None)
    sigmas = (s.hits.to_numpy()[evaluated] - s.mean[evaluated]) / s.sd[evaluated]
    flags = np.full(len(hours), "", dtype=object)
    flags[sigmas > ORACLE_SIGMAS] = "spike"
    flags[sigmas < -ORACLE_SIGMAS] = "drop"
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


def evaluate_seed(seed: int, margin: float, min_median: float) -> tuple[Score, Score, Score]:
    """The scores of the baseline, the fixed rule and the oracle on one seed."""
    s = scenario(seed)
    flags, hours = baseline_flags(s, margin, min_median)
    return (
        score(s, flags, hours),
        score(s, fixed_rule_flags(s, hours), hours),
        score(s, oracle_flags(s, hours), hours),
    )


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' or '6-15' or both: '1,3,6-9'."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


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
    seeds = parse_seeds(args.seeds)
    DAILY_NOISE, HOURLY_NOISE, RAMP_GROWTH = args.daily_noise, args.hourly_noise, args.ramp

    print(
        f"{DAYS} days of hourly traffic (peak ~{PEAK:.0f} hits/h, day-to-day noise "
        f"{DAILY_NOISE:.0%}, hour-to-hour {HOURLY_NOISE:.0%}, Poisson counts), "
        f"{len(ANOMALIES)} labelled anomalies per seed (each >= {MIN_SIGMAS:g} SD of its "
        f"hours' noise), a +{RAMP_GROWTH:.0%} ramp over {RAMP_DAYS} days (not an anomaly); "
        f"seeds {args.seeds}.\n"
    )
    if args.sweep:
        print("| margin | min median | precision | recall | alarms | false alarms "
              "| seeds meeting both |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for min_median in (5.0, 20.0):
            for margin in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5):
                total, met = Score(), 0
                for seed in seeds:
                    ours, _fixed, _oracle = evaluate_seed(seed, margin, min_median)
                    total.add(ours)
                    met += ours.precision >= TARGET and ours.recall >= TARGET
                print(f"| {margin} | {min_median:g} | {total.precision:.2f} | "
                      f"{total.recall:.2f} | {total.alarms} | "
                      f"{total.alarms - total.true_alarms} | {met}/{len(seeds)} |")  # fmt: skip
        return 0

    print(f"Baseline: margin {args.margin}, minimum median {args.min_median:g}. Fixed rule: "
          f"+-{FIXED_RULE_FACTOR:.0%} against the same hour a week earlier. Oracle: beyond "
          f"{ORACLE_SIGMAS:g} SD of the true expected traffic.\n")  # fmt: skip
    print("| seed | baseline precision | recall | alarms (false) | fixed rule precision "
          "| recall | alarms (false) | oracle precision | recall | alarms (false) "
          "| baseline meets target |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    totals = (Score(), Score(), Score())
    met = 0
    for seed in seeds:
        scores = evaluate_seed(seed, args.margin, args.min_median)
        for total, one in zip(totals, scores, strict=True):
            total.add(one)
        ok = scores[0].precision >= TARGET and scores[0].recall >= TARGET
        met += ok
        print(f"| {seed} | {' | '.join(_row(one) for one in scores)} | {'yes' if ok else 'NO'} |")
    print(f"| all | {' | '.join(_row(total) for total in totals)} | {met}/{len(seeds)} seeds |")
    return 0


def _row(score: Score) -> str:
    false_alarms = score.alarms - score.true_alarms
    return f"{score.precision:.2f} | {score.recall:.2f} | {score.alarms} ({false_alarms})"


if __name__ == "__main__":
    sys.exit(main())
