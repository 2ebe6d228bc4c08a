"""Settings: the defaults are the design's table (deployments rely on them) and every
contract variable can be overridden from the environment or `.env`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from chatpipe.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No chatpipe variable from the outer environment, and a working dir without `.env`."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults_are_the_design_table(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.redis_url == "redis://localhost:6379/0"
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8000)
    assert s.instance_id == f"{socket.gethostname()}-{os.getpid()}"
    assert s.llm_provider == "simulated"
    assert (s.llm_base_url, s.llm_model, s.llm_api_key.get_secret_value()) == ("", "", "")
    assert (s.sim_tokens, s.sim_token_delay_ms, s.sim_first_token_delay_ms) == (60, 20, 0)
    assert s.max_concurrent_streams == 256
    # §2 topics and Redis lifetimes
    assert s.requests_topic == "chat.requests"
    assert s.cancels_topic == "chat.cancels"
    assert s.responses_topic == "chat.responses"
    assert s.dlq_topic == "chat.requests.dlq"
    assert s.topic_partitions == 12
    assert s.active_ttl_s == 300
    assert s.cancel_ttl_s == 60
    assert s.cancel_queued_ttl_s > s.cancel_ttl_s  # "longer if the message is still queued"


def test_environment_overrides_the_contract_variables(clean_env: pytest.MonkeyPatch) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "REDIS_URL": "rediss://cache:6380/2",
        "API_HOST": "0.0.0.0",
        "API_PORT": "9001",
        "INSTANCE_ID": "api-7",
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": "http://vllm:8000/v1",
        "LLM_MODEL": "qwen",
        "LLM_API_KEY": "sk-test",
        "SIM_TOKENS": "5",
        "SIM_TOKEN_DELAY_MS": "1.5",
        "SIM_FIRST_TOKEN_DELAY_MS": "300",
        "MAX_CONCURRENT_STREAMS": "8",
        "TOPIC_PREFIX": "prod.",
        "TOPIC_PARTITIONS": "24",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    s = Settings()
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert s.redis_url == "rediss://cache:6380/2"
    assert (s.api_host, s.api_port) == ("0.0.0.0", 9001)
    assert s.instance_id == "api-7"
    assert s.llm_provider == "openai"
    assert (s.llm_base_url, s.llm_model, s.llm_api_key.get_secret_value()) == (
        "http://vllm:8000/v1",
        "qwen",
        "sk-test",
    )
    assert (s.sim_tokens, s.sim_token_delay_ms, s.sim_first_token_delay_ms) == (5, 1.5, 300)
    assert s.max_concurrent_streams == 8
    assert s.requests_topic == "prod.chat.requests"
    assert s.dlq_topic == "prod.chat.requests.dlq"
    assert s.topic_partitions == 24


def test_variable_names_are_case_insensitive(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("api_port", "9100")
    assert Settings().api_port == 9100


def test_dot_env_file_is_read_and_the_environment_wins(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("API_PORT=9200\nSIM_TOKENS=7\nUNKNOWN_THING=1\n")
    clean_env.setenv("SIM_TOKENS", "9")
    s = Settings()
    assert s.api_port == 9200
    assert s.sim_tokens == 9


@pytest.mark.parametrize(
    ("name", "value"),
    [("LLM_PROVIDER", "gpt-magic"), ("API_PORT", "eighty"), ("MAX_CONCURRENT_STREAMS", "x")],
)
def test_bad_values_are_rejected_at_start(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_buffer_limit_defaults_to_four_times_the_streams(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings(max_concurrent_streams=10).buffer_limit == 40
    assert Settings(max_concurrent_streams=10, max_buffered_records=3).buffer_limit == 3
