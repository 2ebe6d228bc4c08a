"""Observability across real processes: /metrics on every process with values that move when a
chat streams and is cancelled, one message's log lines found by its id in every process, and
the W3C traceparent carried from POST /api/chat through chat.requests to chat.responses
(passed through unchanged without OpenTelemetry; continued by spans with it).

The module's cluster is the e2e default (2 api, 3 ai_consumer, 1 cancel_listener; 100 ms per
token, 300 ms to the first token) with short leases and group sessions, so the last test can
kill a consumer mid-stream and see another take the message over; the ai_consumers and the
listener serve /metrics on a free port each (METRICS_PORT=0) and log it, which
`Proc.metrics_url` reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.records import foreign_producer, of_message, read_responses, terminal
from tests.interop.stack import headers_of, read_topic
from tests.support.cluster import Cluster, new_session
from tests.support.procs import Proc
from tests.support.services import Services
from tests.support.sse import chunks
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

# what each kind of process must expose (the metric families' names, without _total etc.)
EXPECTED = {
    "api": {
        "chatpipe_http_requests",
        "chatpipe_sse_clients",
        "chatpipe_sse_events",
        "chatpipe_cancel_requests",
    },
    "ai_consumer": {
        "chatpipe_time_to_first_token_seconds",
        "chatpipe_chunks",
        "chatpipe_cancel_latency_seconds",
        "chatpipe_active_streams",
        "chatpipe_lane_backlog",
        "chatpipe_partition_backlog",
        "chatpipe_consumer_lag",
        "chatpipe_dlq_records",
        "chatpipe_lease_takeovers",
        "chatpipe_messages",
        "chatpipe_cancels_seen",
        "chatpipe_cancels_interrupted",
    },
    "cancel_listener": {"chatpipe_cancels_seen", "chatpipe_cancels_mirrored"},
}


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    # a killed consumer's partitions move after 6 s (the broker's minimum session timeout)
    # and its leases lapse after 3 s: the takeover test waits seconds, not half a minute
    return {**DEFAULT_ENV, "lease_ms": 3000, "kafka_session_timeout_ms": 6000}


async def scrape(client: httpx.AsyncClient, proc: Proc) -> tuple[set[str], Samples]:
    """The metric family names and every sample of one process's /metrics."""
    response = await client.get(proc.metrics_url)
    assert response.status_code == 200, f"{proc.name} {proc.metrics_url}: {response.status_code}"
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


async def scrape_all(client: httpx.AsyncClient, procs: list[Proc]) -> dict[str, Samples]:
    out = {}
    for p in procs:
        _, samples = await scrape(client, p)
        out[p.name] = samples
    return out


