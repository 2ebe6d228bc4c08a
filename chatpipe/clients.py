"""Kafka and Redis client factories. Called from `__main__` / `lifespan`, never at import.

Every Kafka client (producer, consumer, admin; the listener's consumer too) gets the security
settings of `kafka_security()` (SASL PLAIN/SCRAM, TLS), and its `start()` is bounded by
`kafka_connect_timeout_s`: a wrong password, a TLS mismatch or an unreachable broker fails
start-up with a `KafkaConnectFailed` naming the cause instead of retrying silently. Redis gets
its ACL user/password and TLS files from `redis_options()`; `verify_redis()` turns a refused
login into a `RedisConnectFailed` at start. Secrets never reach a message: see chatpipe/redact.py
and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from chatpipe.errors import ChatpipeError, Unavailable
from chatpipe.redact import redact_text, redact_url
from chatpipe.redis_pack import use_hiredis_packing
from chatpipe.settings import Settings

log = logging.getLogger(__name__)


class SecurityConfigError(ChatpipeError):
    """The connection security settings contradict each other or name a missing file."""


class KafkaConnectFailed(ChatpipeError):
    """A Kafka client could not connect at start; the message names the cause."""


class RedisConnectFailed(ChatpipeError):
    """Redis refused this client's login (ACL user/password) or its TLS handshake."""


# --- Kafka -----------------------------------------------------------------------------------


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every Kafka connection (aiokafka's helper: hostname checks on)."""
    for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
        path = getattr(settings, name)
        if path and not _readable(path):
            raise SecurityConfigError(f"{name.upper()}={path}: no such readable file")
    if bool(settings.kafka_ssl_cert_file) != bool(settings.kafka_ssl_key_file):
        raise SecurityConfigError("KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE go together")
    key_password = settings.kafka_ssl_key_password.get_secret_value() or None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.kafka_ssl_ca_file or None,
            certfile=settings.kafka_ssl_cert_file or None,
            keyfile=settings.kafka_ssl_key_file or None,
            password=key_password,
        )
    except ssl.SSLError as e:
        raise SecurityConfigError(f"Kafka TLS files not usable: {e}") from None
    if not settings.kafka_ssl_check_hostname:
        context.check_hostname = False
    return context


def kafka_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's security arguments for `settings` (the same for every kind of client)."""
    protocol = settings.kafka_security_protocol
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = kafka_ssl_context(settings)
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password.get_secret_value()
        if not settings.kafka_sasl_username or not password:
            raise SecurityConfigError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and "
                "KAFKA_SASL_PASSWORD"
            )
        out.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password,
        )
    return out


def kafka_common(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"chatpipe-{settings.instance_id}",
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "retry_backoff_ms": 100,
        "metadata_max_age_ms": 30_000,
        "connections_max_idle_ms": 540_000,
        **kafka_security(settings),
    }


def _bootstrap_hosts(servers: str) -> list[tuple[str, int]]:
    out = []
    for item in servers.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def _auth_text(settings: Settings) -> str:
    protocol = settings.kafka_security_protocol
    if not protocol.startswith("SASL_"):
        return protocol
    return f"{protocol} {settings.kafka_sasl_mechanism} as user {settings.kafka_sasl_username!r}"


