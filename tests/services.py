"""Real outside services the deployment tests start: redis-server, redis-sentinel,
gunicorn. Each runs on a free loopback port, in a temp folder, and is stopped by
the test that started it (by its own process id)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

SHARED_REDIS = ("127.0.0.1", 6379)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/debian-packages.txt; `make test` installs it)"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {timeout}s")


class RedisServer:
    """A redis-server of our own: no persistence, a free port, killed on stop()."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        binary = require_binary("redis-server")
        self.host, self.port = "127.0.0.1", port or free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: answers(self.host, self.port), f"redis-server on port {self.port}")

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RedisSentinel:
    """redis-sentinel watching the Redis at `master`, as the service `name`."""

    def __init__(self, tmp_path: Path, master: tuple[str, int], name: str = "telemetry") -> None:
        binary = require_binary("redis-sentinel")
        self.port = free_port()
        self.name = name
        config = tmp_path / "sentinel.conf"
        # Sentinel rewrites its config file, so it must be a writable file of its own.
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {tmp_path}\n"
            f"sentinel monitor {name} {master[0]} {master[1]} 1\n"
            f"sentinel down-after-milliseconds {name} 5000\n"
        )
        self.process = subprocess.Popen(
            [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)

        def knows_master() -> bool:
            try:
                return client.sentinel_get_master_addr_by_name(name) is not None
            except redis.RedisError:
                return False

        wait_for(knows_master, f"redis-sentinel on port {self.port} knowing {name}")

    def url(self) -> str:
        # limits reads the path as the service name; the database is always 0.
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Gunicorn:
    """`api.gunicorn_conf` in a subprocess, as `telemetry serve` runs it."""

    def __init__(
        self, tmp_path: Path, database: Path, client_address: str = "127.0.0.1", **settings: str
    ) -> None:
        self.port = free_port()
        self.database = database
        # The loopback address requests come from (a distinctive one lets a test
        # look for it in logs and files).
        self.client_address = client_address
        self.log = tmp_path / f"gunicorn-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            TELEMETRY_DATABASE_URL=f"sqlite:///{database}",
            TELEMETRY_BIND=f"127.0.0.1:{self.port}",
            **settings,
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, headers=None
    ) -> tuple[int, bytes]:
        """(status, body) of one request on a connection of its own."""
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(self.client_address, 0)
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_until_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited early:\n{self.log.read_text()}")
            try:
                return self.request("GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, "gunicorn answering /readyz", timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
