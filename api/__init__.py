"""The Flask application: `create_app()` is what gunicorn and `flask --app api` run."""

from __future__ import annotations

import logging

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from api import maintenance, useragent
from api.errors import register_error_handlers
from api.ingest import Ingestor
from api.settings import Settings, load_settings
from db import make_engine


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from `settings` (default: the TELEMETRY_* environment).

    The database schema must already be migrated (`telemetry db upgrade`;
    `telemetry serve` and `make run` do it before starting workers).
    """
    settings = settings or load_settings()
    # No static route: /t.js is served by the track blueprint with settings filled in.
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # One byte over the limit, so that /track can tell a chunked body that is
    # too large (werkzeug stops reading it there) from one exactly at the limit.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    logging.getLogger("api").setLevel(settings.log_level)
    logging.getLogger("db").setLevel(settings.log_level)

    engine = make_engine(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
    )
    app.extensions["telemetry.settings"] = settings
    app.extensions["telemetry.engine"] = engine
    app.extensions["telemetry.ingestor"] = Ingestor(settings, engine)
    # Rollup refresh and retention in a daemon thread (TELEMETRY_MAINTENANCE_INTERVAL_SECONDS).
    maintenance.start_scheduler(app, settings, engine)
    useragent.warm_up()

    if settings.trusted_proxies:
        # Only the configured number of proxies may name the client; anything a
        # client put further left in X-Forwarded-For is ignored.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies
        )

    from api import headers, health, metrics, ratelimit, reports, stats, track

    app.register_blueprint(track.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(stats.bp)
    app.register_blueprint(reports.bp)
    app.register_blueprint(reports.assets_bp)
    register_error_handlers(app)
    metrics.init_app(app)
    headers.init_app(app, settings)
    # Last: it puts the reports limit on every report blueprint registered above.
    ratelimit.init_app(app, settings)
    return app
