"""Every setting of every chatpipe process, read from the environment and `.env`.

The names in the design's contract table (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, API_HOST, ...)
are part of the v1 contract: deployments set them. The rest are ours to add.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- connections -------------------------------------------------------------------
    kafka_bootstrap_servers: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    redis_max_connections: int = 64
    kafka_request_timeout_ms: int = 5000
    kafka_session_timeout_ms: int = 10_000  # a dead consumer's partitions move after this

    # --- names (prefixes let tests and tenants share one broker and one Redis) ---------
    topic_prefix: str = ""
    key_prefix: str = ""
    topic_requests: str = "chat.requests"
    topic_cancels: str = "chat.cancels"
    topic_responses: str = "chat.responses"
    topic_dlq: str = "chat.requests.dlq"
    topic_partitions: int = 12
    topic_replication_factor: int = 1
    consumer_group: str = "chatpipe-ai"

    # --- process identity --------------------------------------------------------------
    instance_id: str = Field(default_factory=_default_instance_id)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_port: int = 0  # ai_consumer / cancel_listener: serve /metrics here (0 = off)

    # --- api ---------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_message_bytes: int = 32 * 1024
    sse_heartbeat_s: float = 15.0
    sse_send_timeout_s: float = 30.0
    sse_client_queue: int = 1024
    sse_unknown_grace_ms: int = 1500
    api_kafka_timeout_s: float = 5.0
    retry_after_s: int = 5

    # --- Redis lifetimes ---------------------------------------------------------------
    active_ttl_s: int = 300
    cancel_ttl_s: int = 60
    cancel_queued_ttl_s: int = 3600
    msg_ttl_s: int = 86400
    final_ttl_s: int = 3600
    stream_maxlen: int = 10_000

    # --- ai_consumer -------------------------------------------------------------------
    llm_provider: Literal["simulated", "openai"] = "simulated"
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key: str = ""
    llm_timeout_s: float = 30.0
    sim_tokens: int = 60
    sim_token_delay_ms: float = 20.0
    sim_first_token_delay_ms: float = 0.0
    max_concurrent_streams: int = 256
    max_buffered_records: int = 0  # 0 = 4 x max_concurrent_streams
    lease_ms: int = 10_000
    commit_interval_ms: int = 1000
    shutdown_grace_s: float = 10.0
    coalesce_ms: float = 0.0

    @property
    def buffer_limit(self) -> int:
        return self.max_buffered_records or 4 * self.max_concurrent_streams

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
