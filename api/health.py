"""Liveness, readiness and the API description."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from flask import Blueprint, Response, current_app
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from api.errors import Unavailable
from db import migrate

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive and answering."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, str]:
    """The database is reachable and its schema is the one this code expects."""
    engine: Engine = current_app.extensions["telemetry.engine"]
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = migrate.current_revision(engine)
    except SQLAlchemyError as exc:
        cause = type(getattr(exc, "orig", None) or exc).__name__
        raise Unavailable(f"the database is unreachable ({cause})") from None
    head = migrate.head_revision()
    if revision != head:
        raise Unavailable(f"the schema is at {revision}, not {head}: run `telemetry db upgrade`")
    return {"status": "ready", "schema": revision}


@cache
def openapi_document() -> dict[str, Any]:
    return json.loads(files("api").joinpath("openapi.json").read_text(encoding="utf-8"))


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(
        json.dumps(openapi_document()),
        mimetype="application/json",
        headers={"Cache-Control": "public, max-age=3600"},
    )
