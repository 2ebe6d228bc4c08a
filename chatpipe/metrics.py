"""Prometheus metrics of every chatpipe process (one registry per process, built at start).

The api serves them at `GET /metrics` on its own port; the ai_consumer and the cancel_listener
call `serve_metrics()`, which serves `/metrics` on `METRICS_PORT` (0: a free port the OS picks,
so several processes share one host; the address is logged) and logs
`metrics listening on http://host:port/metrics`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """All metrics, named `chatpipe_*`. Each process registers only what it moves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # api
        self.http_requests = Counter(
            "chatpipe_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.sse_clients = Gauge("chatpipe_sse_clients", "Open SSE connections", registry=r)
        self.sse_events = Counter("chatpipe_sse_events", "SSE events sent", ["event"], registry=r)
        self.sse_dropped = Counter(
            "chatpipe_sse_slow_clients_dropped", "SSE clients closed for not keeping up", registry=r
        )
        self.cancel_requests = Counter(
            "chatpipe_cancel_requests", "Cancel requests by answer", ["status"], registry=r
        )
        self.forbidden = Counter(
            "chatpipe_forbidden",
            "Requests refused for ownership (api_chat, api_stream, api_cancel, kafka_request, "
            "kafka_cancel)",
            ["path"],
            registry=r,
        )
        self.limited = Counter(
            "chatpipe_limited", "Requests refused by a limit", ["limit"], registry=r
        )
        # consumer
        self.active_streams = Gauge("chatpipe_active_streams", "Streams generating now", registry=r)
        self.buffered = Gauge(
            "chatpipe_lane_backlog", "Requests waiting in session lanes", registry=r
        )
        self.lanes = Gauge("chatpipe_lanes", "Sessions with queued or running work", registry=r)
        self.paused = Gauge("chatpipe_partitions_paused", "1 while fetching is paused", registry=r)
        self.partition_backlog = Gauge(
            "chatpipe_partition_backlog",
            "Uncommitted records per partition",
            ["partition"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "chatpipe_consumer_lag", "Records behind the partition end", ["partition"], registry=r
        )
        self.chunks = Counter("chatpipe_chunks", "Chunks produced", registry=r)
        self.messages = Counter(
            "chatpipe_messages", "Messages ended, by final state", ["state"], registry=r
        )
        self.ttft = Histogram(
            "chatpipe_time_to_first_token_seconds",
            "Claim to first chunk",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancel_latency = Histogram(
            "chatpipe_cancel_latency_seconds",
            "Cancel to the stream's terminal state on the generating instance; "
            "since=requested_at: from the cancel's requested_at (it interrupted the stream: the "
            "api's wake-up or the chat.cancels record); since=flag: from the chunk that saw the "
            "Redis flag first (the flag carries no time)",
            ["since"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancels = Counter(
            "chatpipe_cancels",
            "Messages ended cancelled, by phase (queued: never started; silence: started, no "
            "token yet; streaming: after its first token) and source (api: POST /api/cancel; "
            "kafka: a chat.cancel record alone; session: a session-wide cancel; interrupt: "
            "if_busy=interrupt)",
            ["phase", "source"],
            registry=r,
        )
        self.cancel_tokens = Histogram(
            "chatpipe_cancel_tokens",
            "Tokens the model had produced when a cancel stopped its answer",
            buckets=(0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.sink_batch = Histogram(
            "chatpipe_sink_batch_size",
            "Chunks per Redis round trip",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.sink_redis_retries = Counter(
            "chatpipe_sink_redis_retries",
            "Batches of chunk writes sent to Redis again after a lost connection or a timeout",
            registry=r,
        )
        self.sink_dropped = Counter(
            "chatpipe_sink_dropped_records",
            "Chunk records for chat.responses not produced while Kafka was behind: why=full "
            "(SINK_KAFKA_MAX_PENDING waited already), why=stale (waited over "
            "SINK_CHUNK_MAX_AGE_S)",
            ["why"],
            registry=r,
        )
        self.dlq = Counter(
            "chatpipe_dlq_records", "Records sent to the DLQ", ["reason"], registry=r
        )
        self.dlq_degraded = Counter(
            "chatpipe_dlq_degraded",
            "Dead letters not written whole: how=reference (source topic/partition/offset and "
            "reason, no value: the copy was too large), how=skipped (refused even so)",
            ["how"],
            registry=r,
        )
        self.dlq_retries = Counter(
            "chatpipe_dlq_send_retries", "DLQ writes retried after a transient error", registry=r
        )
        self.lease_takeovers = Counter(
            "chatpipe_lease_takeovers",
            "Messages restarted after their owner's lease expired",
            registry=r,
        )
        self.takeovers = Counter(
            "chatpipe_takeovers",
            "Messages taken over from Redis after their owner's lease lapsed (before Kafka "
            "moved the partition), by how they ended",
            ["result"],
            registry=r,
        )
        self.fenced_writes = Counter(
            "chatpipe_fenced_writes",
            "Events a run wrote after it lost its message (refused: a later run or the end won)",
            registry=r,
        )
        self.terminals_republished = Counter(
            "chatpipe_terminals_republished",
            "Terminal events published again (their finisher died before Kafka acked them)",
            registry=r,
        )
        self.commits = Counter("chatpipe_offset_commits", "Offset commits", registry=r)
        # listener
        self.cancels_seen = Counter(
            "chatpipe_cancels_seen", "Cancel records read", ["source"], registry=r
        )
        self.cancel_tombstones = Counter(
            "chatpipe_cancel_tombstones",
            "Cancel records the standalone listener tombstoned, by why (final, forbidden, stale; "
            "noncanonical_key_kept: left alone)",
            ["why"],
            registry=r,
        )
        self.cancels_mirrored = Counter(
            "chatpipe_cancels_mirrored",
            "Cancel records mirrored into Redis, by result (flagged, final: the message had "
            "ended, forbidden: not the sender's)",
            ["result"],
            registry=r,
        )
        self.cancels_local = Counter(
            "chatpipe_cancels_interrupted",
            "Local streams interrupted by a cancel record",
            registry=r,
        )
        # every process
        self.gc_pause = Histogram(
            "chatpipe_gc_pause_seconds",
            "Pauses of the cyclic garbage collector (the whole process waits), by generation",
            ["generation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )


@dataclass
class MetricsServer:
    """The /metrics endpoint of a process without its own HTTP server."""

    url: str
    server: WSGIServer
    thread: Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer | None:
    """Serve `/metrics` on `host:port` from a daemon thread (port 0: any free port; a negative
    port: off). Logs the address, `metrics listening on http://host:port/metrics`."""
    if port < 0:
        log.info("metrics endpoint off (METRICS_PORT=%d)", port)
        return None
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound = int(server.server_port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/metrics"
    log.info("metrics listening on %s", url, extra={"metrics_url": url})
    return MetricsServer(url, server, thread)