def explain_kafka_error(error: BaseException, settings: Settings) -> str:
    """One sentence an operator can act on, for what went wrong connecting to a broker."""
    timeout = settings.kafka_connect_timeout_s
    if isinstance(error, SaslAuthenticationFailed):
        detail = str(error).rpartition("SaslAuthenticationFailed: ")[2] or type(error).__name__
        return (
            f"authentication failed ({_auth_text(settings)}): wrong user name or password, or "
            f"no such SASL user on the broker (broker: {detail})"
        )
    if isinstance(error, IllegalSaslStateError):
        return (
            f"the listener does not expect SASL ({_auth_text(settings)}): is it PLAINTEXT or SSL? "
            "check KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return f"SASL mechanism not enabled on the broker: {error}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate was not accepted ({error.verify_message}); check "
            "KAFKA_SSL_CA_FILE and KAFKA_SSL_CHECK_HOSTNAME"
        )
    if isinstance(error, ssl.SSLError):
        return (
            f"TLS handshake failed ({error.reason or error}); is the listener "
            f"{settings.kafka_security_protocol}?"
        )
    if isinstance(error, TimeoutError):
        return (
            f"no answer in time ({_auth_text(settings)}; start is bounded by "
            f"KAFKA_CONNECT_TIMEOUT_S={timeout:g}): is the broker up, and does its listener "
            "use this security protocol?"
        )
    if isinstance(error, ConnectionRefusedError):
        return "not reachable: connection refused"
    if isinstance(error, ConnectionResetError | asyncio.IncompleteReadError) or (
        isinstance(error, KafkaError) and "closed" in str(error)
    ):
        return (
            f"the broker closed the connection ({_auth_text(settings)}): the listener probably "
            "expects another security protocol; check KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(error, OSError):
        return f"not reachable: {error.strerror or type(error).__name__}"
    return f"{type(error).__name__}: {error}"


async def diagnose_kafka(settings: Settings) -> str | None:
    """Connect to each bootstrap server once, as a client does (TLS, SASL, a metadata request),
    and explain the first failure; None when every server answered. aiokafka's own start only
    logs the cause and raises a bare 'Unable to bootstrap'."""
    security = kafka_security(settings)
    bound = settings.kafka_request_timeout_ms / 1000
    for host, port in _bootstrap_hosts(settings.kafka_bootstrap_servers):
        try:
            async with asyncio.timeout(bound):
                conn = await create_conn(
                    host,
                    port,
                    client_id=f"chatpipe-probe-{settings.instance_id}",
                    request_timeout_ms=settings.kafka_request_timeout_ms,
                    **security,
                )
                try:
                    await conn.send(MetadataRequest([]))
                finally:
                    conn.close()
        except (KafkaError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            cause = e.__cause__ if isinstance(e, KafkaError) and e.__cause__ else e
            return f"{host}:{port}: {explain_kafka_error(cause, settings)}"
    return None


async def start_bounded(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    settings: Settings,
    role: str,
) -> None:
    """`await start()` within `kafka_connect_timeout_s`; on failure stop the client and raise
    `KafkaConnectFailed` with the cause found by `diagnose_kafka`."""
    timeout = settings.kafka_connect_timeout_s
    try:
        async with asyncio.timeout(timeout):
            await start()
        return
    except TimeoutError:
        error: BaseException = TimeoutError()
    except (KafkaError, OSError) as e:
        error = e
    except asyncio.CancelledError:  # a shutdown during the start: the client is not leaked
        with contextlib.suppress(Exception):
            await stop()
        raise
    with contextlib.suppress(Exception):
        await stop()
    try:
        cause = await diagnose_kafka(settings)
    except SecurityConfigError as e:
        cause = str(e)
    if cause is None:  # every broker answered the probe: report what start itself saw
        cause = f"{settings.kafka_bootstrap_servers}: {explain_kafka_error(error, settings)}"
    message = f"Kafka {role} could not start: {cause}"
    secret = settings.kafka_sasl_password.get_secret_value()
    raise KafkaConnectFailed(redact_text(message, [secret])) from None


# The broker refuses every later record of a partition once an idempotent producer's batch
# for it was lost (it expired while the broker was away: its sequence numbers have a gap), or
# once the broker forgot the producer id. The Java client then takes a new producer id; aiokafka
# 0.14 does not, so a producer would stay refused on that partition until the process restarts.
LOST_SEQUENCE = (OutOfOrderSequenceNumber, UnknownProducerId)


class Producer:
    """chatpipe's Kafka producer (every process, every topic): an idempotent AIOKafkaProducer
    whose start is bounded and explains its failures, and which is replaced by a fresh one (a
    new producer id, sequences from 0) when the broker refuses its sequence numbers.

    That replacement is the one recovery path of every producer of chatpipe (the api's, the
    ai_consumer's for chat.responses, the DLQ and the tombstones, the listener's): a send that
    fails with `LOST_SEQUENCE` starts it, sends made meanwhile wait for the fresh producer, and
    the old one is stopped in the background (what it still holds is flushed or fails).
    `send_and_wait` sends a refused record once more on the fresh producer (the broker wrote
    nothing of a refused batch); `send`'s future fails, and the caller decides.
    """

    def __init__(self, settings: Settings, **opts: Any) -> None:
        self._settings = settings
        self._opts = opts
        self._inner = AIOKafkaProducer(**opts)
        self._renewing: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self.renewals = 0  # how many times the producer was replaced

    @property
    def client(self) -> Any:
        """The current producer's cluster client (metadata)."""
        return self._inner.client

    async def start(self) -> None:
        await start_bounded(self._inner.start, self._inner.stop, self._settings, "producer")

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        await self._inner.stop()
        await asyncio.gather(*self._retired, return_exceptions=True)

    async def partitions_for(self, topic: str) -> set[int]:
        await self._ready()
        partitions: set[int] = await self._inner.partitions_for(topic)
        return partitions

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Enqueue one record; the future resolves with its RecordMetadata once acked."""
        await self._ready()
        inner = self._inner
        future: asyncio.Future[Any] = await inner.send(
            topic, value, key=key, partition=partition, timestamp_ms=timestamp_ms, headers=headers
        )
        future.add_done_callback(functools.partial(self._check, inner))
        return future

    def create_batch(self) -> Any:
        """An empty aiokafka BatchBuilder (public API: `append(key=, value=, timestamp=,
        headers=)` returns None once it is full) for `send_batch`."""
        return self._inner.create_batch()

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        """Enqueue a batch of records for one partition, after the partition's batches enqueued
        before it (it waits until the last of them has left); the future resolves once the
        broker acked the whole batch. One future per batch instead of one per record."""
        await self._ready()
        inner = self._inner
        future: asyncio.Future[Any] = await inner.send_batch(batch, topic, partition=partition)
        future.add_done_callback(functools.partial(self._check, inner))
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        """Send one record and wait for its ack; a record refused for lost sequence numbers is
        sent once more, on the fresh producer."""
        for attempt in (1, 2):
            future = await self.send(topic, value, key, partition, timestamp_ms, headers)
            try:
                return await future
            except LOST_SEQUENCE:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _ready(self) -> None:
        """Wait while the producer is being replaced."""
        if self._renewing is not None:
            await asyncio.shield(self._renewing)

    def _check(self, inner: AIOKafkaProducer, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or not isinstance(future.exception(), LOST_SEQUENCE):
            return
        if inner is self._inner and self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(
                self._renew(inner), name="kafka-producer-renew"
            )

    async def _renew(self, failed: AIOKafkaProducer) -> None:
        log.warning(
            "Kafka refused our sequence numbers (a batch was lost while the broker was away): "
            "replacing the producer (a new producer id)"
        )
        delay = 0.5
        try:
            while True:
                fresh = AIOKafkaProducer(**self._opts)
                try:
                    await start_bounded(fresh.start, fresh.stop, self._settings, "producer")
                    break
                except KafkaConnectFailed as e:
                    log.warning("fresh producer could not start, retrying in %.1fs: %s", delay, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self._inner = fresh
            self.renewals += 1
        finally:
            self._renewing = None
        retire = asyncio.get_running_loop().create_task(failed.stop(), name="kafka-producer-retire")
        self._retired.add(retire)
        retire.add_done_callback(self._retired.discard)


class Consumer(AIOKafkaConsumer):  # type: ignore[misc]
    """AIOKafkaConsumer whose start is bounded and explains its failures."""

    def __init__(self, settings: Settings, *topics: str, **opts: Any) -> None:
        super().__init__(*topics, **opts)
        self._chatpipe_settings = settings

    async def start(self) -> None:
        await start_bounded(super().start, self.stop, self._chatpipe_settings, "consumer")


class Admin(AIOKafkaAdminClient):  # type: ignore[misc]
    """AIOKafkaAdminClient whose start is bounded and explains its failures."""

    def __init__(self, settings: Settings, **opts: Any) -> None:
        super().__init__(**opts)
        self._chatpipe_settings = settings

    async def start(self) -> None:
        await start_bounded(super().start, self.close, self._chatpipe_settings, "admin client")


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """Idempotent producer, acks=all: a 202 and a chunk mean 'in Kafka on every in-sync replica'."""
    opts: dict[str, Any] = {
        **kafka_common(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "max_request_size": 11 * 1024 * 1024,  # the DLQ forwards records up to 10 MiB whole
        "compression_type": None,
    }
    opts.update(overrides)
    return Producer(settings, **opts)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    opts: dict[str, Any] = {
        **kafka_common(settings),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": 100,
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": 1_000,
        "isolation_level": "read_uncommitted",
    }
    opts.update(overrides)
    return Consumer(settings, *topics, **opts)


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return Admin(
        settings,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"chatpipe-admin-{settings.instance_id}",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **kafka_security(settings),
    )


# --- Redis -----------------------------------------------------------------------------------


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def redis_options(settings: Settings) -> dict[str, Any]:
    """Credentials and TLS files for redis-py. A user or password written in REDIS_URL wins
    over REDIS_USERNAME / REDIS_PASSWORD (redis-py lets the URL override keyword arguments)."""
    opts: dict[str, Any] = {}
    if settings.redis_username:
        opts["username"] = settings.redis_username
    password = settings.redis_password.get_secret_value()
    if password:
        opts["password"] = password
    files = {
        "ssl_ca_certs": settings.redis_ssl_ca_file,
        "ssl_certfile": settings.redis_ssl_cert_file,
        "ssl_keyfile": settings.redis_ssl_key_file,
    }
    tls = urlsplit(settings.redis_url).scheme == "rediss"
    if not tls:
        used = [k for k, v in files.items() if v]
        if used:
            raise SecurityConfigError(
                f"REDIS_SSL_* files are set but REDIS_URL is {redact_url(settings.redis_url)}: "
                "TLS needs a rediss:// URL"
            )
        return opts
    for key, path in files.items():
        if path:
            if not _readable(path):
                raise SecurityConfigError(f"Redis TLS file {path} ({key}): no such readable file")
            opts[key] = path
    opts["ssl_check_hostname"] = settings.redis_ssl_check_hostname
    return opts


def make_redis(
    settings: Settings, *, max_connections: int | None = None, socket_timeout: float | None = None
) -> Redis:
    """One pool per process, blocking when exhausted (redis-py's default pool raises instead).
    With REDIS_CLUSTER: redis-py's cluster client from the URL of any node (`make_cluster`)."""
    if settings.redis_cluster:
        return make_cluster(
            settings, max_connections=max_connections, socket_timeout=socket_timeout
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=10,
        decode_responses=False,
        **redis_options(settings),
    )
    use_hiredis_packing(pool)  # perf: commands packed in C (docs/benchmarks.md)
    return Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


# A cluster client's pool per node raises when it is exhausted (it cannot block): each node
# gets this many times the single-Redis pool, which chatpipe's batching never comes near.
CLUSTER_POOL_FACTOR = 4


def make_cluster(
    settings: Settings, *, max_connections: int | None = None, socket_timeout: float | None = None
) -> Redis:
    """redis-py's Redis Cluster client (it finds every node from the one REDIS_URL names, and
    follows MOVED/ASK and failovers). It offers the command, pipeline and script API chatpipe
    uses on a single Redis; it is typed as `Redis` for the code that takes either (where the
    two differ, chatpipe asks `is_cluster`). Every multi-key command chatpipe sends names keys
    of one hash slot (chatpipe/keys.py)."""
    cluster = RedisCluster.from_url(
        settings.redis_url,
        max_connections=CLUSTER_POOL_FACTOR * (max_connections or settings.redis_max_connections),
        socket_connect_timeout=2,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=10,
        decode_responses=False,
        **redis_options(settings),
    )
    return cast(Redis, cluster)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


async def redis_run_ids(redis: Redis) -> frozenset[str]:
    """The run ids of the Redis servers that hold chatpipe's keys: one for a single Redis, one
    per primary for a cluster. A new one means a server restarted (perhaps without its data)
    or a replica was promoted (perhaps without the primary's latest writes)."""
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        found = await cluster.info("server", target_nodes=RedisCluster.PRIMARIES)
        return frozenset(str(info.get("run_id")) for info in found.values())
    info = await redis.info("server")
    return frozenset({str(info.get("run_id"))})


def _redis_user(settings: Settings) -> str:
    return urlsplit(settings.redis_url).username or settings.redis_username or "default"


def explain_redis_error(error: BaseException, settings: Settings) -> str | None:
    """A sentence for the Redis errors that retrying cannot fix (a refused login, a denied
    command, a TLS failure); None for the others (down, restarting, slow)."""
    where = redact_url(settings.redis_url)
    if isinstance(error, AuthenticationError) or (
        isinstance(error, ResponseError) and str(error).startswith(("WRONGPASS", "NOAUTH"))
    ):
        return (
            f"Redis at {where} refused the login of user {_redis_user(settings)!r}: wrong user "
            f"name or password, or the ACL user is disabled ({error})"
        )
    if isinstance(error, NoPermissionError):
        return f"Redis at {where}: ACL user {_redis_user(settings)!r} lacks a permission ({error})"
    text = str(error)
    if "SSL" in text or "certificate" in text:
        return f"Redis at {where}: TLS failed ({text})"
    return None


async def verify_redis(redis: Redis, settings: Settings, timeout_s: float = 5.0) -> None:
    """PING once at start: a refused login (or TLS failure) raises `RedisConnectFailed`;
    Redis merely down or slow is only logged (the processes ride out Redis restarts)."""
    try:
        async with asyncio.timeout(timeout_s):
            await redis.ping()
    except (RedisError, OSError, TimeoutError) as e:
        fatal = explain_redis_error(e, settings)
        secrets = [settings.redis_password.get_secret_value()]
        if fatal is not None:
            raise RedisConnectFailed(redact_text(fatal, secrets)) from None
        log.warning(
            "Redis at %s not reachable at start (%s); retrying as we go",
            redact_url(settings.redis_url),
            redact_text(f"{type(e).__name__}: {e}", secrets),
        )


# --- the api's producer ------------------------------------------------------------------------


class ProducerHandle:
    """A producer that may start after the process: the api comes up while Kafka is down and
    answers 503 until a producer connects (retried in the background), instead of crashing."""

    def __init__(self, factory: Callable[[], Producer], retry_s: float = 1.0) -> None:
        self._factory = factory
        self._retry_s = retry_s
        self._producer: Producer | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error = "not started"

    async def _try_start(self) -> bool:
        producer = self._factory()
        try:
            await producer.start()
        except Exception as e:
            # KafkaConnectFailed already says why (wrong password, TLS, unreachable)
            self.last_error = str(e) if isinstance(e, ChatpipeError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                await producer.stop()
            return False
        self._producer = producer
        return True

    async def start(self) -> None:
        if not await self._try_start():
            log.warning(
                "Kafka not reachable at start (%s); retrying in the background", self.last_error
            )
            self._task = asyncio.create_task(self._retry(), name="kafka-producer-start")

    async def _retry(self) -> None:
        while not await self._try_start():  # noqa: ASYNC110 - retrying a connection, nothing to wait on
            await asyncio.sleep(self._retry_s)
        log.info("Kafka producer connected")

    def get(self) -> Producer:
        if self._producer is None:
            raise Unavailable(f"kafka: not connected ({self.last_error})")
        return self._producer

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
