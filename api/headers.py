"""Browser-facing policy: CORS for /track and security headers on every answer."""

from __future__ import annotations

from flask import Flask, Response, request
from flask_cors import CORS

from api.ratelimit import REPORT_BLUEPRINTS
from api.settings import Settings

# Nothing this API answers (JSON, a GIF, a script) needs to load anything.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# Report pages: own scripts, styles and images only (no inline script, no
# third-party origin), no plugins, no framing, forms only back to us. Inline
# styles are allowed: plotly.js sets style attributes and fills <style>
# elements as it draws, and draws broken without them. Styles cannot run code.
REPORT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
HSTS = "max-age=31536000; includeSubDomains"


def init_app(app: Flask, settings: Settings) -> None:
    # An empty setting allows no other origin.
    origins = "*" if "*" in settings.cors_origins else list(settings.cors_origins)
    # Only /track is called cross-origin (the snippet and server-side senders);
    # t.js is loaded by a <script> tag, which needs no CORS. No credentials:
    # the snippet sends none and nothing here reads cookies.
    CORS(
        app,
        resources={r"/track": {"origins": origins}},
        methods=["GET", "POST"],
        allow_headers=["Content-Type"],
        supports_credentials=False,
        # "*" itself rather than the caller's origin echoed back.
        send_wildcard=origins == "*",
        max_age=86400,
        vary_header=True,
    )

    common = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}
    if settings.behind_tls:
        common["Strict-Transport-Security"] = HSTS
    common["Referrer-Policy"] = "no-referrer"
    api_headers = [*common.items(), ("Content-Security-Policy", API_CSP)]
    report_headers = [*common.items(), ("Content-Security-Policy", REPORT_CSP)]

    @app.after_request
    def _security_headers(response: Response) -> Response:
        # extend, not set: no view sets these, and set() scans every header for each.
        report = request.blueprint in REPORT_BLUEPRINTS
        response.headers.extend(report_headers if report else api_headers)
        return response
