"""The health and metrics endpoint: ``/healthz`` (JSON) and ``/metrics`` (Prometheus text), on loopback.

The service hands in two callables; the endpoint never touches the service's state
directly, so a slow scrape cannot stall ingest.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HealthServer", "prometheus_text"]


def prometheus_text(metrics: Mapping[str, float], *, prefix: str = "mgtwin_") -> str:
    """Render counters and gauges as Prometheus exposition text.

    Keys may carry labels as ``name{label="value"}``; ``_total`` names are counters.

    Examples:
        >>> print(prometheus_text({"received_total": 3, 'invalid_total{reason="not_json"}': 1}), end="")
        # TYPE mgtwin_received_total counter
        mgtwin_received_total 3
        # TYPE mgtwin_invalid_total counter
        mgtwin_invalid_total{reason="not_json"} 1
    """
    lines: list[str] = []
    typed: set[str] = set()
    for key in sorted(metrics, key=lambda k: (k.split("{")[0], k)):
        name = key.split("{", 1)[0]
        if name not in typed:
            kind = "counter" if name.endswith("_total") else "gauge"
            lines.append(f"# TYPE {prefix}{name} {kind}")
            typed.add(name)
        value = metrics[key]
        text = str(int(value)) if float(value).is_integer() else repr(float(value))
        lines.append(f"{prefix}{key} {text}")
    return "\n".join(lines) + "\n"


class HealthServer:
    """Serve ``/healthz`` and ``/metrics`` from a daemon thread.

    Args:
        host: bind address (loopback by default in the settings).
        port: port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        health: returns ``(healthy, details)``.
        metrics: returns the counters and gauges.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: Callable[[], Mapping[str, float]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    ok, details = outer._health()
                    body = json.dumps({"status": "ok" if ok else "degraded", **details}, default=str).encode()
                    self._send(200 if ok else 503, body, "application/json")
                elif self.path.startswith("/metrics"):
                    self._send(200, prometheus_text(outer._metrics()).encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._health = health
        self._metrics = metrics
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mgtwin-health", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
