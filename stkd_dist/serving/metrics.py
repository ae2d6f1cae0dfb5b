"""Prometheus metrics and structured log lines of a teacher server.

Each server has its own :class:`~prometheus_client.CollectorRegistry` (several servers can live in
one process, e.g. in tests or Ray actors) exposed over HTTP by ``--metrics-port``. Names:

==========================================  =========  ==========================================
``stkd_serve_windows_total{source}``        counter    windows sent; source = cache or teacher
``stkd_serve_bytes_total``                  counter    label bytes sent (tensor payload)
``stkd_serve_batch_windows``                histogram  windows per teacher forward pass
``stkd_serve_cache_hits_total``             counter    windows found in the label cache
``stkd_serve_cache_misses_total``           counter    windows sent to the teacher instead
``stkd_serve_stream_errors_total{code}``    counter    streams ended with an error status
``stkd_serve_active_streams``               gauge      streams in progress
``stkd_serve_forward_windows_total``        counter    windows run through the model, no padding
``stkd_serve_forward_seconds_total``        counter    seconds spent in teacher model calls
==========================================  =========  ==========================================
"""

from __future__ import annotations

import logging
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServerMetrics:
    """The metrics of one server, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._httpd: WSGIServer | None = None
        r = self.registry
        self.windows = Counter(
            "stkd_serve_windows", "Windows of labels sent", ["source"], registry=r
        )
        self.bytes = Counter("stkd_serve_bytes", "Label bytes sent (tensor payload)", registry=r)
        self.batch_windows = Histogram(
            "stkd_serve_batch_windows",
            "Windows per teacher forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "stkd_serve_cache_hits", "Windows served from the cache", registry=r
        )
        self.cache_misses = Counter(
            "stkd_serve_cache_misses", "Windows computed by the teacher", registry=r
        )
        self.stream_errors = Counter(
            "stkd_serve_stream_errors", "Streams ended with an error", ["code"], registry=r
        )
        self.active_streams = Gauge("stkd_serve_active_streams", "Streams in progress", registry=r)
        # windows computed by the teacher model, without the padding of the last micro-batch
        self.forward_windows = Counter(
            "stkd_serve_forward_windows", "Windows the teacher model ran on", registry=r
        )
        # the forward thread's busy time: its rate over wall time is the teacher's utilisation
        self.forward_seconds = Counter(
            "stkd_serve_forward_seconds", "Seconds spent in teacher model calls", registry=r
        )

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (e.g. ``"stkd_serve_cache_hits_total"``), 0 when absent."""
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose the metrics over HTTP on ``host:port`` (0 = a free port); returns the port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if any."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line: ``event=NAME key=value ...`` (values with spaces are quoted)."""
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    logger.log(level, " ".join(parts))
