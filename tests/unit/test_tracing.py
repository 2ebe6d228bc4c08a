"""chatpipe.tracing: the pass-through without OpenTelemetry, the spans with it, and that no
chatpipe module needs opentelemetry to import."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatpipe.settings import Settings
from chatpipe.tracing import OtelTracing, Tracing, make_tracing

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HAS_SDK = importlib.util.find_spec("opentelemetry.sdk") is not None


def test_without_tracing_the_traceparent_passes_through_unchanged() -> None:
    tracing = make_tracing(Settings(otel_enabled=False), "api")
    assert type(tracing) is Tracing
    with tracing.span("chat.submit", TRACEPARENT) as out:
        assert out == TRACEPARENT
    with tracing.span("chat.submit", None) as out:
        assert out is None


def test_every_process_imports_without_opentelemetry() -> None:
    """With the extra's SDK made unimportable, the api, the consumer and the listener import,
    and tracing falls back to the pass-through with a warning when it is enabled.
    (opentelemetry-api alone comes with current FastAPI releases; the SDK only with the
    extra.)"""
    script = textwrap.dedent(
        """
        import sys, logging
        from importlib.abc import MetaPathFinder

        class Block(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Block())
        import api.app, ai_consumer.service, cancel_listener.__main__
        from chatpipe.settings import Settings
        from chatpipe.tracing import Tracing, make_tracing
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
        tracing = make_tracing(Settings(otel_enabled=True), "api")
        assert type(tracing) is Tracing, tracing
        with tracing.span("x", "tp") as out:
            assert out == "tp"
        assert not any(m.startswith("opentelemetry.sdk") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OpenTelemetry is not installed" in result.stdout
    assert result.stdout.strip().endswith("ok")


@pytest.mark.skipif(not HAS_SDK, reason="the otel extra is not installed")
def test_with_opentelemetry_a_span_continues_the_incoming_trace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    with caplog.at_level(logging.INFO, logger="chatpipe.tracing"):
        tracing = make_tracing(Settings(otel_enabled=True, instance_id="t-1"), "ai_consumer")
    assert isinstance(tracing, OtelTracing)
    assert "OpenTelemetry tracing on" in caplog.text
    try:
        with tracing.span("chat.respond", TRACEPARENT, {"chatpipe.message_id": "m"}) as out:
            assert out is not None
            version, trace_id, span_id, flags = out.split("-")
            assert (version, trace_id, flags) == ("00", TRACEPARENT.split("-")[1], "01")
            assert span_id != TRACEPARENT.split("-")[2]
        with tracing.span("chat.respond", None) as fresh:  # no incoming: a new trace
            assert fresh is not None
            assert fresh.split("-")[1] != trace_id
    finally:
        tracing.close()


def test_the_standard_off_switch_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert type(make_tracing(Settings(otel_enabled=True), "api")) is Tracing
