"""Rate limits on real storages: the process's memory, the local Redis, Redis
through a real Sentinel, and a Redis that dies mid-run."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import redis
from limits.storage import MemoryStorage
from prometheus_client import REGISTRY
from services import SHARED_REDIS, RedisSentinel, RedisServer, answers

from api.ratelimit import StorageOutage

TRACK = {"url": "https://example.com/pricing"}
CLIENT = "203.0.113.9"
# A database number of its own on the shared Redis, plus a key prefix per test.
REDIS_DB = 13


def post(client, address: str = CLIENT, body: object = TRACK):
    return client.post("/track", json=body, environ_base={"REMOTE_ADDR": address})


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """The Redis on 127.0.0.1:6379, or one of our own when none runs there."""
    if answers(*SHARED_REDIS):
        yield SHARED_REDIS
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.host, server.port
    server.stop()


@pytest.fixture
def key_prefix(shared_redis) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"test{os.getpid()}x{os.urandom(4).hex()}"
    yield prefix
    for db in (0, REDIS_DB):
        connection = redis.Redis(*shared_redis, db=db)
        keys = list(connection.scan_iter(f"*{prefix}*"))
        if keys:
            connection.delete(*keys)


def redis_keys(address: tuple[str, int], prefix: str, db: int = REDIS_DB) -> list[bytes]:
    return sorted(redis.Redis(*address, db=db).scan_iter(f"*{prefix}*"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_client_limit_answers_429_with_retry_after_in_our_shape(database_url, make_app):
    client = make_app(ratelimit_client="3/minute").test_client()

    statuses = [post(client).status_code for _ in range(5)]
    refused = post(client)
    other_client = post(client, address="198.51.100.4")

    assert statuses == [202, 202, 202, 429, 429]
    assert refused.status_code == 429
    assert refused.json["error"] == "rate_limited"
    assert "3 per 1 minute" in refused.json["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert other_client.status_code == 202  # each client has its own budget


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_site_limit_counts_events_of_all_clients(database_url, make_app, count_rows):
    client = make_app(ratelimit_client="", ratelimit_site="5/minute").test_client()
    batch = [{"url": "https://a.example/1"}] * 3 + [{"url": "https://b.example/1"}]

    first = post(client, "198.51.100.1", batch)  # a.example: 3, b.example: 1
    second = post(client, "198.51.100.2", [{"url": "https://a.example/2"}] * 2)  # a: 5
    over = post(client, "198.51.100.3", {"url": "https://a.example/3"})  # a: 6
    other_site = post(client, "198.51.100.3", {"url": "https://b.example/2"})

    assert [first.status_code, second.status_code] == [202, 202]
    assert over.status_code == 429 and "'a.example'" in over.json["detail"]
    assert "Retry-After" in over.headers
    assert other_site.status_code == 202
    assert count_rows("hits") == 7  # the refused event was not stored


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_preflight_health_and_snippet_are_not_limited(database_url, make_app):
    client = make_app(ratelimit_client="1/minute").test_client()
    preflight = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}

    answers_ = [client.options("/track", headers=preflight).status_code for _ in range(3)]
    answers_ += [client.get(path).status_code for path in ("/healthz", "/t.js") for _ in range(3)]

    assert set(answers_) == {200}
    assert post(client).status_code == 202  # the budget is still whole


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_report_blueprints_get_the_stricter_shared_limit(database_url, make_app):
    app = make_app(ratelimit_reports="2/minute", ratelimit_client="100/minute", reports_token="t")
    client = app.test_client()
    bearer = {"Authorization": "Bearer t"}
    before = counter("telemetry_rate_limited_requests_total", scope="reports")

    # A bad month or date is answered without computing a report, and counts all the same.
    paths = ("/reports?month=bad", "/api/stats?from=bad", "/reports?month=bad")
    statuses = [client.get(path, headers=bearer).status_code for path in paths]
    refused = client.get("/api/stats?from=bad", headers=bearer)
    asset = client.get("/reports/assets/report.js")

    assert statuses == [400, 400, 429]  # one budget for /reports and /api/stats together
    assert refused.json["error"] == "rate_limited" and "Retry-After" in refused.headers
    assert "script-src 'self'" in refused.headers["Content-Security-Policy"]
    assert counter("telemetry_rate_limited_requests_total", scope="reports") == before + 2
    assert asset.status_code == 200  # the page's script holds no data and has no limit


def test_memory_storage_override_still_matches_limits():
    """api.ratelimit.SweepingMemoryStorage replaces this private method of limits."""
    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    assert hasattr(MemoryStorage, "_MemoryStorage__expire_events")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_limit_is_shared_by_two_app_instances_through_redis(
    database_url, make_app, shared_redis, key_prefix
):
    settings = dict(
        ratelimit_storage=f"redis://{shared_redis[0]}:{shared_redis[1]}/{REDIS_DB}",
        ratelimit_key_prefix=key_prefix,
        ratelimit_client="10/minute",
    )
    # Two apps, as two hosts would run them: separate processes' worth of state.
    first, second = make_app(**settings).test_client(), make_app(**settings).test_client()

    statuses = [post(client).status_code for _ in range(8) for client in (first, second)]

    assert statuses.count(202) == 10
    assert statuses.count(429) == 6
    keys = redis_keys(shared_redis, key_prefix)
    assert keys, "no limit key in Redis"
    for key in keys:  # keyed by a hash, never by the address
        assert CLIENT.encode() not in key


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_limit_through_a_real_redis_sentinel(
    database_url, make_app, tmp_path, shared_redis, key_prefix
):
    sentinel = RedisSentinel(tmp_path, master=shared_redis)
    try:
        client = make_app(
            ratelimit_storage=sentinel.url(),
            ratelimit_key_prefix=key_prefix,
            ratelimit_client="4/minute",
        ).test_client()

        statuses = [post(client).status_code for _ in range(6)]

        assert statuses == [202] * 4 + [429] * 2
        # The counters are on the master the sentinel named: the shared Redis, db 0.
        assert redis_keys(shared_redis, key_prefix, db=0)
    finally:
        sentinel.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_redis_dying_mid_run(database_url, make_app, tmp_path, caplog, count_rows, fail_closed):
    server = RedisServer(tmp_path)
    client = make_app(
        ratelimit_storage=server.url(),
        ratelimit_client="3/minute",
        ratelimit_fail_closed=fail_closed,
    ).test_client()
    outcome = "refused" if fail_closed else "allowed"
    errors_before = counter("telemetry_ratelimit_storage_errors_total", outcome=outcome)

    while_up = [post(client).status_code for _ in range(4)]
    server.stop()
    with caplog.at_level(logging.ERROR, logger="api.ratelimit"):
        while_down = [post(client) for _ in range(5)]

    assert while_up == [202, 202, 202, 429]
    statuses = [response.status_code for response in while_down]
    if fail_closed:
        assert statuses == [503] * 5
        assert {r.json["error"] for r in while_down} == {"unavailable"}
        assert all("Retry-After" in r.headers for r in while_down)
        assert count_rows("hits") == 3
    else:
        # No limit can be counted: everything goes through, and is stored.
        assert statuses == [202] * 5
        assert count_rows("hits") == 8
    assert counter("telemetry_ratelimit_storage_errors_total", outcome=outcome) == (
        errors_before + 5
    )
    outage_lines = [r for r in caplog.records if "storage unreachable" in r.getMessage()]
    assert len(outage_lines) == 1  # once per interval, not once per request
    assert "Traceback" not in caplog.text


def test_outage_log_reports_the_count_since_the_last_line(caplog):
    outage = StorageOutage(fail_closed=False)
    outage.LOG_INTERVAL = 0.0  # every failure is due

    with caplog.at_level(logging.ERROR, logger="api.ratelimit"):
        outage.failed(ConnectionError("refused"))
        outage.failed(ConnectionError("refused"))

    assert [r.getMessage().count("1 request(s)") for r in caplog.records] == [1, 1]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_no_address_reaches_redis_in_keys_or_values(database_url, tmp_path, make_app):
    server = RedisServer(tmp_path)
    try:
        client = make_app(ratelimit_storage=server.url()).test_client()
        addresses = ["203.0.113.50", "2001:db8::77", "::ffff:198.51.100.77"]
        for address in addresses:
            assert post(client, address).status_code == 202
        connection = redis.Redis(server.host, server.port)
        dump = b"".join(
            key + str(connection.get(key)).encode() for key in connection.scan_iter("*")
        )
        assert dump
        for address in [*addresses, "198.51.100.77"]:
            assert address.encode() not in dump
    finally:
        server.stop()
