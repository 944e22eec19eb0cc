"""Group commit: the requests in flight in one process share one transaction.

A request hands its hits over and blocks until they are committed, so an
acknowledgement always means "on disk". The first request to arrive while no
commit is running becomes the leader and commits everything queued; requests
arriving meanwhile queue up and are committed together by the next leader,
which is one of them. A leader first waits `delay` for others to join (unless
a full group is already queued). Under load each transaction therefore carries
many requests, and when idle a request commits alone, `delay` later.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Generic, TypeVar

B = TypeVar("B", bound=Sized)


class _Ticket(Generic[B]):
    __slots__ = ("batch", "error", "lead", "wake")

    def __init__(self, batch: B) -> None:
        self.batch = batch
        self.error: BaseException | None = None
        self.lead = False
        # A plain lock as a one-shot signal: cheaper than threading.Event.
        self.wake = threading.Lock()
        self.wake.acquire()


class GroupCommitter(Generic[B]):
    """Commits batches (anything with a length: the items one request brings)."""

    def __init__(
        self,
        write: Callable[[list[B]], object],
        *,
        max_items: int = 2000,
        delay: float = 0.0,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        """`write` stores a group of batches in one transaction (all or nothing);
        a group holds at most `max_items` items unless one batch alone has more.
        `on_commit(items, seconds)` is told of every successful commit."""
        self._write = write
        self._max_items = max_items
        self._delay = delay
        self._on_commit = on_commit
        self._lock = threading.Lock()
        self._queue: deque[_Ticket[B]] = deque()
        self._queued_items = 0
        self._leading = False

    def commit(self, batch: B) -> None:
        """Block until `batch` is committed. Raises the write's error if the
        transaction holding it failed, in which case none of it is stored."""
        ticket = _Ticket(batch)
        with self._lock:
            self._queue.append(ticket)
            self._queued_items += len(batch)
            follower = self._leading
            self._leading = True
        if follower:
            ticket.wake.acquire()
            if not ticket.lead:
                if ticket.error is not None:
                    raise ticket.error
                return
        self._lead(ticket)

    def _lead(self, own: _Ticket[B]) -> None:
        while True:
            # Wait for more to join only while a group has room for them.
            if self._delay and self._queued_items < self._max_items:
                time.sleep(self._delay)
            with self._lock:
                group = self._take_group()
            self._commit_group(group, own)
            with self._lock:
                if own in group:
                    if self._queue:
                        successor = self._queue[0]
                        successor.lead = True
                        successor.wake.release()
                    else:
                        self._leading = False
                    break
        if own.error is not None:
            raise own.error

    def _take_group(self) -> list[_Ticket[B]]:
        group: list[_Ticket[B]] = []
        size = 0
        while self._queue and (not group or size + len(self._queue[0].batch) <= self._max_items):
            ticket = self._queue.popleft()
            group.append(ticket)
            size += len(ticket.batch)
        self._queued_items -= size
        return group

    def _commit_group(self, group: list[_Ticket[B]], leader: _Ticket[B]) -> None:
        batches = [ticket.batch for ticket in group]
        started = time.perf_counter()
        try:
            self._write(batches)
        except BaseException as exc:  # every waiter must hear of it, whatever it is
            for ticket in group:
                ticket.error = exc
        else:
            if self._on_commit is not None:
                items = sum(len(batch) for batch in batches)
                self._on_commit(items, time.perf_counter() - started)
        for ticket in group:
            if ticket is not leader:
                ticket.wake.release()
