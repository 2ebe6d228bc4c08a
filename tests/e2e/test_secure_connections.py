"""Issue 7, must-show 4: a broker with a SASL/SCRAM listener and a Redis with an ACL user (the
opt-in secure mode of infra/local/stack.sh, on a private stack of this module).

With the right credentials real api and ai_consumer processes answer a chat end to end; with a
wrong Kafka password or a wrong Redis password each fails with a clear error within a bound
(the ai_consumer exits non-zero with one readable log line; the api stays up, /ready says why
and POST /api/chat answers 503), never a hang. No password shows in a log, /ready or /metrics.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import RedisError

from chatpipe.clients import (
    KafkaConnectFailed,
    RedisConnectFailed,
    make_admin,
    make_redis,
    verify_redis,
)
from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics
from tests.conftest import namespace
from tests.e2e.conftest import run_async
from tests.support.cluster import Cluster
from tests.support.private_stack import PrivateStack, private_stack
from tests.support.procs import Proc, free_port
from tests.support.sse import SSEStream
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

KAFKA_USER = "chatpipe-app"
REDIS_USER = "chatpipe-app"
KAFKA_PASSWORD = f"kafka-{secrets.token_hex(8)}"
REDIS_PASSWORD = f"redis-{secrets.token_hex(8)}"
WRONG = f"wrong-{secrets.token_hex(8)}"
SECRETS = [KAFKA_PASSWORD, REDIS_PASSWORD, WRONG]

# A process whose login is refused must say so within this bound. Start-up is bounded by
# KAFKA_CONNECT_TIMEOUT_S=10 (a refused SASL login fails at once, ~1 s); the rest is a Python
# interpreter importing chatpipe on a loaded 2-core machine.
FAIL_WITHIN_S = 45.0


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    env = {
        "KAFKA_SASL": "scram",
        "KAFKA_SASL_USER": KAFKA_USER,
        "KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "REDIS_ACL_USER": REDIS_USER,
        "REDIS_ACL_PASSWORD": REDIS_PASSWORD,
    }
    with private_stack(tmp_path_factory.mktemp("secure-stack"), env) as stack:
        yield stack


@pytest.fixture(scope="module")
def values(secure_stack: PrivateStack) -> dict[str, Any]:
    """The settings of every process of the module (right credentials), by field name."""
    ns = namespace()
    return {
        "kafka_bootstrap_servers": secure_stack.bootstrap,
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": KAFKA_USER,
        "kafka_sasl_password": KAFKA_PASSWORD,
        "kafka_connect_timeout_s": 10,
        "redis_url": f"redis://{REDIS_USER}@127.0.0.1:{secure_stack.redis_port}/0",
        "redis_password": REDIS_PASSWORD,
        "topic_prefix": f"{ns}.",
        "key_prefix": f"{ns}:",
        "consumer_group": f"{ns}-ai",
        "topic_partitions": 3,
        "instance_id": f"test-{ns}",
        "log_format": "json",
        "sim_tokens": 5,
        "sim_token_delay_ms": 20,
    }


@pytest.fixture(scope="module")
def cluster(values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """1 api + 1 ai_consumer (its embedded cancel listener included), right credentials; the
    api authenticates with SCRAM-SHA-256, the consumer with SCRAM-SHA-512 (both enabled)."""
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]

    async def create_topics() -> None:
        admin = make_admin(settings)  # SASL as well: a wrong setting fails here, clearly
        await admin.start()
        try:
            await ensure_topics(admin, settings)
        finally:
            await admin.close()

    run_async(create_topics)
    workdir = tmp_path_factory.mktemp("secure-cluster")
    running = Cluster(settings, workdir, apis=0, consumers=1, listener=False, env=dict(values))
    with running.running(timeout=90) as c:
        c.spawn("api", "api-1", {"kafka_sasl_mechanism": "SCRAM-SHA-256"}, member=True)
        c.wait_ready(timeout=90)
        yield c


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password appears in {where}"


async def wait_exit(proc: Proc, within: float) -> int:
    async def exited() -> int | None:
        return proc.returncode()

    return await apoll(f"{proc.name} to exit", exited, within)


async def ready_body(client: httpx.AsyncClient, url: str, status: int) -> dict[str, Any]:
    """The /ready body once it answers `status` (the api needs a moment to try Kafka)."""

    async def check() -> dict[str, Any] | None:
        try:
            response = await client.get(f"{url}/ready")
        except httpx.TransportError:
            return None  # not listening yet
        body: dict[str, Any] = response.json()
        return body if response.status_code == status else None

    return await apoll(f"/ready of {url} to answer {status}", check, FAIL_WITHIN_S, 0.2)


async def test_chat_works_end_to_end_with_the_right_credentials(cluster: Cluster) -> None:
    api = cluster.api_procs[0]
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        response = await client.post("/api/chat", json={"session_id": "s-secure", "message": "hi"})
        assert response.status_code == 202, response.text
        accepted = response.json()
        async with SSEStream(client, accepted["stream_url"]) as stream:
            events = await stream.until_done(within=30)
        done = events[-1]
        assert done.event == "done"
        assert done.json()["status"] == "completed"
        assert [e.event for e in events[:-1]]
        assert all(e.event == "chunk" for e in events[:-1])
        answer = "".join(str(e.json()["delta"]) for e in events[:-1])
        assert answer.strip(), "the simulator's answer arrived empty"

        # the secrets of every process are nowhere an operator or a scraper looks
        assert_no_secret("/ready", ready.text)
        assert_no_secret("/metrics", (await client.get("/metrics")).text)
    for proc in cluster.procs:
        assert_no_secret(f"the log of {proc.name}", proc.text())


@pytest.mark.parametrize(
    ("what", "override", "expected"),
    [
        ("kafka", {"kafka_sasl_password": WRONG}, "authentication failed"),
        ("redis", {"redis_password": WRONG}, f"refused the login of user '{REDIS_USER}'"),
    ],
)
async def test_ai_consumer_with_a_wrong_password_exits_with_a_clear_error(
    cluster: Cluster, what: str, override: dict[str, Any], expected: str
) -> None:
    started = time.monotonic()
    proc = cluster.spawn("ai_consumer", f"ai-wrong-{what}", override)
    code = await wait_exit(proc, FAIL_WITHIN_S)
    assert code != 0, proc.tail()
    log = proc.text()
    assert expected in log, proc.tail()
    # one readable critical line, not a traceback
    [line] = proc.find(lambda d: d.get("level") == "critical")
    assert "stopped:" in line["msg"]
    assert expected in line["msg"]
    assert "Traceback" not in log, proc.tail()
    assert_no_secret(f"the log of {proc.name}", log)
    print(f"{proc.name} exited {code} after {time.monotonic() - started:.1f}s: {line['msg']}")


async def test_api_with_a_wrong_kafka_password_says_why_and_answers_503(cluster: Cluster) -> None:
    proc = cluster.spawn("api", "api-wrong-kafka", {"kafka_sasl_password": WRONG})
    async with httpx.AsyncClient(timeout=15) as client:
        body = await ready_body(client, proc.url, 503)
        assert body["checks"]["redis"] == "ok"
        assert "authentication failed" in body["checks"]["kafka"], body
        assert KAFKA_USER in body["checks"]["kafka"], body
        started = asyncio.get_running_loop().time()
        response = await client.post(
            f"{proc.url}/api/chat", json={"session_id": "s-wrong", "message": "hi"}
        )
        took = asyncio.get_running_loop().time() - started
        assert response.status_code == 503, response.text
        assert "Retry-After" in response.headers
        assert took < 10, f"503 took {took:.1f}s"  # not a hang: bounded by API_KAFKA_TIMEOUT_S
        assert_no_secret("/ready", str(body))
        assert_no_secret("the 503", response.text)
    assert_no_secret(f"the log of {proc.name}", proc.text())


async def test_api_with_a_wrong_redis_password_says_why_and_answers_503(
    cluster: Cluster, secure_stack: PrivateStack
) -> None:
    # the password written into REDIS_URL this time: it must be masked wherever the URL shows
    url = f"redis://{REDIS_USER}:{WRONG}@127.0.0.1:{secure_stack.redis_port}/0"
    proc = cluster.spawn("api", "api-wrong-redis", {"redis_url": url, "redis_password": ""})
    async with httpx.AsyncClient(timeout=15) as client:
        body = await ready_body(client, proc.url, 503)
        assert body["checks"]["kafka"] == "ok"
        assert "AuthenticationError" in body["checks"]["redis"], body
        response = await client.post(
            f"{proc.url}/api/chat", json={"session_id": "s-wrong", "message": "hi"}
        )
        assert response.status_code == 503, response.text
        assert_no_secret("/ready", str(body))
        assert_no_secret("the 503", response.text)
        assert_no_secret("/metrics", (await client.get(f"{proc.url}/metrics")).text)
    assert_no_secret(f"the log of {proc.name}", proc.text())


# --- Redis over TLS ------------------------------------------------------------------------------
# Debian's redis-server is built with TLS: a server of this module's own on a `tls-port` (no
# plaintext port), with a certificate made here by openssl, an ACL user and `default` off.


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_cert(d: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A key and certificate (PEM): self-signed CA when `ca` is None, else signed by it and
    valid for localhost and 127.0.0.1."""
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    if ca is None:
        openssl(*f"req -x509 -newkey rsa:2048 -nodes -subj /CN={name} -days 1".split(), "-keyout", key, "-out", cert)  # fmt: skip
        return key, cert
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        *["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"],
        "-keyout",
        key,
        "-out",
        csr,
    )
    openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial", "-days", "1", "-out", cert, "-extfile", ext)  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("redis-tls")
    ca_key, ca = make_cert(d, "test-ca")
    _, other_ca = make_cert(d, "other-ca")
    key, cert = make_cert(d, "server", (ca_key, ca))
    port = free_port()
    tls = f"--tls-cert-file {cert} --tls-key-file {key} --tls-ca-cert-file {ca}"
    acl = f"--user default off --user {REDIS_USER} on >{REDIS_PASSWORD} ~* &* +@all"
    argv = [
        *f"redis-server --port 0 --tls-port {port} --bind 127.0.0.1 {tls}".split(),
        *f"--tls-auth-clients no --appendonly no --dir {d} {acl}".split(),
        *("--save", ""),
    ]
    server = Proc.launch("redis-tls", argv, dict(os.environ), d, d / "redis.log")
    values = {
        "redis_url": f"rediss://{REDIS_USER}@127.0.0.1:{port}/0",
        "redis_password": REDIS_PASSWORD,
        "redis_ssl_ca_file": str(ca),
    }
    try:

        async def up() -> bool | None:
            s = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            client = make_redis(s, max_connections=2)
            try:
                return bool(await client.ping()) or None
            except (RedisError, OSError):
                return None
            finally:
                await client.aclose()

        run_async(lambda: apoll("the TLS Redis to answer", up, within=30, interval=0.1))
        yield {"values": values, "other_ca": str(other_ca)}
    finally:
        server.terminate()


