"""Errors that carry their HTTP status, and the one JSON shape they are sent in:
``{"error": <code>, "detail": <sentence>, ...}``."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from api import metrics
from db import StorageUnavailable


class APIError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status = 401
    code = "unauthorized"


class PayloadTooLarge(APIError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    code = "unsupported_media_type"


class Unavailable(APIError):
    status = 503
    code = "unavailable"
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


def error_response(status: int, code: str, detail: str, **extra: Any) -> Response:
    response = jsonify({"error": code, "detail": detail, **extra})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(error: APIError) -> Response:
        if request.blueprint == "track":
            # As many as the request carried, when the body got that far.
            metrics.events_rejected(error.code, g.get("telemetry_events", 1))
        response = error_response(error.status, error.code, error.detail, **error.extra)
        response.headers.update(error.headers())
        return response

    @app.errorhandler(StorageUnavailable)
    def _storage_unavailable(error: StorageUnavailable) -> Response:
        app.logger.warning("database cannot be written: %s", error)
        metrics.database_error()
        return _api_error(Unavailable("the database cannot be written right now; retry later"))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        # Werkzeug's own errors (404, 405, 413 from MAX_CONTENT_LENGTH) in the same shape.
        code = (error.name or "error").lower().replace(" ", "_")
        if request.blueprint == "track" and error.code != 405:
            metrics.events_rejected(code)
        response = error_response(error.code or 500, code, error.description or "")
        if error.code == 405 and (allowed := error.get_headers()):
            response.headers.extend(h for h in allowed if h[0] == "Allow")
        return response
