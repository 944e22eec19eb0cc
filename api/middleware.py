"""`OnAnswerStart`: WSGI middleware that acts on each answer as it starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# (environ, status line such as "202 ACCEPTED", headers), the headers still a
# list the hook may extend.
AnswerHook = Callable[["WSGIEnvironment", str, list[tuple[str, str]]], None]


class OnAnswerStart:
    """Calls `hook(environ, status, headers)` as each answer starts, before the
    server sees its headers.

    Cheaper than a Flask after-request hook on the /track hot path (no hook
    dispatch, headers added with a list extend instead of a checked add each),
    and it also reaches answers to errors no handler caught. Flask starts its
    answers inside the request context, so the hook can read `flask.request`.
    """

    def __init__(self, app: WSGIApplication, hook: AnswerHook) -> None:
        self._app = app
        self._hook = hook

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            self._hook(environ, status, headers)
            return start_response(status, headers, exc_info)

        return self._app(environ, start)
