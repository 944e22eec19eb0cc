"""Concurrent requests are committed exactly once, and the group commit that
makes that cheap behaves under contention and failure."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from api.group_commit import GroupCommitter
from db import make_engine
from db.models import Hit

THREADS = 32
REQUESTS_PER_THREAD = 50


# All 1600 requests come from one address: more than the default per-client limit.
@pytest.mark.parametrize("app", [{"ratelimit_client": ""}], indirect=True)
def test_concurrent_requests_are_each_committed_exactly_once(app, database_url):
    start = threading.Barrier(THREADS)

    def send(thread: int) -> list[int]:
        client = app.test_client()  # one client per thread, one app for all
        start.wait()
        return [
            client.post(
                "/track", json={"path": f"/t/{thread}/{n}", "event_id": f"t{thread}-{n}"}
            ).status_code
            for n in range(REQUESTS_PER_THREAD)
        ]

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = [s for batch in pool.map(send, range(THREADS)) for s in batch]

    assert Counter(statuses) == {202: THREADS * REQUESTS_PER_THREAD}
    engine = make_engine(database_url)
    with engine.connect() as connection:
        paths = connection.scalars(sa.select(Hit.path)).all()
        seen = connection.scalar(sa.text("SELECT count(DISTINCT event_id) FROM seen_events"))
    engine.dispose()
    assert len(paths) == THREADS * REQUESTS_PER_THREAD
    assert len(set(paths)) == THREADS * REQUESTS_PER_THREAD
    assert seen == THREADS * REQUESTS_PER_THREAD


def test_concurrent_retries_of_one_event_are_stored_once(app, count_rows):
    start = threading.Barrier(8)

    def send(_: int) -> int:
        client = app.test_client()
        start.wait()
        return client.post("/track", json={"path": "/retry", "event_id": "same"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(send, range(8))) == {202}
    assert count_rows("hits") == 1


class RecordingWriter:
    """A `write` for GroupCommitter that records each group it commits."""

    def __init__(self, seconds_per_group: float = 0.0) -> None:
        self.groups: list[list[object]] = []
        self.seconds = seconds_per_group
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, batches) -> None:
        items = [item for batch in batches for item in batch]
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.seconds)
        with self._lock:
            self.active -= 1
            self.groups.append(list(items))


@pytest.mark.parametrize("max_items", [2000, 7])
def test_group_commit_commits_every_item_once_in_shared_groups(max_items):
    writer = RecordingWriter(seconds_per_group=0.001)
    committer = GroupCommitter(writer, max_items=max_items)
    threads, per_thread = 16, 40
    start = threading.Barrier(threads)

    def work(thread: int) -> None:
        start.wait()
        for n in range(per_thread):
            committer.commit([(thread, n)])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))

    committed = [item for group in writer.groups for item in group]
    assert sorted(committed) == [(t, n) for t in range(threads) for n in range(per_thread)]
    assert max(len(group) for group in writer.groups) > 1  # requests really shared commits
    assert max(len(group) for group in writer.groups) <= max_items
    assert writer.most_active == 1  # one transaction at a time


def test_group_commit_keeps_each_requests_items_together():
    writer = RecordingWriter(seconds_per_group=0.001)
    committer = GroupCommitter(writer, max_items=10)

    def work(thread: int) -> None:
        for n in range(20):
            committer.commit([(thread, n, part) for part in range(3)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))

    for group in writer.groups:
        assert set(Counter((thread, n) for thread, n, _part in group).values()) == {3}


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


class Boom(RuntimeError):
    pass


def test_failed_group_raises_in_every_waiter_and_the_next_group_commits():
    gate = threading.Event()
    committed: list[list[str]] = []
    attempted: list[list[str]] = []

    def write(batches) -> None:
        items = [item for batch in batches for item in batch]
        attempted.append(items)
        if "block" in items:
            assert gate.wait(5)
        if "poison" in items:
            raise Boom("disk on fire")
        committed.append(list(items))

    committer = GroupCommitter(write, max_items=4)
    outcomes: dict[str, object] = {}

    def commit(item: str) -> None:
        try:
            committer.commit([item])
            outcomes[item] = "ok"
        except Boom as exc:
            outcomes[item] = exc

    threads = [threading.Thread(target=commit, args=("block",))]
    threads[0].start()
    wait_until(lambda: attempted == [["block"]])
    # Queue the rest one by one while the first commit is held, so the groups
    # are known: [poison, b1, b2, b3] (max_items=4), then [c1, c2]. The queue is
    # private, but watching it is the only way to know a waiter has arrived.
    for queued, item in enumerate(["poison", "b1", "b2", "b3", "c1", "c2"], start=1):
        thread = threading.Thread(target=commit, args=(item,))
        thread.start()
        threads.append(thread)
        wait_until(lambda n=queued: len(committer._queue) == n)
    gate.set()
    for thread in threads:
        thread.join(5)

    assert attempted == [["block"], ["poison", "b1", "b2", "b3"], ["c1", "c2"]]
    assert committed == [["block"], ["c1", "c2"]]
    errors = {outcomes[item] for item in ("poison", "b1", "b2", "b3")}
    assert len(errors) == 1 and isinstance(errors.pop(), Boom)  # the one error, to each
    assert [outcomes[item] for item in ("block", "c1", "c2")] == ["ok"] * 3


def test_leader_hears_of_its_own_failed_commit_and_the_committer_recovers():
    def write(batches) -> None:
        if ["poison"] in batches:
            raise Boom("no")

    committer = GroupCommitter(write)

    with pytest.raises(Boom):
        committer.commit(["poison"])
    committer.commit(["fine"])  # not left waiting on a leader that gave up


def test_base_exceptions_reach_the_waiters_too():
    def write(items) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GroupCommitter(write).commit(["x"])


def test_commit_delay_lets_later_requests_join_but_a_full_group_does_not_wait():
    writer = RecordingWriter()
    committer = GroupCommitter(writer, max_items=3, delay=0.3)

    first = threading.Thread(target=committer.commit, args=(["a"],))
    first.start()
    time.sleep(0.05)  # inside the first request's wait
    committer.commit(["b"])
    first.join(5)
    assert writer.groups == [["a", "b"]]

    started = time.monotonic()
    committer.commit(["c", "d", "e"])  # the group is full already: written at once
    assert time.monotonic() - started < 0.25
    assert writer.groups[-1] == ["c", "d", "e"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_groups_of_any_size_are_stored_whole_with_few_statement_shapes(database_url):
    # Every distinct INSERT shape stays prepared in SQLite (about 0.9 KB a row),
    # so a worker seeing every group size must not keep one per size.
    from datetime import UTC, datetime

    from db.hits import HitStore, NewHit, insert_sql

    insert_sql.cache_clear()  # shared with the bulk loader, whose shapes are not counted here
    engine = make_engine(database_url)
    store = HitStore(engine)
    now = datetime.now(UTC)
    sizes = [*range(1, 130), 500, 1999, 2000, 2048, 2049, 5000]
    try:
        for size in sizes:
            hit = NewHit(now, f"size-{size}.example", "/", None, bytes(16), "ua",
                         None, None, "desktop", False)  # fmt: skip
            assert store.write([hit] * size) == size
    finally:
        store.close()
    with engine.connect() as connection:
        query = sa.select(Hit.site, sa.func.count()).group_by(Hit.site)
        counts = {site: count for site, count in connection.execute(query)}
    engine.dispose()
    assert counts == {f"size-{size}.example": size for size in sizes}
    assert insert_sql.cache_info().currsize <= 70
