"""chatpipe/clients.py without services: which security arguments every Kafka client and the
Redis pool get from the settings, the configuration mistakes caught before connecting, and the
sentences an operator reads when a connection fails."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import IllegalSaslStateError, SaslAuthenticationFailed
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from chatpipe.clients import (
    SecurityConfigError,
    explain_kafka_error,
    explain_redis_error,
    kafka_common,
    kafka_security,
    make_admin,
    make_consumer,
    make_producer,
    redis_options,
    start_bounded,
)
from chatpipe.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


SASL = {
    "kafka_security_protocol": "SASL_PLAINTEXT",
    "kafka_sasl_mechanism": "SCRAM-SHA-256",
    "kafka_sasl_username": "app",
    "kafka_sasl_password": "pw-123456",
}


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    assert kafka_security(settings()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_settings_reach_every_kind_of_kafka_client() -> None:
    s = settings(**SASL)
    expected = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "app",
        "sasl_plain_password": "pw-123456",
    }
    assert kafka_security(s) == expected
    assert expected.items() <= kafka_common(s).items()

    async def build() -> None:  # aiokafka clients want a running loop
        producer, consumer, admin = make_producer(s), make_consumer(s, "t"), make_admin(s)
        try:
            for conn in (producer.client, consumer._client, admin._client):
                assert conn._security_protocol == "SASL_PLAINTEXT"
                assert conn._sasl_mechanism == "SCRAM-SHA-256"
                assert conn._sasl_plain_username == "app"
                assert conn._sasl_plain_password == "pw-123456"
        finally:
            await producer.stop()
            await consumer.stop()
            await admin.close()

    asyncio.run(build())


@pytest.mark.parametrize("missing", ["kafka_sasl_username", "kafka_sasl_password"])
def test_sasl_without_credentials_is_refused_before_connecting(missing: str) -> None:
    with pytest.raises(SecurityConfigError, match="KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"):
        kafka_security(settings(**{**SASL, missing: ""}))


def test_ssl_gets_a_context_that_checks_the_broker(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    key = tmp_path / "ca.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=broker"),
            *("-days", "1", "-keyout", str(key), "-out", str(ca)),
        ],
        check=True,
        capture_output=True,
    )
    context = kafka_security(settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(ca)))[
        "ssl_context"
    ]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    unchecked = settings(
        kafka_security_protocol="SASL_SSL",
        kafka_ssl_ca_file=str(ca),
        kafka_ssl_check_hostname=False,
        **{k: v for k, v in SASL.items() if k != "kafka_security_protocol"},
    )
    assert not kafka_security(unchecked)["ssl_context"].check_hostname


def test_a_missing_tls_file_is_named() -> None:
    with pytest.raises(SecurityConfigError, match=r"KAFKA_SSL_CA_FILE=/nope/ca\.pem"):
        kafka_security(settings(kafka_security_protocol="SSL", kafka_ssl_ca_file="/nope/ca.pem"))


def test_redis_credentials_and_tls_files() -> None:
    s = settings(redis_username="app", redis_password="pw-123456")
    assert redis_options(s) == {"username": "app", "password": "pw-123456"}
    assert redis_options(settings()) == {}
    with pytest.raises(SecurityConfigError, match="TLS needs a rediss:// URL"):
        redis_options(settings(redis_ssl_ca_file="/etc/hostname"))
    tls = redis_options(settings(redis_url="rediss://h:6380/0", redis_ssl_ca_file="/etc/hostname"))
    assert tls == {"ssl_ca_certs": "/etc/hostname", "ssl_check_hostname": True}
    with pytest.raises(SecurityConfigError, match="no such readable file"):
        redis_options(settings(redis_url="rediss://h/0", redis_ssl_cert_file="/nope.pem"))


def test_kafka_failures_read_as_causes() -> None:
    s = settings(**SASL)
    auth = explain_kafka_error(
        SaslAuthenticationFailed(
            "[Error 58] SaslAuthenticationFailed: Authentication failed during authentication"
        ),
        s,
    )
    assert auth.startswith("authentication failed (SASL_PLAINTEXT SCRAM-SHA-256 as user 'app')")
    assert "wrong user name or password" in auth
    assert "does not expect SASL" in explain_kafka_error(IllegalSaslStateError(), s)
    assert "closed the connection" in explain_kafka_error(ConnectionResetError(), settings())
    assert "connection refused" in explain_kafka_error(ConnectionRefusedError(), settings())
    assert "no answer in time" in explain_kafka_error(TimeoutError(), settings())
    for text in (auth, explain_kafka_error(TimeoutError(), s)):
        assert "pw-123456" not in text


def test_redis_failures_read_as_causes_and_hide_the_password() -> None:
    s = settings(redis_url="redis://app:pw-123456@h:6379/0")
    refused = explain_redis_error(AuthenticationError("invalid username-password pair"), s)
    assert refused is not None
    assert "refused the login of user 'app'" in refused
    assert "redis://app:***@h:6379/0" in refused
    assert "pw-123456" not in refused
    assert explain_redis_error(ResponseError("WRONGPASS invalid"), s) is not None
    assert explain_redis_error(ConnectionError("Connection refused"), s) is None  # retryable


async def test_a_client_start_cancelled_by_a_shutdown_stops_the_client() -> None:
    """Issue 12.4's leak: the api's producer retries its start in the background while Kafka
    refuses it; the app stopping cancelled a start in flight and left that AIOKafkaProducer
    unclosed (collected, and reported, in a later test's gc.collect())."""
    starting, stopped = asyncio.Event(), asyncio.Event()

    async def start() -> None:
        starting.set()
        await asyncio.Event().wait()  # the broker never answers

    async def stop() -> None:
        stopped.set()

    task = asyncio.create_task(start_bounded(start, stop, settings(), "producer"))
    await starting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stopped.is_set()
