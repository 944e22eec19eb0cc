"""GET /api/stats: every figure of a report as JSON (analytics.figures.compute).

Behind the report credentials (api/reports_auth.py); the blueprint's name puts
it under TELEMETRY_RATELIMIT_REPORTS (api/ratelimit.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, current_app, request

from analytics.errors import AnalyticsError
from analytics.figures import compute, parse_day, zone
from api.errors import BadRequest, Unavailable
from api.reports_auth import protect
from api.settings import Settings
from db import StorageUnavailable
from db.hits import outages_as_unavailable

bp = Blueprint("stats", __name__)
protect(bp)

# Without ?from=, the last DEFAULT_DAYS days up to today (local).
DEFAULT_DAYS = 30


@bp.get("/api/stats")
def stats() -> dict[str, Any]:
    """?site=S&from=YYYY-MM-DD&to=YYYY-MM-DD (local dates, both included)."""
    settings: Settings = current_app.extensions["telemetry.settings"]
    site = request.args.get("site") or None
    try:
        today = datetime.now(UTC).astimezone(zone(settings.timezone)).date()
        end = parse_day(request.args["to"]) if "to" in request.args else today
        if "from" in request.args:
            start = parse_day(request.args["from"])
        else:
            start = end - timedelta(days=DEFAULT_DAYS - 1)
        with outages_as_unavailable():
            return compute(
                current_app.extensions["telemetry.engine"],
                site,
                start,
                end,
                settings.timezone,
                margin=settings.anomaly_margin,
            )
    except AnalyticsError as exc:
        raise BadRequest(str(exc)) from None
    except StorageUnavailable:
        raise Unavailable("the database cannot be read right now; retry later") from None
