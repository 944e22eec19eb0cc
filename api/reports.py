"""GET /reports: the report as an interactive page, so that a site on the SQLite
default with no Grafana still shows its traffic.

    /reports?month=2026-11&site=shop.example           a month (default: this one)
    /reports?month=2026-11&from=2026-11-10&to=2026-11-20   a slice of it (or any range)

The page is the one `telemetry report --format html` writes (analytics/report.py),
with a form for month, range and site, and its script and styles linked from
/reports/assets/ rather than inline: the report CSP (api/headers.py) allows no
inline script. It shows visitor data, so it needs the reports credentials
(api/reports_auth.py); the assets hold none and need none.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from flask import Blueprint, Response, abort, current_app, request, url_for
from sqlalchemy import Engine

from analytics import figures
from analytics.errors import AnalyticsError
from analytics.report import PageControls, asset, render_html
from api.errors import BadRequest, Unavailable
from api.reports_auth import protect
from api.settings import Settings
from db import StorageUnavailable
from db.aggregates import relation
from db.hits import outages_as_unavailable

bp = Blueprint("reports", __name__)
protect(bp)
# Not a report blueprint (api.ratelimit.REPORT_BLUEPRINTS): no credentials, no
# reports rate limit for plotly.js and friends, which every page view loads.
assets_bp = Blueprint("report_assets", __name__)

ASSETS = "/reports/assets/"
ASSET_TYPES = {
    "plotly.min.js": "text/javascript",
    "report.js": "text/javascript",
    "report.css": "text/css",
}


@bp.get("/reports")
def report_page() -> Response:
    settings: Settings = current_app.extensions["telemetry.settings"]
    engine: Engine = current_app.extensions["telemetry.engine"]
    timezone = settings.timezone
    month = request.args.get("month", "")
    start_text, end_text = request.args.get("from", ""), request.args.get("to", "")
    site = request.args.get("site") or None
    try:
        if not month:
            # The month of the range asked for, else the current one.
            today = datetime.now(figures.zone(timezone)).date()
            month = start_text[:7] if start_text else f"{today:%Y-%m}"
        first, last = figures.month_range(month)
        start = figures.parse_day(start_text) if start_text else first
        end = figures.parse_day(end_text) if end_text else last
        with outages_as_unavailable():
            data = figures.compute(
                engine, site, start, end, timezone, margin=settings.anomaly_margin
            )
            sites = known_sites(engine)
    except AnalyticsError as exc:
        raise BadRequest(str(exc)) from None
    except StorageUnavailable:
        raise Unavailable("the database cannot be read right now; retry later") from None
    controls = PageControls(
        month=month,
        start=start_text,
        end=end_text,
        site=site,
        sites=sites,
        action=url_for("reports.report_page"),
        # A report opened with ?token= keeps it when the form is sent again.
        token=request.args.get("token"),
    )
    page = render_html(data, asset_url=request.script_root + ASSETS, controls=controls)
    return Response(page, mimetype="text/html", headers={"Cache-Control": "no-store"})


@assets_bp.get(f"{ASSETS}<name>")
def report_asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        abort(404)
    return Response(
        asset(name),
        mimetype=ASSET_TYPES[name],
        headers={"Cache-Control": "public, max-age=3600"},
    )


def known_sites(engine: Engine) -> list[str]:
    """Every site that ever had a hit (the site filter's choices)."""
    site_monthly = relation("site_monthly")
    query = sa.select(site_monthly.c.site).distinct().order_by(site_monthly.c.site)
    with engine.connect() as connection:
        return list(connection.scalars(query))
