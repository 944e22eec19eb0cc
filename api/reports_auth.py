"""Who may see reports: every page and endpoint that shows visitor data
(`/reports`, `/api/stats`) calls `protect(blueprint)`.

Access is a token (TELEMETRY_REPORTS_TOKEN, as `Authorization: Bearer <token>`
or `?token=<token>`, so a bookmarked report link works) and/or a user name and
password (TELEMETRY_REPORTS_USER and TELEMETRY_REPORTS_PASSWORD, HTTP basic
auth, which makes a browser ask). With none of them set the pages are closed:
reports show visitor data, so they are never open by default.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, current_app, request

from api.errors import Unauthorized
from api.settings import Settings

REALM = "telemetry reports"


class ReportsUnauthorized(Unauthorized):
    """401 with the challenges a client can answer (RFC 9110 requires one)."""

    def __init__(self, detail: str, challenges: list[str]) -> None:
        super().__init__(detail)
        self.challenges = challenges

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": ", ".join(self.challenges)}


def _same(given: str | None, expected: str) -> bool:
    # Constant time, so the response time does not tell how much of a guess was right.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_reports_auth(settings: Settings) -> None:
    """Let the request through, or raise ReportsUnauthorized saying why not."""
    token = settings.reports_token
    basic = bool(settings.reports_user and settings.reports_password)
    challenges = []
    if token:
        challenges.append(f'Bearer realm="{REALM}"')
    if basic:
        challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
    if not challenges:
        raise ReportsUnauthorized(
            "reports are closed: set TELEMETRY_REPORTS_TOKEN, or TELEMETRY_REPORTS_USER and "
            "TELEMETRY_REPORTS_PASSWORD, to open them",
            [f'Bearer realm="{REALM}"'],
        )
    authorization = request.authorization
    if token:
        given = request.args.get("token")
        if authorization is not None and authorization.type == "bearer":
            given = authorization.token
        if _same(given, token):
            return
    if basic and authorization is not None and authorization.type == "basic":
        user_ok = _same(authorization.username, settings.reports_user)
        password_ok = _same(authorization.password, settings.reports_password)
        if user_ok and password_ok:
            return
    raise ReportsUnauthorized("missing or wrong credentials for reports", challenges)


def protect(blueprint: Blueprint) -> None:
    """Require report credentials on every route of `blueprint`."""

    @blueprint.before_request
    def _require_report_access() -> None:
        require_reports_auth(current_app.extensions["telemetry.settings"])
