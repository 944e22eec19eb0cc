"""From validated events to committed hits: hashing, classification, group commit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from api import metrics
from api.errors import BadRequest
from api.events import Event, InvalidEvent, RequestContext, parse_event
from api.group_commit import GroupCommitter
from api.privacy import VisitorHasher, normalise_address
from api.settings import Settings
from api.useragent import classify
from db import HitBatch, HitStore, NewHit, StorageUnavailable

log = logging.getLogger(__name__)


class Ingestor:
    """Everything `/track` needs after HTTP parsing, one per process."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.query_allowlist = frozenset(settings.query_allowlist)
        self.hasher = VisitorHasher(
            engine, settings.hash_period, timedelta(hours=settings.salt_grace_hours)
        )
        self.store = HitStore(
            engine,
            sqlite_synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        )
        self.committer: GroupCommitter[HitBatch] = GroupCommitter(
            self.store.write_batches,
            max_items=settings.commit_max_events,
            delay=settings.commit_delay_ms / 1000,
            on_commit=metrics.observe_commit,
        )

    def validate(self, items: Sequence[object], context: RequestContext) -> list[Event]:
        """Every item as an Event, or BadRequest listing each bad item by index."""
        events: list[Event] = []
        problems: list[tuple[int, InvalidEvent]] = []
        for index, item in enumerate(items):
            try:
                events.append(parse_event(item, context))
            except InvalidEvent as exc:
                problems.append((index, exc))
        if problems:
            if len(items) == 1:
                bad = problems[0][1]
                # An unknown field's name is the caller's: quoted unless it reads as a
                # name, so that an empty or blank one still shows in the detail.
                named = bad.field if bad.field.isidentifier() else repr(bad.field)
                raise BadRequest(f"{named} {bad.reason}", field=bad.field)
            raise BadRequest(
                f"{len(problems)} of {len(items)} events are invalid; none was stored",
                items=[
                    {"index": index, "field": exc.field, "reason": exc.reason}
                    for index, exc in problems
                ],
            )
        return events

    def record(self, events: Sequence[Event], address: str, now: datetime) -> None:
        """Hash, classify and commit; returns once the hits are durable."""
        try:
            packed_address = normalise_address(address)
        except ValueError:
            # Only a forwarded address can be malformed (a trusted proxy that adds a
            # port, or TELEMETRY_TRUSTED_PROXIES set without a proxy in front). A 400,
            # not a 500 whose logged traceback would carry the raw address.
            raise BadRequest("the X-Forwarded-For client address is not an IP address") from None
        hits = []
        last_ts, ip_hash = None, b""
        for event in events:
            # Events of one request share the address and mostly the arrival time
            # too: hash once per distinct timestamp, not once per event.
            if event.ts is not last_ts:
                last_ts, ip_hash = (
                    event.ts,
                    self.hasher.hash_normalised(packed_address, event.ts, now),
                )
            agent = classify(event.user_agent)
            hits.append(
                NewHit(
                    event.ts,
                    event.site,
                    event.path,
                    event.referrer,
                    ip_hash,
                    event.user_agent,
                    agent.browser,
                    agent.os,
                    agent.device,
                    agent.is_bot,
                    event.event_id,
                )
            )
        self.committer.commit(self.store.prepare(hits))

    def warm_up(self) -> None:
        """Load (or make) the current period's hashing key now, before the first
        request: there, its database round trip holds the worker's interpreter
        lock for milliseconds just as the worker's main thread is accepting the
        first burst of connections, and the other worker takes most of them."""
        now = utcnow()
        try:
            self.hasher.hash_normalised(b"", now, now)
        except StorageUnavailable as exc:
            log.warning("hashing key not loaded at start (%s); the first request retries", exc)

    def close(self) -> None:
        self.store.close()


def utcnow() -> datetime:
    return datetime.now(UTC)
