"""Auth, ownership, stream tokens and limits across real processes (2 api, 3 ai_consumer, 1
cancel_listener) with AUTH_MODE=jwt: another user cannot read, cancel or write into a session,
neither over HTTP nor with records produced straight to Kafka, and the per-user limits hold
across both api instances.

Every test uses users of its own (uuid suffixes), so the per-user limits of one test do not
touch another's. The simulator answers in ~4.3 s (40 tokens, 100 ms apart, 300 ms first).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from chatpipe.tokens import StreamTokens, stream_key
from tests.e2e.conftest import DEFAULT_ENV
from tests.e2e.records import foreign_producer, of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEError, SSEStream, chunks, dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

SECRET = "e2e-shared-jwt-secret-of-at-least-32-bytes"
TOKENS = 40
RATE = 5  # chat messages per user per minute
STREAMS = 2  # open streams per user


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "auth_mode": "jwt",
        "jwt_secret": SECRET,
        "rate_limit_per_minute": RATE,
        "max_streams_per_user": STREAMS,
    }


def bearer(user: str, ttl_s: int = 600) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, SECRET, algorithm="HS256")


def new_user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


Clients = Callable[[str | None], list[httpx.AsyncClient]]


@pytest.fixture
async def as_user(cluster: Cluster) -> AsyncIterator[Clients]:
    """`as_user(name)`: one client per api instance, sending name's bearer token (None: no
    credentials, as an EventSource holding only a stream_url)."""
    async with contextlib.AsyncExitStack() as stack:

        def clients(user: str | None) -> list[httpx.AsyncClient]:
            headers = {"Authorization": f"Bearer {bearer(user)}"} if user else {}
            out = []
            for proc in cluster.api_procs[:2]:
                client = httpx.AsyncClient(
                    base_url=proc.url, headers=headers, timeout=httpx.Timeout(10.0, read=30.0)
                )
                stack.push_async_callback(client.aclose)
                out.append(client)
            return out

        yield clients


async def chat(client: httpx.AsyncClient, session: str, **extra: Any) -> dict[str, Any]:
    response = await client.post(
        "/api/chat", json={"session_id": session, "message": "hi", **extra}
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def status_of(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    """The status and body of a request whose success would be an SSE stream (not read)."""
    async with client.stream(method, url, **kw) as response:
        if response.status_code != 200:
            await response.aread()
        return response


async def opens(client: httpx.AsyncClient, url: str, refused: int) -> None:
    """Poll until `url` opens as a stream (a freed slot is freed when the server sees the
    client gone, a moment after it closed), while it answers `refused`."""

    async def check() -> bool | None:
        response = await status_of(client, "GET", url)
        if response.status_code == 200:
            return True
        assert response.status_code == refused, response.text
        return None

    await apoll(f"{url} to open again", check, within=10, interval=0.1)


def assert_whole_answer(events: list[Any]) -> None:
    seqs = [e.seq for e in chunks(events)]
    assert seqs == list(range(1, TOKENS + 1)), f"chunks not 1..{TOKENS}: {seqs}"
    assert [e.event for e in events if e.event not in ("chunk", "done")] == [], events
    assert [d.json()["status"] for d in dones(events)] == ["completed"]


# --- 1. ownership over HTTP ----------------------------------------------------------------
async def test_another_user_cannot_stream_cancel_or_post_into_a_session(
    as_user: Clients, settings: Settings, redis: Redis
) -> None:
    alice_name = new_user("alice")
    alice, bob, anonymous = as_user(alice_name), as_user(new_user("bob")), as_user(None)
    session = new_session()
    accepted = await chat(alice[0], session)
    mid = accepted["message_id"]
    url = f"/api/chat/{mid}/stream"
    assert accepted["stream_url"].startswith(f"{url}?token=")
    keys = Keys.from_settings(settings)

    # alice reads it on the other instance with the stream token alone (as an EventSource)
    async with SSEStream(anonymous[1], accepted["stream_url"]) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) >= 1, within=15, what="a chunk")
        msg_before = await redis.hgetall(keys.msg(session, mid))
        for client in bob:  # bob knows the session and message ids, on both instances
            cancel = await client.post(
                "/api/cancel", json={"session_id": session, "message_id": mid}
            )
            assert cancel.status_code == 403, cancel.text
            assert "another user" in cancel.json()["detail"]
            seed_cancel = await client.post(
                "/cancel", json={"session_id": session, "message_id": mid}
            )
            assert seed_cancel.status_code == 403
            assert (await status_of(client, "GET", url)).status_code == 403
            post = await client.post("/api/chat", json={"session_id": session, "message": "mine"})
            assert post.status_code == 403, post.text
            reuse = await client.post(
                "/api/chat", json={"session_id": new_session(), "message": "x", "message_id": mid}
            )
            assert reuse.status_code == 403, reuse.text
            if client is bob[0]:  # (bob's 5th message of the minute: the rate limit is 5)
                direct = await status_of(
                    client, "POST", "/api/chat/stream", json={"session_id": session, "message": "x"}
                )
                assert direct.status_code == 403
        # a body user_id is never trusted over the token
        spoof = await alice[0].post(
            "/api/chat", json={"session_id": new_session(), "message": "x", "user_id": "someone"}
        )
        assert spoof.status_code == 403, spoof.text
        # no credentials at all
        for client in anonymous:
            refused = await status_of(client, "GET", url)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            no_auth = await client.post(
                "/api/cancel", json={"session_id": session, "message_id": mid}
            )
            assert no_auth.status_code == 401

        # nothing bob did changed alice's message, session or stream
        assert not await redis.exists(keys.cancel(session, mid))
        assert await redis.get(keys.owner(session)) == alice_name.encode()
        after = await redis.hgetall(keys.msg(session, mid))
        assert after.get(b"cancel_requested") is None
        assert after[b"user"] == msg_before[b"user"]
        await stream.wait_done(within=30)
        assert_whole_answer(stream.events)

    # alice still can: her bearer on the other instance, a second message, and its cancel
    async with SSEStream(alice[1], url) as again:
        assert_whole_answer(await again.until_done(within=10))
    second = await chat(alice[1], session)
    cancelled = await alice[0].post(
        "/api/cancel", json={"session_id": session, "message_id": second["message_id"]}
    )
    assert cancelled.json()["status"] == "cancelled", cancelled.text


# --- 1. ownership over Kafka (the Spring frontend's path) ---------------------------------
async def test_foreign_records_on_kafka_change_nothing(
    as_user: Clients, cluster: Cluster, settings: Settings
) -> None:
    alice_name, bob_name = new_user("alice"), new_user("bob")
    alice, anonymous = as_user(alice_name), as_user(None)
    session = new_session()
    accepted = await chat(alice[0], session)
    mid = accepted["message_id"]
    bob_mid, alice_kafka_mid = f"m-bob-{uuid.uuid4().hex[:8]}", f"m-a-{uuid.uuid4().hex[:8]}"

    async with SSEStream(anonymous[1], accepted["stream_url"]) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) >= 1, within=15, what="a chunk")
        async with foreign_producer(settings) as producer:

            async def send(topic: str, key: str, value: dict[str, Any]) -> None:
                await producer.send_and_wait(topic, json.dumps(value).encode(), key=key.encode())

            cancel_key = f"{session}:{mid}"
            # bob's cancel of alice's streaming message, and one with no user at all
            await send(
                settings.cancels_topic,
                cancel_key,
                {"type": "chat.cancel", "sessionId": session, "messageId": mid, "userId": bob_name},
            )
            await send(
                settings.cancels_topic, cancel_key, {"session_id": session, "message_id": mid}
            )
            # bob's request into alice's session, then alice's own request there, cancelled
            # by her own cancel record before it starts (it queues behind her first message)
            await send(
                settings.requests_topic,
                session,
                {"messageId": bob_mid, "sessionId": session, "userId": bob_name, "message": "x"},
            )
            await send(
                settings.requests_topic,
                session,
                {
                    "message_id": alice_kafka_mid,
                    "session_id": session,
                    "user_id": alice_name,
                    "message": "y",
                },
            )
            await send(
                settings.cancels_topic,
                f"{session}:{alice_kafka_mid}",
                {"session_id": session, "message_id": alice_kafka_mid, "user_id": alice_name},
            )

        # both foreign cancels were read and ignored, by the standalone listener and by the
        # listener embedded in every ai_consumer (the one streaming alice's answer included)
        for proc in cluster.listener_procs + cluster.consumer_procs:
            await proc.log_line(
                lambda line: line.get("message_id") == mid and "ignored" in str(line.get("msg")),
                within=10,
            )
        await stream.wait_done(within=30)
        assert_whole_answer(stream.events)

    seen = await read_responses(
        settings,
        {session},
        lambda evs: all(terminal(evs, m) for m in (mid, bob_mid, alice_kafka_mid)),
        within=30,
    )
    assert [e["type"] for e in terminal(seen, mid)] == ["chat.completed"]
    assert len([e for e in of_message(seen, mid) if e["type"] == "chat.chunk"]) == TOKENS
    bob_end = terminal(seen, bob_mid)
    assert [(e["type"], e.get("reason")) for e in bob_end] == [("chat.failed", "forbidden")]
    assert [e["type"] for e in of_message(seen, bob_mid)] == ["chat.failed"]  # never streamed
    assert [e["type"] for e in terminal(seen, alice_kafka_mid)] == ["chat.cancelled"]


# --- ids that contain the key separator ----------------------------------------------------
async def test_a_cancel_cannot_reach_another_users_message_through_a_colon_in_the_ids(
    as_user: Clients, settings: Settings, redis: Redis
) -> None:
    """Session `b:42` + message `abc` (alice) and session `b` + message `42:abc` (mallory)
    joined with ':' name one key; mallory's cancel of hers must not cancel alice's answer."""
    alice, mallory = as_user(new_user("alice")), as_user(new_user("mallory"))
    base, tail = new_session(), f"abc{uuid.uuid4().hex[:6]}"
    alice_session, alice_mid = f"{base}:42", tail
    mallory_session, mallory_mid = base, f"42:{tail}"
    # mallory's message waits in her session's lane behind a long answer, and she cancels it
    blocker = await chat(mallory[0], mallory_session)
    await chat(mallory[0], mallory_session, message_id=mallory_mid)
    cancelled = await mallory[1].post(
        "/api/cancel", json={"session_id": mallory_session, "message_id": mallory_mid}
    )
    assert cancelled.json()["status"] == "cancelled", cancelled.text

    # alice's message, sent after that, is answered whole
    accepted = await chat(alice[1], alice_session, message_id=alice_mid)
    async with SSEStream(alice[0], f"/api/chat/{accepted['message_id']}/stream") as stream:
        assert_whole_answer(await stream.until_done(within=30))
    # mallory's ended cancelled, with no chunk (her long answer before it is stopped too)
    await mallory[0].post(
        "/api/cancel", json={"session_id": mallory_session, "message_id": blocker["message_id"]}
    )
    async with SSEStream(mallory[1], f"/api/chat/{mallory_mid}/stream") as stream:
        events = await stream.until_done(within=30)
    assert chunks(events) == []
    assert [d.json()["status"] for d in dones(events)] == ["cancelled"]
    keys = Keys.from_settings(settings)
    assert keys.cancel(alice_session, alice_mid) != keys.cancel(mallory_session, mallory_mid)


async def test_another_users_session_cancel_or_interrupt_is_refused_and_changes_nothing(
    as_user: Clients,
) -> None:
    """Issue 14: the session routes are owner-only like the rest."""
    alice, mallory = as_user(new_user("alice")), as_user(new_user("mallory"))
    session = new_session()
    accepted = await chat(alice[0], session)
    refused = await mallory[1].post(f"/api/sessions/{session}/cancel")
    assert refused.status_code == 403, refused.text
    interrupt = {"session_id": session, "message": "mine now", "if_busy": "interrupt"}
    refused = await mallory[0].post("/api/chat", json=interrupt)
    assert refused.status_code == 403, refused.text
    refused = await mallory[1].delete(f"/api/sessions/{session}")
    assert refused.status_code == 403, refused.text
    async with SSEStream(alice[1], f"/api/chat/{accepted['message_id']}/stream") as stream:
        assert_whole_answer(await stream.until_done(within=30))  # untouched
    # the conversation is the owner's only: Mallory reads nothing of it, Alice all of it
    refused = await mallory[1].get(f"/api/sessions/{session}/messages")
    assert refused.status_code == 403, refused.text
    assert "answer" not in refused.text
    mine = await alice[1].get(f"/api/sessions/{session}/messages")
    assert [t["message_id"] for t in mine.json()["messages"]] == [accepted["message_id"]]


# --- 2. stream tokens ----------------------------------------------------------------------
async def test_stream_tokens_expired_tampered_or_for_another_message_are_rejected(
    as_user: Clients,
) -> None:
    alice_name = new_user("alice")
    alice, anonymous = as_user(alice_name), as_user(None)
    session = new_session()
    first = await chat(alice[0], session, options={"max_tokens": 2})
    second = await chat(alice[1], session, options={"max_tokens": 2})
    url = f"/api/chat/{first['message_id']}/stream"
    tokens = StreamTokens(stream_key(Settings(auth_mode="jwt", jwt_secret=SECRET)), 300)
    token = first["stream_url"].split("?token=", 1)[1]

    expired = tokens.issue(first["message_id"], alice_name, now=time.time() - 3600)
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[::-1]}"
    forged = tokens.issue(first["message_id"], alice_name).split(".")
    other_payload = f"{forged[0]}.{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{forged[2]}"
    cases = {
        "expired": (expired, 401, "expired"),
        "tampered signature": (tampered, 401, "invalid"),
        "tampered payload": (other_payload, 401, "invalid"),
        "another message's": (second["stream_url"].split("?token=", 1)[1], 403, "another message"),
        "a bearer JWT": (bearer(alice_name), 401, "invalid"),
    }
    for client in anonymous:  # both instances verify what either issued
        for name, (bad, status, reason) in cases.items():
            response = await status_of(client, "GET", url, params={"token": bad})
            assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
            assert reason in response.json()["detail"], f"{name}: {response.text}"
        async with SSEStream(client, first["stream_url"]) as ok:
            events = await ok.until_done(within=20)
        assert [d.json()["status"] for d in dones(events)] == ["completed"]


# --- 3. limits across the two api processes ------------------------------------------------
async def test_rate_limit_holds_across_two_api_processes(as_user: Clients) -> None:
    dave = as_user(new_user("dave"))
    session = new_session()
    for i in range(RATE):  # the minute's burst, split over both instances
        await chat(dave[i % 2], session, options={"max_tokens": 1})
    for client in dave:
        refused = await client.post("/api/chat", json={"session_id": session, "message": "more"})
        assert refused.status_code == 429, refused.text
        # then one message every 60/RATE = 12 s: the wait is at most that
        assert 1 <= int(refused.headers["retry-after"]) <= 60 // RATE
    await chat(as_user(new_user("erin"))[1], new_session(), options={"max_tokens": 1})  # per user


async def test_open_streams_per_user_hold_across_two_api_processes(
    as_user: Clients, settings: Settings, redis: Redis
) -> None:
    frank = as_user(new_user("frank"))
    session = new_session()
    # three messages in one session: the later ones wait in its lane, their streams stay open
    urls = [(await chat(frank[i % 2], session))["stream_url"] for i in range(3)]
    anonymous = as_user(None)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(STREAMS):
            await stack.enter_async_context(SSEStream(anonymous[i % 2], urls[1 + i % 2]))
        for client in anonymous:
            refused = await status_of(client, "GET", urls[0])
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
        # chat-and-stream in one request is refused before anything is queued
        body = {"session_id": session, "message": "x", "message_id": f"m-{uuid.uuid4().hex}"}
        direct = await status_of(frank[1], "POST", "/api/chat/stream", json=body)
        assert direct.status_code == 429, direct.text
        keys = Keys.from_settings(settings)
        assert not await redis.exists(keys.msg(session, body["message_id"]))
        assert not await redis.exists(keys.where(body["message_id"]))
    # closing them frees the slots (on whichever instance held them)
    await opens(anonymous[1], urls[0], refused=429)


async def test_sse_connections_per_process_answer_503_when_full(
    as_user: Clients, cluster: Cluster
) -> None:
    extra = cluster.spawn("api", f"api-cap-{uuid.uuid4().hex[:4]}", {"sse_max_connections": 1})
    try:
        async with httpx.AsyncClient(base_url=extra.url, timeout=10.0) as client:

            async def ready() -> bool | None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/ready")).status_code == 200:
                        return True
                return None

            await apoll("the extra api to be ready", ready, within=30, interval=0.2)
            grace = as_user(new_user("grace"))[0]
            accepted = await chat(grace, new_session())
            async with SSEStream(client, accepted["stream_url"]):
                full = await status_of(client, "GET", accepted["stream_url"])
                assert full.status_code == 503, full.text
                assert int(full.headers["retry-after"]) >= 1
            await opens(client, accepted["stream_url"], refused=503)
    finally:
        extra.terminate()


async def test_ops_endpoints_stay_open(as_user: Clients) -> None:
    client = as_user(None)[0]
    for path in ("/health", "/ready", "/metrics", "/"):
        assert (await client.get(path)).status_code == 200, path
    with pytest.raises(SSEError, match="401"):
        async with SSEStream(client, "/api/chat/nope/stream"):
            pass


# --- the demo page with auth on ------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing")
async def test_demo_page_takes_a_token_from_its_url(cluster: Cluster) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(15_000)
            # without a token the api refuses, and the page says so
            await page.goto(f"{cluster.urls[0]}/")
            await page.locator("#message").fill("hello")
            await page.locator("#send").click()
            await expect(page.locator(".turn .status").first).to_contain_text("error 401")
            # with ?token= it sends (bearer), streams (stream token) and cancels (bearer)
            await page.goto(f"{cluster.urls[0]}/?token={bearer(new_user('page'))}")
            await page.locator("#message").fill("hello")
            await page.locator("#send").click()
            turn = page.locator(".turn").first
            await expect(turn.locator(".a")).not_to_be_empty()
            await page.locator("#cancel").click()
            await expect(turn).to_have_attribute("data-status", "cancelled")
        finally:
            await browser.close()


# --- the OpenAI-compatible routes: the same auth, OpenAI's error shape ---------------------
async def test_openai_routes_want_a_key_and_keep_each_users_sessions(as_user: Clients) -> None:
    anonymous, alice, mallory = as_user(None), as_user(new_user("alice")), as_user(new_user("m"))
    body = {"model": "chatpipe", "messages": [{"role": "user", "content": "hi"}]}
    for answer in (
        await anonymous[0].get("/v1/models"),
        await anonymous[1].post("/v1/chat/completions", json=body),
    ):
        assert answer.status_code == 401, answer.text
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert (await alice[0].get("/v1/models")).status_code == 200
    session = new_session()
    mine = {**body, "metadata": {"session_id": session}}
    done = await alice[0].post("/v1/chat/completions", json=mine)
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["message"]["content"]
    refused = await mallory[1].post("/v1/chat/completions", json=mine)  # Alice's session
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "permission_error"


async def test_another_users_response_is_not_found_and_stays_as_it_is(as_user: Clients) -> None:
    """A response id of another user answers 404 (whether it exists is not told), for a
    retrieve, a resume and a cancel; the owner's response is untouched."""
    alice, mallory = as_user(new_user("alice")), as_user(new_user("m"))
    body = {"model": "chatpipe", "input": "hello", "background": True}
    created = await alice[0].post("/v1/responses", json=body)
    assert created.status_code == 200, created.text
    response_id = created.json()["id"]
    for answer in (
        await mallory[1].get(f"/v1/responses/{response_id}"),
        await mallory[1].get(f"/v1/responses/{response_id}", params={"stream": "true"}),
        await mallory[0].post(f"/v1/responses/{response_id}/cancel"),
        await mallory[0].post("/v1/responses", json={**body, "previous_response_id": response_id}),
    ):
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "not_found"

    async def completed() -> dict[str, Any] | None:
        mine: dict[str, Any] = (await alice[1].get(f"/v1/responses/{response_id}")).json()
        return mine if mine["status"] == "completed" else None

    done = await apoll("Alice's response to complete", completed, within=30)
    assert done["output"][0]["content"][0]["text"]  # not cancelled by Mallory


async def test_another_users_message_description_is_refused(as_user: Clients) -> None:
    alice, mallory = as_user(new_user("alice")), as_user(new_user("m"))
    accepted = await chat(alice[0], new_session(), options={"max_tokens": 2})
    refused = await mallory[1].get(f"/api/chat/{accepted['message_id']}")
    assert refused.status_code == 403, refused.text
    mine = await alice[1].get(f"/api/chat/{accepted['message_id']}")
    assert mine.status_code == 200, mine.text
    assert mine.json()["session_id"] == accepted["session_id"]
