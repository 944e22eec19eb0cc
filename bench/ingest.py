"""Ingestion benchmark: the real `/track` against the ceiling of the same stack.

Starts gunicorn with the same worker and thread settings twice per round: once
serving a no-op Flask endpoint (bench/noop_app.py: what Flask + gunicorn on
this machine can do at best), once serving the real `/track` on a fresh SQLite
file. Both get the same fixed number of POSTs from one load generator (wrk
when installed, else a Python one). Rounds alternate the two so that a noisy
machine disturbs both alike; the ratio is taken per round, the median printed.
Batch mode (arrays of --batch-size events) also times, in each round, a bare
executemany of the same rows into the same schema: the physical limit.

    .venv/bin/python bench/ingest.py                    # single events, then batches
    .venv/bin/python bench/ingest.py --mode single --rounds 5 --requests 20000

Acknowledged events are checked against stored rows: none may be missing. A
few more rows than acknowledgements can be stored: the requests in flight when
the load generator stopped, committed by the server but never read by wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.settings import load_settings  # noqa: E402
from db import migrate  # noqa: E402
from db.hits import HIT_COLUMNS, _sqlite_ts  # noqa: E402

USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
EVENT = {
    "url": "https://example.com/pricing?utm_source=newsletter",
    "referrer": "https://news.example.org/",
}

# Batch runs send at least this many requests: when the count is reached, the
# requests still in flight (up to --connections of them) have cost the server
# work that no answer counts, and in a short run that skews the rate.
MIN_BATCHES = 1000
# Rows of each round's bare insert (in batches of --batch-size, one transaction each).
BARE_ROWS = 200_000

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = %(ua)s
wrk.body = %(body)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) limit = tonumber(args[1]); marker = args[2]; ok = 0; bad = 0 end
function response(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1 else bad = bad + 1 end
  if ok + bad == limit then
    -- wrk itself runs for its whole -d; tell the driver, which interrupts it.
    local f = io.open(marker, "a"); f:write("done\\n"); f:close()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local good, failed = 0, 0
  for _, t in ipairs(threads) do good = good + t:get("ok"); failed = failed + t:get("bad") end
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", good, failed, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Load:
    ok: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(app: str, database_url: str, port: int, args: argparse.Namespace, log: Path):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        TELEMETRY_DATABASE_URL=database_url,
        TELEMETRY_BIND=f"127.0.0.1:{port}",
        TELEMETRY_WORKERS=str(args.workers),
        TELEMETRY_THREADS=str(args.threads),
        TELEMETRY_MAX_BATCH=str(max(500, args.batch_size)),
        TELEMETRY_MAX_BODY_BYTES=str(4 << 20),
        # Every request comes from one address: limits far above the load keep
        # the cost of checking them in the measurement without refusing anything.
        TELEMETRY_RATELIMIT_CLIENT="1000000000/minute",
        TELEMETRY_RATELIMIT_SITE="1000000000/minute",
    )
    command = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf", app]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if workers_booted(process, args.workers, deadline):
                    return process
                break
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"gunicorn did not start; see {log}")


def workers_booted(process: subprocess.Popen, workers: int, deadline: float) -> bool:
    """Wait until every worker has loaded the app: until they all exist and the
    server has stopped using CPU. The master listens before its workers have
    loaded the app (about a second for /track's, nothing for the no-op), and
    wrk's keep-alive connections stay with whichever worker accepted them:
    load sent earlier lands on the first worker ready and leaves the other idle."""
    master = psutil.Process(process.pid)
    previous = None
    while time.monotonic() < deadline:
        if len(master.children()) == workers:
            used = server_cpu_seconds(process)
            if previous is not None and used - previous < 0.02:
                return True
            previous = used
        time.sleep(0.25)
    return False


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time the gunicorn master and its workers have used so far."""
    master = psutil.Process(process.pid)
    total = 0.0
    for member in (master, *master.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def connection_split(process: subprocess.Popen, port: int) -> str:
    """How many of the load generator's connections each worker holds ("17/15"):
    gunicorn's workers race to accept them and keep them for the whole run, and
    a round where one worker holds more connections than it has threads is slower."""
    counts = []
    for worker in psutil.Process(process.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            counts.append(
                sum(
                    1
                    for c in worker.net_connections("tcp")
                    if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                )
            )
    return "/".join(str(n) for n in sorted(counts, reverse=True))


def events_per_commit(port: int) -> float:
    """Mean events per group commit so far, from the server's own `/metrics`
    (all workers): how many requests the commit delay lets share a transaction."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    name = "telemetry_commit_group_events"
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(name))
    count = float(samples.get(f"{name}_count", 0))
    return float(samples.get(f"{name}_sum", 0)) / count if count else 0.0


def _sample_split(process: subprocess.Popen, port: int, into: dict[str, str]) -> None:
    into["split"] = connection_split(process, port)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def drive_wrk(port: int, body: str, requests: int, args: argparse.Namespace, workdir: Path) -> Load:
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % {"ua": lua_string(USER_AGENT), "body": lua_string(body)})
    threads = 2
    marker = workdir / "wrk-done"
    marker.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{port}/track"
    command = ["wrk", f"-t{threads}", f"-c{args.connections}", "-d600s", "--latency",
               "-s", str(script), url, "--", str(requests // threads), str(marker)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    while process.poll() is None:
        if marker.exists() and marker.read_text().count("done") == threads:
            process.send_signal(signal.SIGINT)  # wrk then prints its summary and exits
            break
        time.sleep(0.005)
    output = process.communicate()[0]
    line = next(line for line in output.splitlines() if line.startswith("RESULT"))
    ok, failed, micros, p50, p99 = (int(x) for x in line.split()[1:])
    return Load(ok, failed, micros / 1e6, p50 / 1000, p99 / 1000)


def drive_python(
    port: int, body: str, requests: int, args: argparse.Namespace, _workdir: Path
) -> Load:
    """A fallback load generator: one keep-alive connection per thread."""
    per_connection = requests // args.connections
    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    payload = body.encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        mine, ok, failed = [], 0, 0
        for _ in range(per_connection):
            started = time.perf_counter()
            connection.request("POST", "/track", payload, headers)
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if 200 <= response.status < 300:
                ok += 1
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            counts["ok"] += ok
            counts["failed"] += failed

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(args.connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return Load(counts["ok"], counts["failed"], seconds, quantiles[49] * 1000, quantiles[98] * 1000)


def stored_rows(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM hits").fetchone()[0])


def fresh_database(workdir: Path) -> tuple[Path, str]:
    path = workdir / "bench.db"
    for suffix in ("", "-wal", "-shm", "-writelock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return path, url


def bare_insert_rate(workdir: Path, batch_size: int, total: int) -> float:
    """The physical limit: executemany of the same rows into the same schema and
    indexes, one transaction per batch, no HTTP and no Python around it."""
    path, _ = fresh_database(workdir)
    now = datetime.now(UTC)
    row = (_sqlite_ts(now), "example.com", "/pricing?utm_source=newsletter", "https://news.example.org/",
           os.urandom(16), USER_AGENT, "Chrome", "Linux", "desktop", False)  # fmt: skip
    rows = [(*row[:4], os.urandom(16), *row[5:]) for _ in range(batch_size)]
    connection = sqlite3.connect(path, isolation_level=None)
    settings = load_settings()
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
    sql = (
        f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES ({', '.join('?' * len(HIT_COLUMNS))})"
    )
    started = time.perf_counter()
    for _ in range(total // batch_size):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(sql, rows)
        connection.execute("COMMIT")
    seconds = time.perf_counter() - started
    connection.close()
    return (total // batch_size) * batch_size / seconds


def run_mode(mode: str, args: argparse.Namespace, workdir: Path, drive) -> None:
    batch = args.batch_size if mode == "batch" else 1
    body = json.dumps([EVENT] * batch if mode == "batch" else EVENT)
    requests = args.requests if mode == "single" else max(args.requests // batch, MIN_BATCHES)
    ceiling_rates, real_rates, ratios, lost, unanswered = [], [], [], 0, 0
    bare_ratios: list[float] = []  # batch mode: /track events/s over a bare insert's rows/s
    p50s, p99s = [], []
    group_sizes: list[float] = []  # /track: mean events per group commit, per round
    cpu: dict[str, list[float]] = {"ceiling": [], "real": []}
    for round_number in range(1, args.rounds + 1):
        results, splits = {}, {}
        for variant in ("ceiling", "real"):
            path, url = fresh_database(workdir)
            app = "bench.noop_app:app" if variant == "ceiling" else "api:create_app()"
            port = free_port()
            server = start_server(app, url, port, args, workdir / f"{variant}.log")
            # Read once the load generator has connected (it connects first thing).
            sampled: dict[str, str] = {}
            sampler = threading.Timer(0.2, _sample_split, (server, port, sampled))
            try:
                cpu_before = server_cpu_seconds(server)
                sampler.start()
                load = drive(port, body, requests, args, workdir)
                cpu[variant].append((server_cpu_seconds(server) - cpu_before) / requests * 1e6)
                if variant == "real":
                    group_sizes.append(events_per_commit(port))
            finally:
                sampler.cancel()
                sampler.join()
                stop_server(server)
            results[variant] = load
            splits[variant] = sampled.get("split", "?")
            if variant == "real":
                stored = stored_rows(path)
                acknowledged = load.ok * batch
                lost += max(0, acknowledged - stored)
                unanswered += max(0, stored - acknowledged)
                if load.failed:
                    print(f"  round {round_number}: {load.failed} requests failed", file=sys.stderr)
        ceiling, real = results["ceiling"], results["real"]
        ceiling_rates.append(ceiling.rate)
        real_rates.append(real.rate)
        ratios.append(real.rate / ceiling.rate)
        p50s.append((ceiling.p50_ms, real.p50_ms))
        p99s.append((ceiling.p99_ms, real.p99_ms))
        ratio = real.rate / ceiling.rate
        progress = (
            f"ceiling {ceiling.rate:.0f} req/s (connections per worker {splits['ceiling']}), "
            f"/track {real.rate:.0f} req/s ({splits['real']}, "
            f"{group_sizes[-1]:.1f} events a commit), ratio {ratio:.2f}"
        )
        if mode == "batch":
            # In the same round, so that both sides see the same machine.
            bare = bare_insert_rate(workdir, batch, BARE_ROWS)
            bare_ratios.append(real.rate * batch / bare)
            progress += f"; bare insert {bare:.0f} rows/s, ratio {bare_ratios[-1]:.2f}"
        print(f"  round {round_number}: {progress}", file=sys.stderr)

    median = statistics.median
    driver = drive.__name__.removeprefix("drive_")
    print(f"\n## {mode}: {requests} requests of {batch} event(s) per run, {args.rounds} rounds,")
    print(
        f"{args.workers} workers x {args.threads} threads, {args.connections} connections, {driver}"
    )
    print("| | req/s (median) | events/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for label, index, rates in (
        ("no-op Flask (ceiling)", 0, ceiling_rates),
        ("/track", 1, real_rates),
    ):
        rate = median(rates)
        p50 = median(p[index] for p in p50s)
        p99 = median(p[index] for p in p99s)
        print(f"| {label} | {rate:.0f} | {rate * batch:.0f} | {p50:.1f} | {p99:.1f} |")
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"\nratio /track : ceiling = {median(ratios):.2f} (per round: {per_round})")
    ceiling_cpu, real_cpu = median(cpu["ceiling"]), median(cpu["real"])
    print(
        f"server CPU per request: ceiling {ceiling_cpu:.0f} us, /track {real_cpu:.0f} us, "
        f"ratio {ceiling_cpu / real_cpu:.2f} (less disturbed by other load than req/s)"
    )
    print(f"/track events per group commit: {median(group_sizes):.1f}")
    print(
        f"acknowledged events lost: {lost}; stored but unanswered (in flight at stop): {unanswered}"
    )
    if mode == "batch":
        per_round = ", ".join(f"{r:.2f}" for r in bare_ratios)
        print(f"/track batches: {median(real_rates) * batch:.0f} events/s")
        print(
            f"ratio /track batches : bare executemany = {median(bare_ratios):.2f} "
            f"(per round: {per_round})"
        )
    if lost:
        raise SystemExit("FAIL: acknowledged events are missing from the database")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["single", "batch", "both"], default="both")
    parser.add_argument("--requests", type=int, default=20_000, help="single-event POSTs per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=load_settings().worker_processes,
        help="gunicorn workers for both servers (default: the service's own)",
    )
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("TELEMETRY_THREADS", "16"))
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--driver", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python"
    )
    args = parser.parse_args()
    drive = drive_wrk if args.driver == "wrk" else drive_python
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for mode in ("single", "batch") if args.mode == "both" else (args.mode,):
            run_mode(mode, args, Path(tmp), drive)


if __name__ == "__main__":
    main()
