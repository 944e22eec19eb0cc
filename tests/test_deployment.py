"""The production setup: gunicorn with two workers sharing limits through Redis,
/metrics added up across workers and accepted by promtool, and the deployment
files (Prometheus config, docker-compose.yml, Dockerfile) checked by their tools."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from services import SHARED_REDIS, Gunicorn, RedisServer, answers, require_binary

from db import migrate

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ADDRESS = "127.0.0.78"  # every request of the test comes from here


def send(server: Gunicorn, method: str, path: str, body: bytes | None = None, headers=None):
    connection = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=10, source_address=(CLIENT_ADDRESS, 0)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def hammer(server: Gunicorn, requests: int) -> list[int]:
    body = json.dumps({"url": "https://example.com/x"}).encode()
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(lambda _: send(server, "POST", "/track", body, headers)[0], range(requests))
        )


@pytest.fixture
def redis_for_test(tmp_path):
    """The shared Redis on 6379 (database 12, emptied), or one of our own."""
    if answers(*SHARED_REDIS):
        connection = redis.Redis(*SHARED_REDIS, db=12)
        connection.flushdb()
        yield f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/12", connection
        connection.flushdb()
        return
    server = RedisServer(tmp_path)
    yield server.url(12), redis.Redis(server.host, server.port, db=12)
    server.stop()


def start(tmp_path: Path, **settings: str) -> Gunicorn:
    database = tmp_path / "t.db"
    if not database.exists():
        migrate.upgrade(f"sqlite:///{database}")
    server = Gunicorn(tmp_path, database, TELEMETRY_WORKERS="2", TELEMETRY_THREADS="4", **settings)
    try:
        server.wait_until_ready()
    except BaseException:
        server.stop()
        raise
    return server


def metric_lines(text: str, name: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name)
    }


@pytest.mark.slow
def test_two_workers_share_the_limit_through_redis(tmp_path, redis_for_test):
    url, connection = redis_for_test
    server = start(
        tmp_path,
        TELEMETRY_RATELIMIT_STORAGE=url,
        TELEMETRY_RATELIMIT_CLIENT="25/minute",
        TELEMETRY_METRICS_TOKEN="s3cret",
    )
    try:
        statuses = hammer(server, 80)
        status, body, _ = send(
            server, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"}
        )
        unauthorised = send(server, "GET", "/metrics")[0]
        workers = metric_lines(body.decode(), 'telemetry_processes{role="worker"}')
    finally:
        assert server.stop() == 0

    assert statuses.count(202) == 25  # exactly the limit, though two processes served them
    assert statuses.count(429) == 55
    assert (status, unauthorised) == (200, 401)
    assert list(workers.values()) == [2]
    text = body.decode()
    # Both workers' requests, added up by the multiprocess collector.
    requests = metric_lines(text, "telemetry_http_requests_total")
    assert requests['telemetry_http_requests_total{endpoint="track.track",status="202"}'] == 25
    assert requests['telemetry_http_requests_total{endpoint="track.track",status="429"}'] == 55
    assert metric_lines(text, "telemetry_events_accepted_total") == {
        "telemetry_events_accepted_total": 25
    }
    assert metric_lines(text, 'telemetry_rate_limited_requests_total{scope="client"}')
    keys = b"".join(connection.scan_iter("*"))
    assert keys and CLIENT_ADDRESS.encode() not in keys
    assert CLIENT_ADDRESS not in text


@pytest.mark.slow
def test_memory_storage_gives_each_worker_its_own_budget(tmp_path):
    """The contrast: without Redis two workers let through up to twice the limit."""
    server = start(tmp_path, TELEMETRY_RATELIMIT_CLIENT="25/minute")
    try:
        statuses = hammer(server, 80)
    finally:
        assert server.stop() == 0

    assert 25 <= statuses.count(202) <= 50


@pytest.mark.slow
def test_metrics_after_real_traffic_pass_promtool(tmp_path):
    promtool = require_binary("promtool")
    server = start(tmp_path, TELEMETRY_RATELIMIT_SITE="15/minute")
    try:
        hammer(server, 40)  # accepted, then the site limit (at most 15 per worker)
        send(server, "POST", "/track", b"{", {"Content-Type": "application/json"})
        send(server, "POST", "/track", b"[]", {"Content-Type": "text/csv"})
        send(server, "GET", "/nowhere")
        body = send(server, "GET", "/metrics")[1]
    finally:
        server.stop()

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    text = body.decode()
    for name in (
        "telemetry_http_requests_total",
        'telemetry_events_rejected_total{reason="bad_request"}',
        'telemetry_events_rejected_total{reason="unsupported_media_type"}',
        'telemetry_events_rejected_total{reason="rate_limited"}',
        'telemetry_rate_limited_requests_total{scope="site"}',
        "telemetry_batch_events_bucket",
        "telemetry_commit_seconds_bucket",
        "telemetry_commit_group_events_bucket",
        "telemetry_database_errors_total",
        'process_resident_memory_bytes{role="worker"}',
        'telemetry_http_requests_total{endpoint="unmatched",status="404"}',
    ):
        assert name in text, name
    assert "/nowhere" not in text and CLIENT_ADDRESS not in text


def test_prometheus_scrape_config_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    shutil.copy(ROOT / "deploy" / "prometheus.yml", tmp_path / "prometheus.yml")
    # The compose service writes the token file next to the config before starting.
    (tmp_path / "metrics-token").write_text("token")

    checked = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_file_passes_docker_compose_config(tmp_path):
    compose = require_binary("docker-compose")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "POSTGRES_"))}

    checked = subprocess.run(
        [compose, "config"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert checked.returncode == 0, checked.stderr
    resolved = checked.stdout
    for service in ("app:", "timescaledb:", "redis:", "grafana:", "prometheus:"):
        assert f"\n  {service}" in resolved
    assert "timescale/timescaledb" in resolved
    assert "condition: service_healthy" in resolved
    assert "change-me-postgres" in resolved  # secrets came from .env
    assert "/etc/grafana/provisioning" in resolved


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in dockerfile.splitlines() if line[:1].isalpha()]

    assert instructions.count("FROM") >= 2
    assert "COPY --from=build" in dockerfile
    user = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))
    assert "HEALTHCHECK" in instructions
