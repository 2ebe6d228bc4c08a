"""Secrets never show (issue 7): not in `repr(settings)`, not in a log line, an error message,
the /ready body or the /metrics output, also while a connection fails because of them.

The api runs in-process (its lifespan included) against the shared Kafka and Redis with
credentials those do not expect: a SASL password for a PLAINTEXT broker and a password in
REDIS_URL for a Redis without one (which accepts it: its `default` user takes any password),
so the Kafka connection fails, and every failure path writes its message.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from api.app import create_app
from chatpipe.redact import redact_text, redact_url
from chatpipe.settings import Settings
from tests.conftest import SettingsFactory

KAFKA_PW = "kafka-pw-7f3a9c"
REDIS_PW = "redis-pw-1b2c3d"
SECRETS = {
    "kafka_sasl_password": KAFKA_PW,
    "kafka_ssl_key_password": "tls-key-pw-5e6f",
    "redis_password": "redis-field-pw-9a8b",
    "jwt_secret": "jwt-secret-4c5d6e",
    "api_keys": "alice:api-key-1a2b3c",
    "stream_token_secret": "stream-secret-8f9e",
    "llm_api_key": "sk-llm-2d3e4f",
}


def test_repr_and_str_of_settings_hide_every_secret() -> None:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=f"redis://app:{REDIS_PW}@cache:6379/0",
        llm_base_url="https://bob:llm-url-pw-6a7b@llm.example/v1",
        **SECRETS,  # type: ignore[arg-type]
    )
    for text in (repr(s), str(s), f"{s}", s.model_dump_json()):
        for secret in [*SECRETS.values(), REDIS_PW, "llm-url-pw-6a7b"]:
            assert secret not in text
    assert "redis://app:***@cache:6379/0" in repr(s)  # the user stays visible, the password not
    assert s.kafka_sasl_password.get_secret_value() == KAFKA_PW  # still usable by the clients
    assert s.redis_url == f"redis://app:{REDIS_PW}@cache:6379/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://u:p%40ss@h:1/0", "redis://u:***@h:1/0"),
        ("rediss://:only-pw@h/0", "rediss://:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://u:with@at@h/0", "redis://u:***@h/0"),
    ],
)
def test_url_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_text(f"cannot reach {url} now") == f"cannot reach {shown} now"


async def test_the_api_leaks_no_secret_while_its_logins_fail(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    base = make_settings()
    host_port = base.redis_url.split("://", 1)[1]
    settings = make_settings(
        redis_url=f"redis://default:{REDIS_PW}@{host_port}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="app",
        kafka_connect_timeout_s=5,
        api_kafka_timeout_s=2,
        **SECRETS,
    )
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),  # the clients are made here, as in a real process
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        ready = await client.get("/ready")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert "does not expect SASL" in checks["kafka"]  # a PLAINTEXT listener, said plainly
        # (a Redis whose `default` user has no password accepts any AUTH: redis says "ok")
        assert "redis" in checks
        chat = await client.post("/api/chat", json={"session_id": "s-1", "message": "hi"})
        assert chat.status_code == 503
        metrics = await client.get("/metrics")
        seen += [ready.text, chat.text, metrics.text, repr(settings)]
    seen += [record.getMessage() for record in caplog.records]
    seen += [str(record.exc_info[1]) for record in caplog.records if record.exc_info]
    assert any("SASL" in text for text in seen)  # the failures were written somewhere
    for text in seen:
        for secret in [*SECRETS.values(), REDIS_PW]:
            assert secret not in text, f"a secret in: {text[:300]}"