def total(snapshot: dict[str, Samples], name: str, **labels: str) -> float:
    """The sum of sample `name` over every process of `snapshot` and every label set that
    contains `labels`."""
    return sum(
        value
        for samples in snapshot.values()
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def of_kind(cluster: Cluster, kind: str) -> list[Proc]:
    return [p for p in cluster.procs if p.member and p.kind == kind]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


async def test_every_process_serves_its_metrics(cluster: Cluster, http: httpx.AsyncClient) -> None:
    ports = set()
    for proc in cluster.procs:
        if not proc.member:
            continue
        families, _ = await scrape(http, proc)
        missing = EXPECTED[proc.kind] - families
        assert not missing, f"{proc.name} ({proc.kind}) lacks {sorted(missing)}"
        ports.add(proc.metrics_url)
    # three consumers and a listener on one host: each found a port of its own
    assert len(ports) == len([p for p in cluster.procs if p.member])


async def test_metrics_move_when_a_chat_streams_and_is_cancelled(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, http: httpx.AsyncClient
) -> None:
    a, b = apis
    consumers = of_kind(cluster, "ai_consumer")
    everyone = [p for p in cluster.procs if p.member]
    before = await scrape_all(http, everyone)

    # one answer streamed to its end
    session = new_session()
    done = await a.chat(session, max_tokens=5)
    async with b.stream(done["message_id"]) as stream:
        events = await stream.until_done(within=15)
    assert events[-1].json()["status"] == "completed"

    # one long answer, with a second message of its session waiting behind it in its lane
    session = new_session()
    long = await a.chat(session)
    queued = await a.chat(session, max_tokens=3)
    async with a.stream(long["message_id"]) as stream:
        stream.record()
        await stream.wait_for(lambda evs: bool(chunks(evs)), within=10, what="a chunk")

        async def busy() -> dict[str, Samples] | None:
            now = await scrape_all(http, consumers)
            streaming = total(now, "chatpipe_active_streams") >= 1
            waiting = total(now, "chatpipe_lane_backlog") >= 1
            # uncommitted records, refreshed by the commit loop every COMMIT_INTERVAL_MS
            uncommitted = total(now, "chatpipe_partition_backlog") >= 1
            return now if streaming and waiting and uncommitted else None

        await apoll("a stream running with a request waiting in its lane", busy, within=10)
        answer = await b.cancel(session, long["message_id"])
        assert answer.json()["status"] == "cancelled", answer.text
        last = await stream.wait_done(within=10)
    assert last.json()["status"] == "cancelled"
    async with a.stream(queued["message_id"]) as stream:
        await stream.until_done(within=15)

    # one record nobody can parse: to the DLQ
    async with foreign_producer(settings) as producer:
        await producer.send_and_wait(settings.requests_topic, b"{not json", key=b"garbage")

    async def settled() -> dict[str, Samples] | None:
        now = await scrape_all(http, everyone)
        idle = total(now, "chatpipe_active_streams") == 0 == total(now, "chatpipe_sse_clients")
        dlq = total(now, "chatpipe_dlq_records_total") > total(before, "chatpipe_dlq_records_total")
        mirrored = total(now, "chatpipe_cancels_mirrored_total") > total(
            before, "chatpipe_cancels_mirrored_total"
        )
        return now if idle and dlq and mirrored else None

    after = await apoll("the metrics to settle", settled, within=15)

    def moved(name: str, by: float = 1, **labels: str) -> None:
        was, now = total(before, name, **labels), total(after, name, **labels)
        assert now - was >= by, f"{name}{labels or ''}: {was} -> {now}, expected +{by}"

    # api: requests, SSE events, the cancel
    moved("chatpipe_http_requests_total", 5)
    moved("chatpipe_sse_events_total", 5, event="chunk")
    moved("chatpipe_cancel_requests_total", status="cancelled")
    # ai_consumer: first tokens, chunks, ends, the cancel's latency, the DLQ, commits
    moved("chatpipe_time_to_first_token_seconds_count", 3)
    moved("chatpipe_chunks_total", 5 + 1 + 3)
    moved("chatpipe_messages_total", 2, state="completed")
    moved("chatpipe_messages_total", state="cancelled")
    moved("chatpipe_cancel_latency_seconds_count")
    moved("chatpipe_dlq_records_total")
    moved("chatpipe_offset_commits_total")
    moved("chatpipe_cancels_seen_total", len(consumers), source="live")  # embedded listeners
    # the standalone listener read the cancel record and mirrored it
    listeners = {p.name for p in of_kind(cluster, "cancel_listener")}
    assert listeners
    mirrored_before = {k: v for k, v in before.items() if k in listeners}
    mirrored_after = {k: v for k, v in after.items() if k in listeners}
    assert total(mirrored_after, "chatpipe_cancels_seen_total", source="live") > total(
        mirrored_before, "chatpipe_cancels_seen_total", source="live"
    )
    # the gauges came back down once nothing ran
    assert total(after, "chatpipe_active_streams") == 0
    assert total(after, "chatpipe_sse_clients") == 0
    # every partition's lag is reported by the consumer that owns it
    lagged = {
        dict(labels)["partition"]
        for samples in (after[p.name] for p in consumers)
        for (name, labels), _ in samples.items()
        if name == "chatpipe_consumer_lag"
    }
    assert lagged, "no consumer reports chatpipe_consumer_lag"


async def test_one_message_can_be_followed_across_processes_by_its_id(
    cluster: Cluster, apis: tuple[Api, Api]
) -> None:
    a, b = apis
    session = new_session()
    accepted = await a.chat(session)
    message_id = accepted["message_id"]
    async with a.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(lambda evs: bool(chunks(evs)), within=10, what="a chunk")
        assert (await b.cancel(session, message_id)).json()["status"] == "cancelled"
        await stream.wait_done(within=10)

    def mine(line: dict[str, object]) -> bool:
        return line.get("message_id") == message_id

    # the consumer logs the end, the listener the mirrored cancel: wait for both lines
    listener = of_kind(cluster, "cancel_listener")[0]
    await listener.log_line(mine, within=10)

    async def owner_logged() -> Proc | None:
        return _owner(of_kind(cluster, "ai_consumer"), message_id)

    owner = await apoll("the consumer's line about the message's end", owner_logged, within=10)

    found: dict[str, list[dict[str, object]]] = {}
    for proc in cluster.procs:
        lines = proc.find(mine)
        for line in lines:
            # every line about the message names the process and the session too
            assert line.get("session_id") == session, line
            assert line.get("instance_id") == proc.instance_id, line
            assert line.get("service") == proc.kind, line
        if lines:
            found[proc.name] = lines
        # a line that mentions the id in its text carries it as a field as well
        loose = [
            line
            for line in proc.lines()
            if message_id in str(line.get("msg", "")) and not mine(line)
        ]
        assert not loose, f"{proc.name}: lines naming {message_id} without the field: {loose}"
    kinds = {cluster_proc.kind for cluster_proc in cluster.procs if cluster_proc.name in found}
    assert kinds == {"api", "ai_consumer", "cancel_listener"}, found.keys()
    api_msgs = [str(line["msg"]) for name in (a.name, b.name) for line in found.get(name, [])]
    assert "chat queued" in api_msgs, api_msgs
    assert "cancel accepted" in api_msgs, api_msgs
    assert any(str(line["msg"]) == "message cancelled" for line in found[owner.name])


def _owner(consumers: list[Proc], message_id: str) -> Proc | None:
    for proc in consumers:
        if proc.find(
            lambda line: (
                line.get("message_id") == message_id
                and str(line.get("msg", "")).startswith("message ")
            )
        ):
            return proc
    return None


async def request_headers(settings: Settings, session: str, message_id: str) -> dict[str, str]:
    """The headers of the chat.requests record of `message_id` (key = its session); called
    after the 202, which the api answers once the record is acked."""
    for r in await read_topic(settings, settings.requests_topic):
        if (
            r.key == session.encode()
            and r.value is not None
            and json.loads(r.value).get("message_id") == message_id
        ):
            return headers_of(r)
    raise AssertionError(f"no chat.requests record of {message_id}")


async def traced_chat(api_url: str, settings: Settings) -> tuple[str, dict[str, str], list[str]]:
    """POST /api/chat with TRACEPARENT; returns the request record's traceparent and those of
    the message's chat.responses records (started, chunks, terminal)."""
    session = new_session()
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        answer = await client.post(
            "/api/chat",
            json={"session_id": session, "message": "trace me", "options": {"max_tokens": 3}},
            headers={"traceparent": TRACEPARENT},
        )
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["message_id"]
    headers = await request_headers(settings, session, message_id)
    events = await read_responses(settings, {session}, lambda evs: bool(terminal(evs, message_id)))
    mine = of_message(events, message_id)
    assert mine[0]["type"] == "chat.started", mine
    assert terminal(mine)
    return message_id, headers, [e["_headers"].get("traceparent", "") for e in mine]


async def test_traceparent_passes_through_unchanged_without_opentelemetry(
    cluster: Cluster, settings: Settings
) -> None:
    assert not cluster.env.get("otel_enabled")
    _, request, responses = await traced_chat(cluster.urls[0], settings)
    assert request.get("traceparent") == TRACEPARENT
    assert responses
    assert set(responses) == {TRACEPARENT}, responses


@pytest.fixture(scope="module")
def otel_cluster(
    real_services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A small cluster of its own (1 api, 1 ai_consumer) with OpenTelemetry on."""
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        pytest.skip("the otel extra is not installed (pip install -e '.[otel]')")
    from chatpipe.clients import make_admin
    from chatpipe.topics import ensure_topics, topic_specs
    from tests.conftest import namespace
    from tests.e2e.conftest import DEFAULT_ENV, run_async

    ns = namespace()
    settings = Settings(
        kafka_bootstrap_servers=real_services.kafka,
        redis_url=real_services.redis_url,
        topic_prefix=f"{ns}.",
        key_prefix=f"{ns}:",
        consumer_group=f"{ns}-ai",
        topic_partitions=3,
    )

    async def admin_do(create: bool) -> None:
        admin = make_admin(settings)
        await admin.start()
        try:
            if create:
                await ensure_topics(admin, settings)
            else:
                await admin.delete_topics([t.name for t in topic_specs(settings)])
        finally:
            await admin.close()

    run_async(lambda: admin_do(True))
    # spans are made and propagated, exported nowhere (no collector here)
    env = {**DEFAULT_ENV, "otel_enabled": True, "otel_traces_exporter": "none"}
    workdir: Path = tmp_path_factory.mktemp(f"otel-{ns}")
    try:
        with Cluster(settings, workdir, apis=1, consumers=1, listener=False, env=env).running(
            timeout=60
        ) as running:
            yield running
    finally:
        with contextlib.suppress(Exception):
            run_async(lambda: admin_do(False))


async def test_traceparent_is_continued_by_spans_with_opentelemetry(
    otel_cluster: Cluster,
) -> None:
    settings = otel_cluster.settings
    for proc in otel_cluster.procs:
        await proc.log_line(lambda line: str(line.get("msg", "")).startswith("OpenTelemetry"))
    _, request, responses = await traced_chat(otel_cluster.urls[0], settings)

    def parts(traceparent: str) -> list[str]:
        version, trace_id, span_id, flags = traceparent.split("-")
        assert (version, len(span_id), flags) == ("00", 16, "01"), traceparent
        return [trace_id, span_id]

    # the api's span: same trace, a span of its own
    trace_id, api_span = parts(request["traceparent"])
    assert trace_id == TRACE_ID
    assert api_span != PARENT_ID
    # the consumer's span per message: same trace, one span of its own on every record
    assert len(set(responses)) == 1, responses
    trace_id, consumer_span = parts(responses[0])
    assert trace_id == TRACE_ID
    assert consumer_span not in (PARENT_ID, api_span)


async def test_a_lease_takeover_is_counted_by_the_consumer_that_takes_over(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    """Last in the module: it kills one of the cluster's consumers."""
    a, _ = apis
    session = new_session()
    message_id = (await a.chat(session, max_tokens=30))["message_id"]
    async with a.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(lambda evs: bool(chunks(evs)), within=10, what="a chunk")
        msg = Keys.from_settings(settings).msg(session, message_id)
        owner_id = (await redis.hget(msg, "owner")) or b""
        owner = cluster.by_instance(owner_id.decode())
        survivors = [p for p in of_kind(cluster, "ai_consumer") if p is not owner]
        async with httpx.AsyncClient(timeout=5) as http:
            before = await scrape_all(http, survivors)
            cluster.retire(owner)
            owner.kill()
            done = await stream.wait_done(within=40)
            after = await scrape_all(http, survivors)
    assert done.json()["status"] == "completed"
    assert any(e.event == "restart" for e in stream.events), [e.event for e in stream.events]
    assert total(after, "chatpipe_lease_takeovers_total") >= 1 + total(
        before, "chatpipe_lease_takeovers_total"
    )
