"""The ingestion endpoints: `POST /track` (JSON and beacons), the `GET /track`
pixel and the `/t.js` snippet."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from functools import cache, lru_cache
from importlib.resources import files
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Request, Response, current_app, g, request

from api import metrics
from api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from api.events import Event, RequestContext
from api.ingest import Ingestor, utcnow
from api.settings import Settings

bp = Blueprint("track", __name__)

# A transparent 1x1 GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0", "Pragma": "no-cache"}


def _settings() -> Settings:
    return current_app.extensions["telemetry.settings"]


# The view and its helpers take the request and the app as plain objects: each
# use of flask's `request` and `current_app` proxies looks the object up again,
# and a /track request would otherwise make some thirty such lookups.


@lru_cache(maxsize=1024)
def _host_of(origin: str) -> str | None:
    """The host of an Origin header; remembered, as a site's pages send the same one."""
    try:
        return urlsplit(origin).hostname
    except ValueError:  # a malformed header only loses its default site
        return None


def _context(req: Request, settings: Settings, ingestor: Ingestor) -> RequestContext:
    environ = req.environ
    origin = environ.get("HTTP_ORIGIN")
    return RequestContext(
        now=utcnow(),
        user_agent=environ.get("HTTP_USER_AGENT"),
        origin_host=_host_of(origin) if origin else None,
        default_site=settings.default_site,
        query_allowlist=ingestor.query_allowlist,
    )


def _dnt(req: Request, settings: Settings) -> bool:
    return settings.respect_dnt and req.headers.get("DNT") == "1"


@bp.post("/track")
def track() -> Response:
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    settings: Settings = app.extensions["telemetry.settings"]
    app.extensions["telemetry.ratelimits"].check_client(req)
    # Read off the WSGI environ: werkzeug's parsed properties and its input
    # stream wrapper cost more than the rest of the body's parsing.
    mimetype = req.environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    if mimetype not in ("application/json", "text/plain"):
        raise UnsupportedMediaType(
            "send application/json (or text/plain carrying JSON, as sendBeacon does)"
        )
    body = _body(req, settings.max_body_bytes)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise BadRequest("the batch is empty")
    g.telemetry_events = len(items)  # for the rejected-events metric (api/errors.py)
    if len(items) > settings.max_batch:
        raise PayloadTooLarge(f"a batch holds at most {settings.max_batch} events")
    ingestor: Ingestor = app.extensions["telemetry.ingestor"]
    context = _context(req, settings, ingestor)
    events = ingestor.validate(items, context)
    beacon = mimetype == "text/plain"
    if _dnt(req, settings):
        metrics.events_rejected("do_not_track", len(events))
        return Response(status=204) if beacon else _accepted(0)
    _store(req, app, ingestor, events, context.now)
    return Response(status=204) if beacon else _accepted(len(events))


def _body(req: Request, limit: int) -> bytes:
    """The request body; PayloadTooLarge when it is over `limit` bytes."""
    environ = req.environ
    declared = environ.get("CONTENT_LENGTH", "")
    if declared.isdigit() and "HTTP_TRANSFER_ENCODING" not in environ:
        length = int(declared)
        if length > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
        return environ["wsgi.input"].read(length)
    # No length given (chunked): werkzeug cuts the body off one byte past the
    # limit (MAX_CONTENT_LENGTH, set by create_app), so it is caught here.
    body = req.get_data(cache=False)
    if len(body) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    return body


def _store(
    req: Request, app: Flask, ingestor: Ingestor, events: list[Event], now: datetime
) -> None:
    app.extensions["telemetry.ratelimits"].check_sites(req, events)
    # ProxyFix (installed by the app factory when proxies are trusted) has already
    # put the right X-Forwarded-For entry here; the raw value goes no further.
    ingestor.record(events, req.remote_addr or "0.0.0.0", now)
    metrics.request_accepted(len(events))


def _accepted(count: int) -> Response:
    # Built by hand: jsonify costs more than the rest of a small request's answer.
    return Response(b'{"accepted":%d}' % count, status=202, mimetype="application/json")


@bp.get("/track")
def pixel() -> Response:
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    settings: Settings = app.extensions["telemetry.settings"]
    app.extensions["telemetry.ratelimits"].check_client(req)
    params = req.args
    if "p" not in params:
        raise BadRequest("p (the page path) is required", field="p")
    item: dict[str, object] = {"path": params["p"]}
    if params.get("r"):
        item["referrer"] = params["r"]
    if params.get("s"):
        item["site"] = params["s"]
    ingestor: Ingestor = app.extensions["telemetry.ingestor"]
    context = _context(req, settings, ingestor)
    events = ingestor.validate([item], context)
    if _dnt(req, settings):
        metrics.events_rejected("do_not_track")
    else:
        _store(req, app, ingestor, events, context.now)
    return Response(PIXEL, mimetype="image/gif", headers=NO_CACHE)


@cache
def _snippet(respect_dnt: bool) -> bytes:
    source = files("api").joinpath("static/t.js").read_text(encoding="utf-8")
    return source.replace("__RESPECT_DNT__", "true" if respect_dnt else "false").encode()


@bp.get("/t.js")
def snippet() -> Response:
    return Response(
        _snippet(_settings().respect_dnt),
        mimetype="application/javascript",
        headers={"Cache-Control": "public, max-age=3600"},
    )
