"""Browser-facing policy: CORS for /track and security headers on every answer."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from flask import Flask, Response
from flask_cors import CORS
from flask_cors.core import ACL_ORIGIN

from api.middleware import OnAnswerStart
from api.ratelimit import REPORT_BLUEPRINTS
from api.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

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
        # A request without Origin is not a cross-origin one and needs no CORS
        # headers (the library would otherwise name one of the allowed origins).
        always_send=False,
        # Error answers get their CORS headers from _BrowserHeaders like any other.
        intercept_exceptions=False,
    )
    common = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY")]
    if settings.behind_tls:
        common.append(("Strict-Transport-Security", HSTS))
    common.append(("Referrer-Policy", "no-referrer"))
    browser_headers = _BrowserHeaders(common, _memoize_cors(app))
    app.wsgi_app = OnAnswerStart(app.wsgi_app, browser_headers)  # type: ignore[method-assign]

    def _report_csp(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = REPORT_CSP
        return response

    for blueprint in REPORT_BLUEPRINTS:
        app.after_request_funcs.setdefault(blueprint, []).append(_report_csp)


class _BrowserHeaders:
    """The CORS and security headers of every answer (an `OnAnswerStart` hook).
    Answers without a Content-Security-Policy of their own (the report pages
    set theirs) get the API's, which lets nothing load."""

    def __init__(
        self,
        common: list[tuple[str, str]],
        cors_headers: Callable[..., tuple[tuple[str, str], ...]],
    ) -> None:
        self._headers = [*common, ("Content-Security-Policy", API_CSP)]
        self._without_csp = common
        self._cors_headers = cors_headers

    def __call__(
        self, environ: WSGIEnvironment, status: str, headers: list[tuple[str, str]]
    ) -> None:
        has_csp = has_cors = False
        for name, _ in headers:
            if name == "Content-Security-Policy":
                has_csp = True
            elif name == ACL_ORIGIN:
                has_cors = True  # a view decided CORS itself
        if not has_cors:
            # Called inside the request context, which the library reads when asked.
            headers.extend(
                self._cors_headers(
                    environ.get("PATH_INFO"),
                    environ.get("REQUEST_METHOD"),
                    environ.get("HTTP_ORIGIN"),
                    environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"),
                    environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"),
                    environ.get("HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK"),
                )
            )
        headers.extend(self._without_csp if has_csp else self._headers)


def _memoize_cors(app: Flask) -> Callable[..., tuple[tuple[str, str], ...]]:
    """Take flask-cors's after-request hook off the app and return its answers,
    remembered per request path (as WSGI gives it), method and the request
    headers it reads.

    The library works out every answer's headers from scratch, which costs as
    much as all the rest of a small /track request's hooks together; yet they
    follow from those few inputs alone, and the same few combinations come
    again and again. The policy stays the library's: each new combination is
    put to it. The cache is bounded, as Origin is the caller's to choose.
    """
    hooks = app.after_request_funcs[None]
    library_hook = hooks.pop()
    if library_hook.__name__ != "cors_after_request":
        raise RuntimeError(f"expected flask-cors's after-request hook, found {library_hook!r}")

    @lru_cache(maxsize=512)
    def cors_headers(
        path: str,
        method: str,
        origin: str | None,
        request_method: str | None,
        request_headers: str | None,
        private_network: str | None,
    ) -> tuple[tuple[str, str], ...]:
        # The arguments are the cache key; the library reads the same values from
        # the current request, which is one that has them.
        probe = Response()
        probe.headers.clear()
        library_hook(probe)
        return tuple(probe.headers.items())

    return cors_headers
