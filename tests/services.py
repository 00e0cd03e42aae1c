"""Services for the tests: the PostgreSQL server .ci/run starts, as throw-away databases, and a proxy that
parks MLflow runs at a known training step (for stopping SLURM workers at a step the test chooses)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def postgres_databases(prefix: str = "ctlab_test") -> Iterator[Callable[[], str]]:
    """Yield a maker of fresh databases on CTLAB_TEST_POSTGRES_URI (each a URI); drop them all on exit.

    Skips without a server, and fails instead when CTLAB_REQUIRE_SERVICES says .ci/run should have started one.
    """
    import psycopg

    server = os.environ.get("CTLAB_TEST_POSTGRES_URI")
    if not server:
        if os.environ.get("CTLAB_REQUIRE_SERVICES"):
            pytest.fail("CTLAB_REQUIRE_SERVICES is set but CTLAB_TEST_POSTGRES_URI is not: the server did not start")
        pytest.skip("CTLAB_TEST_POSTGRES_URI is not set (bash .ci/postgres.sh starts a server and prints it)")
    admin = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    created: list[str] = []

    def create() -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        created.append(name)
        return f"{server}/{name}"

    try:
        yield create
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class StepGate:
    """A pass-through HTTP proxy in front of an MLflow tracking server that parks runs at a known step.

    Training logs each step's metrics over HTTP before the step ends, so holding the ``log-batch`` request that
    carries ``metric`` at ``step`` keeps that run's worker inside step ``step`` until the test calls
    ``release``: a stop signal sent meanwhile lands at a step the test knows, whatever the machine's speed, and
    an interrupt that waits for the step's end checkpoints exactly that step. The first ``runs`` runs to reach
    the step are held, once each; every other request (other metrics, artifacts, run updates) passes through.
    Workers log to ``uri``; the test reads the server itself.
    """

    def __init__(self, upstream: str, step: int, metric: str = "train_loss", runs: int = 1) -> None:
        from http.server import ThreadingHTTPServer
        from urllib.parse import urlparse

        target = urlparse(upstream)
        self._upstream = (target.hostname, target.port)
        self.step, self.metric, self.runs = step, metric, runs
        self._held: dict[str, threading.Event] = {}  # run id → its release, in the order the runs arrived
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StepGate:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            for release in self._held.values():
                release.set()
        self._server.shutdown()
        self._server.server_close()

    def held(self) -> list[str]:
        """The run ids held so far (released or not), in the order they reached the step."""
        with self._changed:
            return list(self._held)

    def release(self, run_id: str) -> None:
        """Let the held request of ``run_id`` through: its step ends and the run goes on."""
        with self._changed:
            self._held[run_id].set()

    def _hold(self, body: bytes) -> None:
        payload = json.loads(body)
        if not any(m.get("key") == self.metric and int(m.get("step", 0)) == self.step
                   for m in payload.get("metrics", [])):
            return
        with self._changed:
            run = payload.get("run_id", "")
            if run in self._held or len(self._held) >= self.runs:
                return
            release = self._held[run] = threading.Event()
            self._changed.notify_all()
        release.wait(timeout=900)  # bounded, so a test that forgot to release cannot hang the worker forever

    def _handler(self) -> type:
        import http.client
        from http.server import BaseHTTPRequestHandler

        gate = self
        hop = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                if self.command == "POST" and self.path.endswith("/runs/log-batch") and body:
                    gate._hold(body)
                upstream = http.client.HTTPConnection(*gate._upstream, timeout=300)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in hop:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:  # quiet: the workers' logs say what happened
                pass

        return Forward
