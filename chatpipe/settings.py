"""Every setting of every chatpipe process, read from the environment and `.env`.

The names in the design's contract table (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, API_HOST, ...)
are part of the v1 contract: deployments set them. The rest are ours to add.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, SecretStr, field_serializer
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatpipe.redact import redact_url

KafkaSecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- connections -------------------------------------------------------------------
    kafka_bootstrap_servers: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    # REDIS_URL names one node of a Redis Cluster (any: the client discovers the others)
    redis_cluster: bool = False
    # key layout 2: every key of a session carries the tag {crc32(session_id) % buckets}
    # (chatpipe/keys.py). Every process of a deployment must use the same number: changing it
    # moves every key (docs/scaling.md)
    redis_key_buckets: int = Field(default=16, ge=1, le=16384)
    redis_max_connections: int = 64
    kafka_request_timeout_ms: int = 5000
    kafka_session_timeout_ms: int = 10_000  # a dead consumer's partitions move after this

    # --- secure connections (docs/security.md "Secure connections") ---------------------
    # Kafka: PLAINTEXT (default, local dev), SASL_PLAINTEXT, SSL or SASL_SSL, for every client
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_ca_file: str = ""  # PEM CA bundle of the brokers' certificates; empty = system CAs
    kafka_ssl_cert_file: str = ""  # client certificate (mutual TLS), PEM
    kafka_ssl_key_file: str = ""  # its private key, PEM
    kafka_ssl_key_password: SecretStr = SecretStr("")  # when that key is encrypted
    kafka_ssl_check_hostname: bool = True  # off only for brokers whose certs name no host
    # a Kafka client that has not connected (bootstrap, SASL, TLS) by then fails start-up with
    # the cause (bad password, TLS, unreachable) instead of retrying silently
    kafka_connect_timeout_s: float = 15.0
    # Redis: credentials in REDIS_URL (redis://user:pass@host) win over these two
    redis_username: str = ""  # ACL user; empty = `default`
    redis_password: SecretStr = SecretStr("")
    # TLS is on with a rediss:// URL; these name its files
    redis_ssl_ca_file: str = ""  # PEM CA of the server's certificate; empty = system CAs
    redis_ssl_cert_file: str = ""  # client certificate (tls-auth-clients yes), PEM
    redis_ssl_key_file: str = ""
    redis_ssl_check_hostname: bool = True

    # --- names (prefixes let tests and tenants share one broker and one Redis) ---------
    topic_prefix: str = ""
    key_prefix: str = ""
    topic_requests: str = "chat.requests"
    topic_cancels: str = "chat.cancels"
    topic_responses: str = "chat.responses"
    topic_dlq: str = "chat.requests.dlq"
    topic_partitions: int = 12
    # durability of the topics `chatpipe topics` creates (and checks for drift): None = 3 on a
    # cluster of 3+ brokers, else 1; min.insync.replicas None = RF - 1, at least 1
    topic_replication_factor: int | None = None
    topic_min_insync_replicas: int | None = None
    consumer_group: str = "chatpipe-ai"

    # --- process identity --------------------------------------------------------------
    instance_id: str = Field(default_factory=_default_instance_id)
    log_level: str = "INFO"
    # every process's event loop: auto = uvloop's when it is installed (it is a dependency,
    # except on Windows), else asyncio's; asyncio = always asyncio's (docs/operations.md)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_format: Literal["json", "text"] = "json"
    # ai_consumer / cancel_listener: serve /metrics on this port; 0 = a free port the OS picks
    # (logged: `metrics listening on http://host:port/metrics`), so several processes share
    # a host; -1 = off. The api serves /metrics on API_PORT.
    metrics_port: int = 0
    metrics_host: str = ""  # bind address of that endpoint; "" = API_HOST
    # OpenTelemetry (the `otel` extra): a span per chat in the api and per message in the
    # ai_consumer, W3C traceparent injected into the Kafka headers. Off, or the extra not
    # installed: an incoming traceparent is passed through unchanged. OTEL_SDK_DISABLED=true
    # and the standard OTEL_* variables (service name, exporter) are honoured.
    otel_enabled: bool = False

    # --- api ---------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # an idle keep-alive connection is closed after this long. Longer than what clients and
    # load balancers keep an idle connection open (httpx 5 s, nginx upstream 60 s, AWS ALB 60 s):
    # else the server may close one just as a client sends on it (a request lost to the race)
    api_keep_alive_s: int = Field(default=75, ge=1)
    max_message_bytes: int = 32 * 1024
    max_history_bytes: int = 512 * 1024  # the text of a request's own `messages`, in all
    # a request body over this is refused 413 before it is read (api/guard.py)
    api_max_body_bytes: int = 1 << 20
    sse_heartbeat_s: float = 15.0
    # a client that takes none of its SSE bytes for this long (TCP window closed) is dropped
    sse_send_timeout_s: float = 30.0
    sse_client_queue: int = 1024
    sse_unknown_grace_ms: int = 1500
    # perf (docs/benchmarks.md): the SSE hub issues at most one XREAD per this many ms, so a
    # busy api reads many chunks per round trip (fewer commands, less CPU) for <= this delay.
    # An XREAD names every watched stream: its cost grows with the streams, not the entries
    sse_read_interval_ms: float = 20.0
    api_kafka_timeout_s: float = 5.0
    # DELETE /api/sessions/{id}: how long it waits for the session's messages to stop
    session_delete_wait_s: float = 10.0
    retry_after_s: int = 5

    # --- api security (docs/security.md "Authentication, ownership, limits") ------------
    # none = local dev and contract v1 tests; jwt = bearer JWT; api_key = static keys
    auth_mode: Literal["none", "jwt", "api_key"] = "none"
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_secret: SecretStr = SecretStr("")  # HS256 shared secret
    jwt_public_key_file: str = ""  # RS256: a PEM public key file ...
    jwt_jwks_file: str = ""  # ... or a JWKS JSON file (keys picked by `kid`)
    jwt_audience: str = ""  # checked when set
    jwt_issuer: str = ""  # checked when set
    jwt_leeway_s: int = 30  # clock skew allowed on exp / nbf / iat
    api_keys: SecretStr = SecretStr("")  # api_key mode: "user1:key1,user2:key2"
    # signs the stream tokens in stream_url; empty = derived from JWT_SECRET (HS256 only)
    stream_token_secret: SecretStr = SecretStr("")
    stream_token_ttl_s: int = 300  # a stream URL opens (or reconnects) within this
    # sessions belong to their first sender; None = enforced iff AUTH_MODE is not none
    enforce_ownership: bool | None = None
    session_owner_ttl_s: int = 7 * 86400  # refreshed by every message of the session
    rate_limit_per_minute: int = 60  # chat messages per user per minute (0 = off)
    max_streams_per_user: int = 8  # open SSE streams per user, all api instances (0 = off)
    stream_slot_ttl_s: int = 60  # a dead api's stream slots free themselves after this
    sse_max_connections: int = 10_000  # SSE connections per api process (503 beyond)
    cors_allow_origins: str = ""  # comma-separated origins; empty = no CORS headers

    # --- cancel listener (standalone): tombstones of cancel records whose work is done --
    cancel_sweep_interval_s: float = 60.0  # how often pending cancels are looked up; 0 = off
    cancel_record_max_age_s: int = 86400  # a cancel of a message Redis never saw, this old: gone
    # a message that ended `cancelled` is its streamer's to tombstone: the sweeper does it only
    # if no tombstone was read once the record is this old (the streamer died first)
    cancel_sweep_grace_s: float = 120.0

    # --- Redis lifetimes ---------------------------------------------------------------
    active_ttl_s: int = 300
    cancel_ttl_s: int = 60
    cancel_queued_ttl_s: int = 3600
    msg_ttl_s: int = 86400
    final_ttl_s: int = 3600
    stream_maxlen: int = 10_000

    # --- conversation history (chatpipe/history.py, docs/sessions.md) --------------------
    # turns kept per session (oldest dropped), and at most as many sent upstream; 0 = off
    history_max_turns: int = Field(default=50, ge=0, le=10_000)
    # characters of earlier turns sent with a message (oldest whole turns dropped first);
    # also the most of an answer's text a turn keeps
    history_max_chars: int = Field(default=24_000, ge=0)
    history_ttl_s: int = Field(default=7 * 86400, ge=1)  # refreshed by every turn
    history_include_cancelled: bool = True  # a stopped answer is sent as far as it got, marked
    history_cancelled_mark: str = "[the user stopped this answer here]"

    # --- ai_consumer -------------------------------------------------------------------
    llm_provider: Literal["simulated", "openai"] = "simulated"
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key: SecretStr = SecretStr("")  # a secret: never in reprs or logs
    llm_timeout_s: float = 30.0
    llm_system_prompt: str = ""  # sent first, before the history chatpipe keeps
    # ask an OpenAI-compatible upstream for its token counts (stream_options.include_usage);
    # false for a server that refuses the option
    llm_stream_usage: bool = True
    # the api's OpenAI-compatible routes (docs/openai.md): the model names `GET /v1/models`
    # lists and `model` may name, comma-separated; empty: LLM_MODEL, else `chatpipe`
    openai_models: str = ""
    sim_tokens: int = 60
    sim_token_delay_ms: float = 20.0
    sim_first_token_delay_ms: float = 0.0
    max_concurrent_streams: int = 256
    max_buffered_records: int = 0  # 0 = 4 x max_concurrent_streams
    # a stream's lease: a surviving instance takes the stream over this long after its owner
    # died (ai_consumer/takeover.py), refreshed every third of it
    lease_ms: int = 2_000
    takeover_interval_ms: int = 250  # how often lapsed leases are looked up; 0 = off
    commit_interval_ms: int = 1000
    shutdown_grace_s: float = 10.0
    # a stream's tokens within this many ms join one chunk: one Redis entry, one SSE event,
    # one chat.responses record (`seq` of the first token, `count`, the deltas joined; contract
    # 1.8.0, HTTP 1.4.0); the first token of a chunk waits up to this long. 0 (the default):
    # one chunk per token, as every reader before 1.8.0 expects (ai_consumer/sink.py)
    coalesce_ms: float = Field(default=0.0, ge=0)
    # perf (docs/benchmarks.md): the sink's Redis round trips (MGET flags + XADDs) are at
    # least this many ms apart, so more chunks share one; the producer of chat.responses waits
    # up to producer_linger_ms to batch records (chunks are not awaited: SSE does not wait)
    # a write of chunks that cannot reach Redis is sent again for this long before the
    # streams of its batch end failed (ai_consumer/sink.py). Longer than a Redis Cluster
    # failover: cluster-node-timeout (15 s by default) plus the replica's election
    sink_redis_retry_s: float = 30.0
    # on a Redis Cluster: a message's FINISH waits (WAIT 1) this long for a replica to have it
    # before its terminal event goes to Kafka (chatpipe/state.py); 0 = no wait
    redis_finish_wait_ms: int = Field(default=100, ge=0)
    # chunk records waiting for Kafka (a broker outage): at most this many, none older than
    # this (dropped, counted; terminal events never are): ai_consumer/sink.py
    sink_kafka_max_pending: int = 100_000
    sink_chunk_max_age_s: float = 30.0
    # perf (docs/benchmarks.md): the sink writes to Redis at most once per this many ms, with
    # everything emitted meanwhile in one WRITE call; a chunk waits <= this before its XADD
    sink_tick_ms: float = 10.0
    # chat.responses: the chunk records of one message within this many ms leave as one
    # record (its first `seq`, `count` chunks, their deltas joined; contract 1.7.0); terminal
    # and started events flush the message's open record first and never wait. 0 (the
    # default): one record per chunk, as every reader before 1.7.0 expects
    responses_chunk_window_ms: int = Field(default=0, ge=0)
    producer_linger_ms: int = 20
    # a dead letter over this many bytes (or refused by the broker as too large) is written as
    # a reference: source topic/partition/offset and reason, no value (ai_consumer/dlq.py);
    # the DLQ topic's max.message.bytes (chatpipe/topics.py)
    dlq_max_record_bytes: int = 10 * 1024 * 1024
    dlq_max_pending: int = 32  # dead letters waiting to be written; the next waits for room
    # move what start-up allocated out of the garbage collector's reach (chatpipe/gcwatch.py)
    gc_freeze: bool = True

    @field_serializer("redis_url", "llm_base_url", when_used="json")
    def _url_without_password(self, url: str) -> str:
        return redact_url(url)  # SecretStr fields dump as "**********" already

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr/str without secrets: SecretStr fields print as `**********` already; URLs that
        carry a password (REDIS_URL, LLM_BASE_URL) print as `redis://user:***@host`."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) and "://" in value else value

    @property
    def metrics_bind(self) -> str:
        return self.metrics_host or self.api_host

    @property
    def buffer_limit(self) -> int:
        return self.max_buffered_records or 4 * self.max_concurrent_streams

    @property
    def ownership_enforced(self) -> bool:
        if self.enforce_ownership is not None:
            return self.enforce_ownership
        return self.auth_mode != "none"

    def topic(self, base: str) -> str:
        return f"{self.topic_prefix}{base}"

    @property
    def requests_topic(self) -> str:
        return self.topic(self.topic_requests)

    @property
    def cancels_topic(self) -> str:
        return self.topic(self.topic_cancels)

    @property
    def responses_topic(self) -> str:
        return self.topic(self.topic_responses)

    @property
    def dlq_topic(self) -> str:
        return self.topic(self.topic_dlq)
