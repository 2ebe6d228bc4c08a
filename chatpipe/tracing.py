"""W3C trace context across Kafka: OpenTelemetry spans when the `otel` extra is installed and
OTEL_ENABLED is set; otherwise a no-op that hands the incoming `traceparent` on unchanged.

    tracing = make_tracing(settings, "api")          # in __main__ / lifespan
    with tracing.span("chat.submit", incoming, {...}) as traceparent:
        ...  # send the Kafka record with `traceparent` in its headers
    tracing.close()

opentelemetry is imported only inside `make_tracing`, when tracing is enabled: without the
extra nothing here imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from chatpipe.settings import Settings

log = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]


class Tracing:
    """No tracing: `span()` yields the incoming traceparent as it came (pass-through)."""

    enabled = False

    @contextlib.contextmanager
    def span(
        self, name: str, traceparent: str | None, attributes: Attributes | None = None
    ) -> Iterator[str | None]:
        yield traceparent

    def close(self) -> None:
        return None


class OtelTracing(Tracing):
    """A span per call of `span()`, child of the incoming traceparent (a new trace without
    one); yields the traceparent of that span, to be written on the outgoing records."""

    enabled = True

    def __init__(self, provider: Any, kind: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("chatpipe")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = kind

    @contextlib.contextmanager
    def span(
        self, name: str, traceparent: str | None, attributes: Attributes | None = None
    ) -> Iterator[str | None]:
        parent = self._propagator.extract({"traceparent": traceparent} if traceparent else {})
        with self._tracer.start_as_current_span(
            name, context=parent, kind=self._kind, attributes=dict(attributes or {})
        ) as span:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=_with_span(span))
            yield carrier.get("traceparent", traceparent)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._provider.shutdown()


def _with_span(span: Any) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def make_tracing(settings: Settings, service: str) -> Tracing:
    """The process's tracing: OpenTelemetry when enabled and installed, else the no-op."""
    if not settings.otel_enabled or _env_true("OTEL_SDK_DISABLED"):
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind
    except ImportError:
        log.warning(
            "OTEL_ENABLED is set but OpenTelemetry is not installed (pip install "
            "'chatpipe[otel]'): traceparent is passed through unchanged"
        )
        return Tracing()
    attributes: dict[str, str] = {"service.instance.id": settings.instance_id}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"chatpipe-{service}"
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _exporter()
    if exporter is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(exporter))
    kind = SpanKind.PRODUCER if service == "api" else SpanKind.CONSUMER
    log.info(
        "OpenTelemetry tracing on (exporter: %s)",
        type(exporter).__name__ if exporter is not None else "none",
    )
    return OtelTracing(provider, kind)


def _exporter() -> Any:
    """The span exporter named by the standard OTEL_TRACES_EXPORTER (default `otlp`): `otlp`
    needs opentelemetry-exporter-otlp(-proto-http) installed; `console` prints spans to
    stdout; `none` exports nothing (the traceparent still propagates)."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.info(
                "no OTLP exporter installed (pip install opentelemetry-exporter-otlp-proto-http): "
                "spans are not exported, traceparent still propagates"
            )
            return None
        return OTLPSpanExporter()
    if name != "none":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; spans are not exported", name)
    return None
