"""Import benchmark: `telemetry import` of a generated access log against a bare
insert of the same rows, on every backend, side by side.

1. Writes a seeded combined-format log of `--lines` lines (default 1M) from the
   traffic generator (bench/traffic.py): its page views, plus what real logs
   also hold and the import leaves out (static assets, POSTs, 404s). Each
   visitor has one address per month, as its `ip_hash` does.
2. For each backend (a temporary SQLite file; a fresh database on the
   PostgreSQL and on the TimescaleDB server): imports the log with
   `api.logimport.LogImporter` (parse, validate, hash, classify, store in
   batches with their idempotency keys), then, in the same database emptied,
   stores the rows the import produced the barest way (bench/queries.py's
   `bare_load`: a COPY of preformatted rows or an executemany of ready tuples,
   everything prepared before the clock starts), and the import's batch keys
   with one INSERT. The aggregate refresh after the import is timed apart: it
   is not part of either side. With `--rounds` above 1 the two sides take
   turns going first (import, bare, bare, import, ...), each import a fresh
   run into an emptied database, so that drift on a shared machine hits both.
3. Prints lines/s, rows/s and the ratio import time / bare time (target: at
   most 1.5): the median of the rounds' ratios, each measured side by side,
   and the load average while the backend ran.

    .venv/bin/python bench/import.py                       # 1M lines, all backends
    .venv/bin/python bench/import.py --lines 100000 --backends sqlite --rounds 1
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.logimport import BATCH_LINES, FileReport, ImportOptions, LogImporter  # noqa: E402
from api.settings import load_settings  # noqa: E402
from bench.queries import bare_load, create_database, empty_hits  # noqa: E402
from bench.traffic import Traffic, TrafficConfig  # noqa: E402
from db import aggregates  # noqa: E402
from db.bulk import HitChunk  # noqa: E402
from db.engine import Backend, make_engine  # noqa: E402
from db.models import SeenEvent  # noqa: E402

TARGET_RATIO = 1.5
ASSETS = ("/static/app.css", "/static/app.js", "/static/logo.svg", "/favicon.ico",
          "/images/hero.webp", "/fonts/inter.woff2")  # fmt: skip
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def log_lines(lines: int, seed: int = 1, days: int = 90, end: date | None = None) -> Iterator[str]:
    """`lines` combined-format lines of seeded traffic, in time order.

    About 70% are page views the import keeps; the rest are static assets
    (fetched after a page view), POSTs and 404s. Addresses are IPv4, one per
    visitor and month (derived from the generator's `ip_hash`).
    """
    rng = np.random.default_rng([seed, 7])
    # More page views than needed: the lines stop at `lines`.
    config = TrafficConfig(events=lines, days=days, end=end, seed=seed)
    written = 0
    for chunk in Traffic(config).chunks():
        extra = rng.random(len(chunk))
        for index, (ts, site, path, referrer, ip_hash, agent) in enumerate(
            zip(
                chunk.ts.astype("datetime64[s]").tolist(),
                chunk.site.tolist(),
                chunk.path.tolist(),
                chunk.referrer.tolist(),
                chunk.ip_hash.tolist(),
                chunk.user_agent.tolist(),
                strict=True,
            )
        ):
            address = f"{ip_hash[0]}.{ip_hash[1]}.{ip_hash[2]}.{ip_hash[3] or 1}"
            when = f"{ts.day:02d}/{_MONTHS[ts.month - 1]}/{ts.year}:{ts:%H:%M:%S} +0000"
            tail = f'"{referrer or "-"}" "{agent}"'
            status = "404" if extra[index] > 0.97 else "200"
            yield f'{address} - - [{when}] "GET {path} HTTP/1.1" {status} 5120 {tail}\n'
            written += 1
            if written < lines and extra[index] < 0.35:
                asset = ASSETS[int(extra[index] * 100) % len(ASSETS)]
                page = f"https://{site}{path.partition('?')[0]}"
                yield f'{address} - - [{when}] "GET {asset} HTTP/1.1" 200 900 "{page}" "{agent}"\n'
                written += 1
            if written < lines and 0.95 < extra[index] <= 0.97:
                yield f'{address} - - [{when}] "POST /api/subscribe HTTP/1.1" 204 0 {tail}\n'
                written += 1
            if written >= lines:
                return


def write_log(path: Path, lines: int, seed: int = 1, days: int = 90) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:  # type: ignore[operator]
        out.writelines(log_lines(lines, seed, days))


@dataclass
class Result:
    backend: Backend
    lines: int
    rows: int = 0
    import_seconds: list[float] = field(default_factory=list)
    bare_seconds: list[float] = field(default_factory=list)
    refresh_seconds: float = 0.0
    malformed: int = 0
    load: list[float] = field(default_factory=list)  # 1-minute load average, per round

    @property
    def ratios(self) -> list[float]:
        return [i / b for i, b in zip(self.import_seconds, self.bare_seconds, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def produced_rows(importer: LogImporter, log: Path) -> list[HitChunk]:
    """The rows the import stores, converted again without storing them."""
    chunks = []
    report = FileReport(str(log))
    with log.open("rb") as lines:
        while batch := list(itertools.islice(lines, BATCH_LINES)):
            hits = importer.convert_lines(b"".join(batch), len(batch), 1, report)
            chunks.append(HitChunk.from_arrow(hits))
    return chunks


_IMPORT_KEYS = SeenEvent.event_id.like("import:%")


def forget_import(engine: sa.Engine) -> None:
    """No hits and no import keys: the next import stores every line again."""
    empty_hits(engine)
    with engine.begin() as connection:
        connection.execute(sa.delete(SeenEvent).where(_IMPORT_KEYS))


def store_keys(engine: sa.Engine, keys: list[dict[str, object]]) -> float:
    """Seconds to store the import's batch keys, as the bare side's share of them."""
    start = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.insert(SeenEvent), keys)
    return time.perf_counter() - start


def run_backend(backend: Backend, log: Path, lines: int, workdir: Path, rounds: int) -> Result:
    database = create_database(backend, workdir)
    engine = make_engine(database.url)
    result = Result(backend, lines)
    try:
        settings = load_settings({}, database_url=database.url)
        chunks: list[HitChunk] = []
        keys: list[dict[str, object]] = []
        for round_ in range(rounds):
            sides = ("import", "bare") if round_ % 2 == 0 else ("bare", "import")
            for side in sides:
                forget_import(engine)
                if side == "bare":
                    seconds = bare_load(engine, chunks) + store_keys(engine, keys)
                    result.bare_seconds.append(seconds)
                    with engine.connect() as connection:
                        stored = connection.execute(sa.text("SELECT count(*) FROM hits")).scalar()
                    assert stored == result.rows, (stored, result.rows)
                    continue
                importer = LogImporter(engine, settings, ImportOptions(max_errors=lines))
                start = time.perf_counter()
                report = importer.import_file(log)
                result.import_seconds.append(time.perf_counter() - start)
                if round_ == 0:  # what the bare side stores: the same rows and keys
                    start = time.perf_counter()
                    aggregates.refresh(engine, importer.report.first, importer.report.last)
                    result.refresh_seconds = time.perf_counter() - start
                    result.rows, result.malformed = report.stored, report.malformed
                    chunks = produced_rows(importer, log)
                    assert sum(len(c) for c in chunks) == report.stored
                    with engine.connect() as connection:
                        stored_keys = connection.execute(
                            sa.select(SeenEvent.event_id, SeenEvent.ts).where(_IMPORT_KEYS)
                        )
                        keys = [{"event_id": k, "ts": ts} for k, ts in stored_keys]
                assert report.stored == result.rows, (report.stored, result.rows)
            result.load.append(os.getloadavg()[0])
            print(
                f"    {backend} round {round_ + 1}: import {result.import_seconds[-1]:.1f} s, "
                f"bare {result.bare_seconds[-1]:.1f} s, ratio {result.ratios[-1]:.2f}, "
                f"load {result.load[-1]:.1f}",
                flush=True,
            )
        return result
    finally:
        engine.dispose()
        database.drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--backends", default="sqlite,postgresql,timescaledb")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    backends = [Backend(name) for name in args.backends.split(",")]

    with tempfile.TemporaryDirectory(prefix="telemetry-import-bench-") as tmp:
        workdir = Path(tmp)
        log = workdir / "access.log"
        start = time.perf_counter()
        write_log(log, args.lines, args.seed, args.days)
        print(
            f"generated {args.lines:,} lines ({log.stat().st_size / 1e6:.0f} MB) in "
            f"{time.perf_counter() - start:.1f} s; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        results = []
        for backend in backends:
            results.append(run_backend(backend, log, args.lines, workdir, args.rounds))

    print()
    print("Medians of the rounds; import/bare is the median of the rounds' ratios.")
    print("| backend | lines | rows stored | import s | import lines/s | bare s | bare rows/s "
          "| import/bare | rounds' ratios | target | load | range refresh s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|")
    for r in results:
        verdict = "ok" if r.ratio <= TARGET_RATIO else f"MISSED (<= {TARGET_RATIO})"
        import_s, bare_s = statistics.median(r.import_seconds), statistics.median(r.bare_seconds)
        print(
            f"| {r.backend} | {r.lines:,} | {r.rows:,} | {import_s:.1f} "
            f"| {r.lines / import_s:,.0f} | {bare_s:.1f} | {r.rows / bare_s:,.0f} "
            f"| {r.ratio:.2f} | {', '.join(f'{x:.2f}' for x in r.ratios)} | {verdict} "
            f"| {min(r.load):.1f}-{max(r.load):.1f} | {r.refresh_seconds:.1f} |"
        )
    return 0 if all(r.ratio <= TARGET_RATIO for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
