"""chatpipe.metrics.serve_metrics: /metrics of a process without an HTTP server of its own, on a
free port (METRICS_PORT=0) logged at start, so several processes share one host."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from chatpipe.metrics import Metrics, serve_metrics


def test_port_zero_serves_on_a_free_port_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    first, second = Metrics(), Metrics()
    with caplog.at_level(logging.INFO, logger="chatpipe.metrics"):
        a = serve_metrics(first, "127.0.0.1", 0)
        b = serve_metrics(second, "127.0.0.1", 0)
    assert a is not None
    assert b is not None
    try:
        assert a.url != b.url  # two processes of one host: two ports
        logged = re.findall(r"metrics listening on (http://127\.0\.0\.1:\d+/metrics)", caplog.text)
        assert logged == [a.url, b.url]
        first.chunks.inc(3)
        body = httpx.get(a.url, timeout=5).text
        assert "chatpipe_chunks_total 3.0" in body
        assert "chatpipe_chunks_total 0.0" in httpx.get(b.url, timeout=5).text
    finally:
        a.close()
        b.close()


def test_a_negative_port_turns_it_off() -> None:
    assert serve_metrics(Metrics(), "127.0.0.1", -1) is None
