"""Keyed hashing of client addresses. The raw address lives only in memory, for
the duration of one request; what is stored is

    ip_hash = HMAC-SHA256(key of the period, normalised address)[:16]

with one random key per period (a month, a day, or forever). Once a period and
its grace window are over its key is deleted, after which that period's hashes
can no longer be linked to any address, not even by the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from db.salts import delete_expired_salts, get_or_create_salt, held_salts

PERMANENT = "all"


_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def normalise_address(address: str) -> bytes:
    """The packed form of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    inet_pton rather than the ipaddress module: this runs on every request.
    """
    try:
        return socket.inet_pton(socket.AF_INET, address)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        raise ValueError(f"not an IP address: {address[:64]!r}") from None
    return packed[12:] if packed.startswith(_V4_MAPPED_PREFIX) else packed


_FOREVER = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


def period_bounds(mode: str, ts: datetime) -> tuple[str, datetime, datetime | None]:
    """The name of the period holding `ts`, its start, and its end (None: never)."""
    if mode == "none":
        return PERMANENT, _FOREVER[0], None
    if mode == "daily":
        start = datetime(ts.year, ts.month, ts.day, tzinfo=UTC)
        return start.date().isoformat(), start, start + timedelta(days=1)
    start = datetime(ts.year, ts.month, 1, tzinfo=UTC)
    end = datetime(ts.year + ts.month // 12, ts.month % 12 + 1, 1, tzinfo=UTC)
    return f"{ts.year:04d}-{ts.month:02d}", start, end


def _sha256(data: bytes = b"") -> hashlib._Hash:
    # Not hashlib.sha256 itself: given one of OpenSSL's own constructors, hmac
    # keeps an OpenSSL HMAC context, whose copy costs as much as a fresh one.
    return hashlib.sha256(data)


class KeyedHash:
    """`ip_hash` under one period's key, for addresses already through
    `normalise_address`: HMAC-SHA256(key, address)[:16].

    The HMAC state is set up once and copied per address: `hmac.digest` sets
    up a new OpenSSL HMAC context on every call, which inside a /track request
    cost about 12 µs a hash on the benchmark machine (two a request), a copy
    of this state about 3 µs.
    """

    __slots__ = ("_state",)

    def __init__(self, key: bytes) -> None:
        self._state = hmac.new(key, digestmod=_sha256)

    def __call__(self, packed_address: bytes) -> bytes:
        state = self._state.copy()
        state.update(packed_address)
        return state.digest()[:16]


def address_hashes(engine: Engine, address: str) -> dict[str, bytes]:
    """The `ip_hash` of `address` under every key still held, by period: what
    erasure looks for. Periods whose keys are deleted cannot be searched (nor
    linked to the address by anyone)."""
    packed = normalise_address(address)
    return {period: KeyedHash(key)(packed) for period, key in held_salts(engine).items()}


class VisitorHasher:
    """Turns addresses into `ip_hash` values with the key of the event's period."""

    def __init__(self, engine: Engine, mode: str, grace: timedelta) -> None:
        self._engine = engine
        self._mode = mode
        self._grace = grace
        # Each period's key, ready to hash with; dropped with the key.
        self._keys: dict[str, KeyedHash] = {}
        self._expiry: dict[str, datetime | None] = {}
        self._lock = threading.Lock()
        # (start, end, expiry, key) of the period most events fall in, to skip the lookup.
        self._recent: tuple[datetime, datetime, datetime, KeyedHash] | None = None

    def ip_hash(self, address: str, ts: datetime, now: datetime) -> bytes:
        return self.hash_normalised(normalise_address(address), ts, now)

    def hash_normalised(self, packed_address: bytes, ts: datetime, now: datetime) -> bytes:
        """`ip_hash` of an address already through `normalise_address`."""
        return self._key_for(ts, now)(packed_address)

    def _key_for(self, ts: datetime, now: datetime) -> KeyedHash:
        recent = self._recent
        if recent is not None and recent[0] <= ts < recent[1] and now < recent[2]:
            return recent[3]
        period, start, end = period_bounds(self._mode, ts)
        if end is not None and end + self._grace <= now:
            # That period's key is (or is about to be) deleted; never recreate it,
            # which would make a fresh, linkable key for a closed period.
            period, start, end = period_bounds(self._mode, now)
        key = self._keys.get(period)
        if key is not None:
            return key
        with self._lock:
            if period not in self._keys:
                expires = None if end is None else end + self._grace
                self._keys[period] = KeyedHash(get_or_create_salt(self._engine, period, expires))
                self._expiry[period] = expires
                self._purge_locked(now)
            key = self._keys[period]
            expires = self._expiry[period]
            self._recent = (start, end or _FOREVER[1], expires or _FOREVER[1], key)
            return key

    def purge_expired(self, now: datetime | None = None) -> list[str]:
        """Delete every expired key, from the database and from this process."""
        with self._lock:
            return self._purge_locked(now or datetime.now(UTC))

    def _purge_locked(self, now: datetime) -> list[str]:
        removed = delete_expired_salts(self._engine, now)
        for period, expires in list(self._expiry.items()):
            if expires is not None and expires <= now:
                del self._keys[period], self._expiry[period]
        self._recent = None
        return removed
