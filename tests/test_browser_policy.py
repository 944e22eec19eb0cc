"""CORS and security headers: with the Flask client, and from a real page on
another origin in headless Chromium."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time

import pytest
from prometheus_client import REGISTRY
from services import free_port, require_binary
from werkzeug.serving import make_server

PREFLIGHT = {
    "Origin": "https://shop.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_preflight_for_post_track_allows_any_origin_by_default(database_url, client):
    response = client.options("/track", headers=PREFLIGHT)

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"].lower() == "content-type"
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_only_listed_origins_are_allowed(database_url, make_app):
    client = make_app(cors_origins=("https://shop.example", "https://blog.example")).test_client()

    allowed = client.options("/track", headers=PREFLIGHT)
    refused = client.options("/track", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    posted = client.post("/track", json={"path": "/"}, headers={"Origin": "https://blog.example"})

    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "Origin" in allowed.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert posted.status_code == 202
    assert posted.headers["Access-Control-Allow-Origin"] == "https://blog.example"
    assert "Access-Control-Allow-Credentials" not in posted.headers


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("origins", [("*",), ("https://shop.example", "https://blog.example")])
def test_a_request_without_origin_gets_no_cors_headers(database_url, make_app, origins):
    client = make_app(cors_origins=origins).test_client()

    response = client.post("/track", json={"path": "/"})

    assert response.status_code == 202
    assert not [name for name, _ in response.headers if name.startswith("Access-Control")]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_repeated_requests_get_the_answer_their_own_origin_calls_for(database_url, make_app):
    # The CORS headers of each kind of request are worked out once and then
    # remembered: what one origin was told must never reach another.
    client = make_app(cors_origins=("https://shop.example", "https://blog.example")).test_client()

    def allowed_origin(origin: str) -> str | None:
        response = client.post("/track", json={"path": "/"}, headers={"Origin": origin})
        return response.headers.get("Access-Control-Allow-Origin")

    for _ in range(3):
        assert allowed_origin("https://shop.example") == "https://shop.example"
        assert allowed_origin("https://evil.example") is None
        assert allowed_origin("https://blog.example") == "https://blog.example"
        # A refusal can be read by the page that sent it, once, not twice over.
        refused = client.post("/track", json={}, headers={"Origin": "https://blog.example"})
        assert refused.status_code == 400
        assert refused.headers.getlist("Access-Control-Allow-Origin") == ["https://blog.example"]
        preflight = client.options("/track", headers=PREFLIGHT)
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert preflight.headers["Access-Control-Max-Age"] == "86400"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("path", ["/track?p=/", "/t.js", "/healthz", "/nowhere", "/metrics"])
def test_security_headers_on_every_answer(database_url, client, path):
    response = client.get(path)

    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hsts_only_behind_tls(database_url, make_app):
    response = make_app(behind_tls=True).test_client().get("/healthz")

    assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_error_no_handler_answers_still_gets_the_headers_and_is_counted(database_url, make_app):
    app = make_app()

    def crash() -> None:
        raise RuntimeError("a bug")

    # A bug in a view (one whose name the request counter already knows).
    app.view_functions["health.healthz"] = crash
    labels = {"endpoint": "health.healthz", "status": "500"}
    before = REGISTRY.get_sample_value("telemetry_http_requests_total", labels) or 0.0

    response = app.test_client().get("/healthz")

    assert response.status_code == 500
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert REGISTRY.get_sample_value("telemetry_http_requests_total", labels) == before + 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_metrics_token_and_bounded_labels(database_url, make_app):
    client = make_app(metrics_token="t0ken").test_client()
    client.post("/track", json={"path": "/a"}, environ_base={"REMOTE_ADDR": "203.0.113.61"})
    client.get("/some/random/path/12345")

    refused = client.get("/metrics")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    shown = client.get("/metrics", headers={"Authorization": "Bearer t0ken"})

    assert (refused.status_code, wrong.status_code, shown.status_code) == (401, 401, 200)
    assert refused.json["error"] == "unauthorized"
    text = shown.get_data(as_text=True)
    assert "telemetry_events_accepted_total" in text
    assert "203.0.113.61" not in text and "/some/random" not in text
    endpoints = {
        sample.labels["endpoint"]
        for family in REGISTRY.collect()
        if family.name == "telemetry_http_requests"
        for sample in family.samples
        if "endpoint" in sample.labels
    }
    assert endpoints <= {"unmatched", "metrics.metrics_endpoint"} | {
        f"{bp}.{name}"
        for bp, name in [
            ("track", "track"),
            ("track", "pixel"),
            ("track", "snippet"),
            ("health", "healthz"),
            ("health", "readyz"),
            ("health", "openapi"),
            ("stats", "stats"),
            ("reports", "report_page"),
            ("report_assets", "report_asset"),
        ]
    }


PAGE = """<!doctype html>
<html><head><title>waiting</title>
<script defer src="http://127.0.0.1:{port}/t.js" data-site="beacon.example"></script>
<script>
  // application/json is not a "simple" content type: the browser preflights it.
  fetch("http://127.0.0.1:{port}/track", {{
    method: "POST", credentials: "omit",
    headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{url: location.href, site: "fetch.example"}})
  }}).then(r => r.text()).then(t => {{ document.title = "answer " + t; }},
                                e => {{ document.title = "failed " + e; }});
</script></head><body>page on another origin</body></html>
"""


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_page_on_another_origin_sends_hits_from_chromium(
    database_url, make_app, stored_hits, tmp_path
):
    chromium = require_binary("chromium")
    page_port = free_port("127.0.0.2")
    app = make_app(cors_origins=(f"http://127.0.0.2:{page_port}",))
    api_server = make_server("127.0.0.1", 0, app, threaded=True)
    api_port = api_server.server_port
    page = PAGE.format(port=api_port).encode()
    seen_methods: list[str] = []
    original_wsgi = app.wsgi_app

    def recording(environ, start_response):
        seen_methods.append(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}")
        return original_wsgi(environ, start_response)

    app.wsgi_app = recording  # type: ignore[method-assign]

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    page_server = http.server.ThreadingHTTPServer(("127.0.0.2", page_port), Page)
    threads = [
        threading.Thread(target=s.serve_forever, daemon=True) for s in (api_server, page_server)
    ]
    for thread in threads:
        thread.start()
    try:
        dom = subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=10000", "--dump-dom",
                f"http://127.0.0.2:{page_server.server_port}/",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while len(stored_hits()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        api_server.shutdown()
        page_server.shutdown()
        page_server.server_close()

    # The page could read the answer: CORS allowed its origin.
    assert 'answer {"accepted":1}' in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert "OPTIONS /track" in seen_methods  # the preflight
    sites = sorted(hit.site for hit in stored_hits())
    assert sites == ["beacon.example", "fetch.example"]
