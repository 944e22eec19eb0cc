"""A headless Chromium of our own, driven over the DevTools protocol: open a
page, wait until its figures are drawn, and read back what a user would see
(the DOM, a screenshot) and what went wrong (console errors, uncaught
exceptions, CSP violations, alert dialogs)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websocket
from PIL import Image
from services import require_binary


def assert_not_blank(png: bytes) -> None:
    """A screenshot shows something: many colours, not almost all white."""
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 20) or []
    white = sum(count for count, colour in colours if colour == (255, 255, 255))
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page"
    assert white < 0.9 * picture.width * picture.height, "the picture is almost all white"


class HeadlessChromium:
    def __init__(self, profile: Path) -> None:
        binary = require_binary("chromium")
        profile.mkdir(parents=True, exist_ok=True)
        self.log = (profile / "stderr.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--window-size=1280,1600",
                f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        port = self._devtools_port(profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        self.socket = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _devtools_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if port_file.exists() and (lines := port_file.read_text().split()):
                return int(lines[0])
            if self.process.poll() is not None:
                pytest.fail(f"chromium exited with {self.process.returncode}")
            time.sleep(0.05)
        pytest.fail("chromium did not open its DevTools port within 30 s")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events seen meanwhile are kept."""
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        if message.get("method") == "Page.javascriptDialogOpening":
            # An open alert() blocks the page; dismiss it (and the test sees it in dialogs).
            self.socket.send(
                json.dumps(
                    {
                        "id": next(self.ids),
                        "method": "Page.handleJavaScriptDialog",
                        "params": {"accept": True},
                    }
                )
            )

    def open(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
        """Load `url` and wait until report.js has drawn every figure (body[data-drawn])."""
        self.events.clear()
        self.call("Network.setExtraHTTPHeaders", headers=headers or {})
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            drawn = self.evaluate(
                "document.readyState === 'complete' && document.body !== null"
                " && document.body.hasAttribute('data-drawn')"
            )
            # The new page's load event, not a page still showing before it.
            loaded = any(e.get("method") == "Page.loadEventFired" for e in self.events)
            if drawn and loaded:
                return
            time.sleep(0.1)
        pytest.fail(f"{url} was not drawn within {timeout} s; errors: {self.errors()}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and browser errors (CSP, loads)."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            match event.get("method"):
                case "Runtime.exceptionThrown":
                    details = params["exceptionDetails"]
                    found.append(details.get("exception", {}).get("description") or details["text"])
                case "Runtime.consoleAPICalled" if params["type"] in ("error", "assert"):
                    found.append(" ".join(str(a.get("value", a)) for a in params["args"]))
                case "Log.entryAdded" if params["entry"]["level"] == "error":
                    found.append(params["entry"]["text"])
        return found

    def dialogs(self) -> list[str]:
        return [
            e["params"]["message"]
            for e in self.events
            if e.get("method") == "Page.javascriptDialogOpening"
        ]

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