async def test_redis_over_tls_with_an_acl_user(tls_redis: dict[str, Any]) -> None:
    s = Settings(_env_file=None, **tls_redis["values"])  # type: ignore[call-arg]
    client = make_redis(s, max_connections=2)
    try:
        await verify_redis(client, s)
        await client.set("tls-check", b"v")
        assert await client.get("tls-check") == b"v"
    finally:
        await client.aclose()


async def test_redis_tls_with_an_untrusted_certificate_fails_clearly(
    tls_redis: dict[str, Any],
) -> None:
    values = {**tls_redis["values"], "redis_ssl_ca_file": tls_redis["other_ca"]}
    s = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    client = make_redis(s, max_connections=2)
    try:
        with pytest.raises(RedisConnectFailed, match=r"TLS failed.*certificate verify failed"):
            await verify_redis(client, s)
    finally:
        await client.aclose()


# --- rotation ------------------------------------------------------------------------------------


async def test_rotating_the_scram_password_takes_effect_at_once(
    secure_stack: PrivateStack, values: dict[str, Any]
) -> None:
    """docs/security.md "Rotating secrets": the user's SCRAM credentials are replaced through
    the admin API (what `stack.sh start` does when KAFKA_SASL_PASSWORD changed); new
    connections need the new password from then on. Runs last: it restores the old one."""
    new = f"rotated-{secrets.token_hex(8)}"
    SECRETS.append(new)

    async def admin_with(password: str) -> str:
        s = Settings(_env_file=None, **{**values, "kafka_sasl_password": password})  # type: ignore[call-arg]
        admin = make_admin(s)
        try:
            await admin.start()
            return "ok"
        except KafkaConnectFailed as e:
            return str(e)
        finally:
            await admin.close()

    def rotate(password: str) -> None:
        secure_stack.extra_env["KAFKA_SASL_PASSWORD"] = password
        output = secure_stack.run("start", "kafka")
        assert_no_secret("the output of stack.sh", output)

    await asyncio.to_thread(rotate, new)
    try:
        assert await admin_with(new) == "ok"
        refused = await admin_with(KAFKA_PASSWORD)
        assert "authentication failed" in refused, refused
    finally:
        await asyncio.to_thread(rotate, KAFKA_PASSWORD)
    assert await admin_with(KAFKA_PASSWORD) == "ok"
