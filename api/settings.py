"""Every setting of the service, declared once.

Each setting is read from a ``TELEMETRY_<NAME>`` environment variable, coerced
to its type and checked; an invalid value stops start-up with a message that
names the variable. README.md carries a table of all of them, and a test fails
when one is missing there. Nothing here reads the environment at import time:
``load_settings()`` is called by the app factory and the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

PREFIX = "TELEMETRY_"


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive whole number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _one_of(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def coerce(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return coerce


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _text(raw: str) -> str:
    return raw.strip()


def _timezone(raw: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = raw.strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone such as UTC or Europe/Paris") from None
    return value


def _optional_int(raw: str) -> int | None:
    return _positive_int(raw) if raw.strip() else None


# Raw hits must outlive the aggregates' refresh windows (late events reach 48 h
# back; TimescaleDB's daily refresh policy looks 4 days back), or a refresh would
# recompute kept aggregates from deleted hits.
MIN_RETENTION_DAYS = 7


def _retention_days(raw: str) -> int:
    value = int(raw)
    if value != 0 and value < MIN_RETENTION_DAYS:
        raise ValueError(f"must be 0 (keep forever) or at least {MIN_RETENTION_DAYS}")
    return value


def _rate_limits(raw: str) -> str:
    """A limits-syntax string such as `600/minute;20/second`, or empty for none."""
    value = raw.strip()
    if value:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError("expected limits such as 600/minute or 10/second;500/hour") from None
    return value


def _rate_limit_storage(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("memory://", "redis://", "rediss://", "redis+sentinel://")):
        raise ValueError("expected memory://, redis://, rediss:// or redis+sentinel:// URI")
    return value


def _setting(default: str, coerce: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    """Declare a setting: its default (as the environment would spell it), coercer and help."""
    return field(
        default=coerce(default),
        metadata={"raw_default": default, "coerce": coerce, "help": help, "secret": secret},
    )


@dataclass(frozen=True)
class Settings:
    database_url: str = _setting(
        "sqlite:///./data/telemetry.db",
        _text,
        "SQLAlchemy URL of the database: `sqlite:///path.db` (embedded default) or "
        "`postgresql+psycopg://user:pass@host/db` (PostgreSQL or TimescaleDB).",
        secret=True,
    )
    hash_period: str = _setting(
        "monthly",
        _one_of("monthly", "daily", "none"),
        "How long one IP-hashing key lives: `monthly`, `daily`, or `none` (one permanent key, "
        "fully deterministic hashes). Visitors are exactly countable within one period only.",
    )
    salt_grace_hours: int = _setting(
        "48",
        _non_negative_int,
        "Hours a period's hashing key is kept after the period ends (late events still hash "
        "consistently), after which it is deleted for good.",
    )
    trusted_proxies: int = _setting(
        "0",
        _non_negative_int,
        "Number of reverse proxies in front of the service whose `X-Forwarded-For` entry is "
        "trusted. 0 ignores the header and uses the socket address.",
    )
    max_batch: int = _setting(
        "500", _positive_int, "Most events accepted in one `POST /track` array."
    )
    max_body_bytes: int = _setting(
        "524288", _positive_int, "Largest request body accepted by `/track`, in bytes (413 above)."
    )
    default_site: str = _setting(
        "default",
        _text,
        "Site recorded for an event that names none and has neither a `url` nor an `Origin`.",
    )
    respect_dnt: bool = _setting(
        "false",
        _boolean,
        "When true, the tracking snippet sends nothing from browsers with Do-Not-Track on, "
        "and `/track` drops events that carry `DNT: 1`.",
    )
    query_allowlist: tuple[str, ...] = _setting(
        "utm_source,utm_medium,utm_campaign,utm_term,utm_content,ref",
        _comma_list,
        "Query-string parameters kept in stored paths (comma-separated); all others are dropped.",
    )
    sqlite_synchronous: str = _setting(
        "NORMAL",
        _one_of("OFF", "NORMAL", "FULL", "EXTRA", upper=True),
        "SQLite `PRAGMA synchronous` level. NORMAL in WAL mode survives process crashes; "
        "FULL also survives power loss at some cost in speed.",
    )
    sqlite_busy_timeout_ms: int = _setting(
        "5000",
        _positive_int,
        "How long a SQLite connection waits for another writer before giving up (503).",
    )
    commit_max_events: int = _setting(
        "2000",
        _positive_int,
        "Most events one group commit writes in a transaction.",
    )
    commit_delay_ms: float = _setting(
        "1",
        _non_negative_float,
        "Milliseconds a group commit waits for more requests to join it before it writes. "
        "The pause lets the worker's other threads reach the queue: under load a commit "
        "then carries several events instead of 2, and the write lock that workers take "
        "turns on stops being the bottleneck. 0 writes as soon as the previous commit ends.",
    )
    chunk_interval_hours: int = _setting(
        "24",
        _positive_int,
        "TimescaleDB only: hours of hits per hypertable chunk, applied when the migration "
        "makes `hits` a hypertable (later: `SELECT set_chunk_time_interval('hits', ...)`).",
    )
    retention_days: int = _setting(
        "0",
        _retention_days,
        "Days raw hits (and their idempotency keys) are kept; 0 keeps them forever, else at "
        "least 7. Dashboards read the aggregates, which outlive the raw hits; hits a monthly "
        "rollup still has to read are kept until it has (README, Retention).",
    )
    aggregate_retention_days: int = _setting(
        "0",
        _retention_days,
        "Days the aggregates (`hits_hourly`, `visitors_daily`, ...) are kept; 0 keeps them "
        "forever, else at least 7.",
    )
    compress_after_days: int = _setting(
        "0",
        _non_negative_int,
        "TimescaleDB with the full license only: compress (columnstore) hit chunks older than "
        "this many days; 0 is off. Reported as unavailable on the Apache-only build.",
    )
    maintenance_interval_seconds: float = _setting(
        "60",
        _non_negative_float,
        "Seconds between runs of the in-process maintenance (rollup refresh, retention), one "
        "run at a time across workers; 0 turns it off (then run `telemetry rollup refresh` "
        "and `telemetry retention apply` from cron).",
    )
    bind: str = _setting("127.0.0.1:8000", _text, "Address gunicorn listens on (`HOST:PORT`).")
    workers: int | None = _setting(
        "",
        _optional_int,
        "gunicorn worker processes; empty means one per CPU core (on SQLite too: one "
        "process's threads share one interpreter lock, and two workers took 2.2x the "
        "requests of one on 2 cores; bench/ingest.py).",
    )
    threads: int = _setting("16", _positive_int, "Threads per gunicorn worker (gthread).")
    graceful_timeout: int = _setting(
        "30",
        _positive_int,
        "Seconds gunicorn gives a stopping worker to finish its requests in flight (and so "
        "commit every event it acknowledges) before killing it.",
    )
    ratelimit_storage: str = _setting(
        "memory://",
        _rate_limit_storage,
        "Where rate-limit counters live: `memory://` (per process), `redis://host:6379/0`, or "
        "`redis+sentinel://host:26379/mymaster` (Redis Sentinel). Redis makes limits hold "
        "across workers and hosts.",
        secret=True,
    )
    ratelimit_key_prefix: str = _setting(
        "telemetry",
        _text,
        "Prefix of the rate-limit keys in the storage (separates deployments sharing a Redis).",
    )
    ratelimit_client: str = _setting(
        "600/minute",
        _rate_limits,
        "Requests one client (by hashed address) may send to `/track` (limits syntax, e.g. "
        "`600/minute;20/second`; empty: no limit).",
    )
    ratelimit_site: str = _setting(
        "60000/minute",
        _rate_limits,
        "Events one site may send to `/track`, all clients together (empty: no limit).",
    )
    ratelimit_reports: str = _setting(
        "60/minute",
        _rate_limits,
        "Requests one client may send to the report and stats endpoints (empty: no limit).",
    )
    ratelimit_fail_closed: bool = _setting(
        "false",
        _boolean,
        "What happens when the rate-limit storage is unreachable: false lets requests through "
        "(fail-open), true answers 503. Either way it is counted and logged.",
    )
    cors_origins: tuple[str, ...] = _setting(
        "*",
        _comma_list,
        "Origins allowed to send `/track` from browsers: comma-separated "
        "(`https://a.example,https://b.example`) or `*` for any. Never with credentials.",
    )
    behind_tls: bool = _setting(
        "false",
        _boolean,
        "The service is reached over HTTPS (directly or through a TLS proxy): send HSTS.",
    )
    metrics_token: str = _setting(
        "",
        _text,
        "Bearer token `/metrics` requires (`Authorization: Bearer ...`); empty: no token.",
        secret=True,
    )
    timezone: str = _setting(
        "UTC",
        _timezone,
        "Time zone of reports and `/api/stats` (IANA name, e.g. `Europe/Paris`): days, hours, "
        "months and the hour x weekday matrix are local. Unique visitors stay per UTC day.",
    )
    # The default is analytics.baseline.DEFAULT_MARGIN (tests/test_analytics_baseline.py
    # checks they agree; importing it here would load pandas into every command).
    anomaly_margin: float = _setting(
        "0.8",
        _non_negative_float,
        "How far outside the 30-day baseline band an hour must be to count as an anomaly, in "
        "band widths (`analytics/baseline.py`; the default is tuned by `bench/anomaly.py`).",
    )
    reports_token: str = _setting(
        "",
        _text,
        "Token that opens `/reports` and `/api/stats` (`Authorization: Bearer ...` or "
        "`?token=...`). With neither it nor the reports user set, those pages answer 401.",
        secret=True,
    )
    reports_user: str = _setting(
        "",
        _text,
        "User name that opens `/reports` and `/api/stats` with HTTP basic auth "
        "(with `TELEMETRY_REPORTS_PASSWORD`).",
    )
    reports_password: str = _setting(
        "",
        _text,
        "Password of `TELEMETRY_REPORTS_USER`.",
        secret=True,
    )
    log_level: str = _setting(
        "INFO",
        _one_of("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        "Log level of the service.",
    )

    @property
    def worker_processes(self) -> int:
        """TELEMETRY_WORKERS, or its default (see its help)."""
        return self.workers or os.cpu_count() or 1

    def masked(self) -> dict[str, str]:
        """The effective settings as the environment would spell them, secrets hidden."""
        shown = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                text = ",".join(value)
            elif value is None:
                text = ""
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            if f.metadata["secret"]:
                text = mask_secret(text)
            shown[env_name(f.name)] = text
        return shown


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def mask_secret(text: str) -> str:
    """Hide the password of a URL (or a whole secret that is not a URL)."""
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if "@" in rest:
            credentials, host = rest.rsplit("@", 1)
            user = credentials.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}" if ":" in credentials else text
        return text
    return "***" if text else ""


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting, in declaration order."""
    return [
        (env_name(f.name), f.metadata["raw_default"], f.metadata["help"]) for f in fields(Settings)
    ]


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from the environment; keyword overrides (already typed) win."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = env_name(f.name)
        if f.name in overrides:
            values[f.name] = overrides.pop(f.name)
        elif name in environ:
            try:
                values[f.name] = f.metadata["coerce"](environ[name])
            except ValueError as exc:
                raise SettingsError(f"{name}={environ[name]!r} is invalid: {exc}") from None
    if overrides:
        raise SettingsError(f"unknown settings: {', '.join(sorted(overrides))}")
    return Settings(**values)
