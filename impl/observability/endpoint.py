"""A process's own small HTTP endpoint for `ragapi worker`, which serves no API: /metrics
(Prometheus text) and /health (liveness: 200 while the process does its work, 503 after).

The standard library's threading server is enough for a scrape every few seconds and a probe,
and keeps FastAPI out of a process that only ingests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from impl.observability.metrics import Metrics


class ProcessEndpoint:
    def __init__(self, host: str, port: int, metrics: Metrics, alive: Callable[[], bool]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, metrics.render())
                elif self.path == "/health":
                    up = alive()
                    body = json.dumps({"status": "ok" if up else "down"}).encode()
                    self._reply(200 if up else 503, "application/json", body)
                else:
                    self._reply(404, "text/plain", b"not found\n")

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes and probes every few seconds are not news

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ragapi-endpoint", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
