"""The tiny sd1x project and the per-test accelerate reset of the training tests, plus a local webhook
receiver: an ``http.server`` on 127.0.0.1 that records every POST body, path and header set."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.training.conftest import project  # noqa: F401


class Receiver:
    """Records posted JSON bodies; ``status`` is the HTTP status every request gets."""

    def __init__(self, status: int = 204):
        self.status = status
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                receiver.paths.append(self.path)
                receiver.headers.append(dict(self.headers))
                receiver.bodies.append(json.loads(raw))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, secret: str = "hook/123456/s3cr3t-t0ken") -> str:
        return f"{self.base}/{secret}"

    def events(self) -> list[str]:
        return [body.get("event") for body in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()
