"""Issue 15: the OpenAI-compatible face of every api, used through the official `openai` SDK.

2 api + 3 ai_consumer + the cancel listener with LLM_PROVIDER=openai, pointed at a recording
OpenAI-compatible model server (tests/providers/upstream.py, in a thread of its own). The SDK
talks to api A's `/v1`; the answer goes through chat.requests like any chat. Closing the
SDK's stream halfway must cancel the answer and close the model server's stream too.
"""

from __future__ import annotations

import asyncio
import json
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.providers.upstream import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    Call,
    FakeOpenAI,
    provider_env,
    reply,
)
from tests.support.cluster import Cluster
from tests.support.keys import msg_key
from tests.support.sse import dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
STOP_WITHIN_S = 1.0  # stream closed -> message final and upstream disconnected (a loaded box)


@pytest.fixture(scope="module")
def cluster_env(upstream: FakeOpenAI) -> dict[str, object]:
    return {**DEFAULT_ENV, **provider_env(upstream, MODEL)}


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        base_url=f"{cluster.urls[0]}/v1", api_key="sk-not-checked", max_retries=0, timeout=30
    )
    try:
        yield sdk
    finally:
        await sdk.close()


def message_id_of(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-"), completion_id
    return completion_id.removeprefix("chatcmpl-")


async def test_a_streamed_completion_reads_the_whole_answer(
    client: openai.AsyncOpenAI, upstream: FakeOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is Kafka?"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(reply("what is Kafka?"))
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None  # the model's own counts, not the chunk count (5)
    assert chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert len({c.id for c in chunks}) == 1
    call = await upstream.call_for(message_id_of(chunks[0].id))
    assert call.body["messages"] == [  # the conversation the client sent, as given
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is Kafka?"},
    ]
    assert call.body["model"] == MODEL
    assert call.body["stream_options"] == {"include_usage": True}  # the upstream's counts


async def test_closing_the_stream_halfway_cancels_the_answer_and_the_upstream_stream(
    client: openai.AsyncOpenAI, upstream: FakeOpenAI, redis: Redis, settings: Settings
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hold:3"}], stream=True
    )
    got = []
    async for chunk in stream:
        got.append(chunk.choices[0].delta.content or "")
        if len(got) == 4:  # the role chunk, then 3 deltas; the model server holds after them
            break
    message_id = message_id_of(chunk.id)
    call = await upstream.call_for(message_id)
    closed_mono, closed_wall = time.monotonic(), time.time()
    await stream.close()
    assert "".join(got) == "t0 t1 t2 "
    keys = Keys.from_settings(settings)

    async def final() -> dict[bytes, bytes] | None:
        fields = await redis.hgetall(await msg_key(redis, keys, message_id))
        return fields if fields.get(b"state") == b"cancelled" else None

    fields = await apoll("the message to end cancelled", final, within=10)
    finished = datetime.fromisoformat(fields[b"finished"].decode().replace("Z", "+00:00"))
    stopped_after = finished.timestamp() - closed_wall

    async def gone() -> float | None:
        return call.disconnected_at  # set by the upstream's own loop

    upstream_after = await apoll("the model server to see the disconnect", gone, within=10)
    upstream_after -= closed_mono
    print(
        f"stream closed -> cancelled {stopped_after * 1000:.0f} ms, upstream {upstream_after * 1000:.0f} ms"
    )
    assert stopped_after <= STOP_WITHIN_S
    assert upstream_after <= STOP_WITHIN_S


async def test_a_whole_completion_has_the_text_and_its_usage(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "and Redis?"}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "".join(reply("and Redis?"))
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == COMPLETION_TOKENS  # tokens, not 5 chunks
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_the_models_are_listed(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == [MODEL]


async def test_the_answer_of_a_completion_is_a_chatpipe_message_any_api_serves(
    client: openai.AsyncOpenAI, apis: tuple[Api, Api]
) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        metadata={"session_id": "oai-session-1"},
    )
    message_id = message_id_of(completion.id)
    async with apis[1].stream(message_id) as stream:  # the other api
        events = await stream.until_done(within=10)
    assert dones(events)[-1].json()["status"] == "completed"
    turns = (await apis[1].client.get("/api/sessions/oai-session-1/messages")).json()["messages"]
    assert [(t["message_id"], t["answer"]) for t in turns] == [
        (message_id, "".join(reply("hello")))
    ]


async def test_bad_input_is_answered_the_openai_way(
    client: openai.AsyncOpenAI, cluster: Cluster
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tools:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as several:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert several.value.param == "n"
    async with httpx.AsyncClient(base_url=cluster.urls[1], timeout=10) as http:
        cases = {
            "messages": {"model": MODEL},
            "messages.0.role": {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            "temperature": {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": "hot",
            },
            "model": {"messages": [{"role": "user", "content": "x"}]},
        }
        for param, body in cases.items():
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 400, (param, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error", error
            assert error["param"] == param, error
            assert error["message"], error
        image = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        }
        answer = await http.post("/v1/chat/completions", json=image)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "messages[0].content"
        assert (await http.post("/v1/chat/completions", content=b"{not json")).status_code == 400
        missing = await http.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "invalid_request_error"


async def test_a_client_gone_before_a_whole_completion_cancels_it(
    cluster: Cluster, upstream: FakeOpenAI, redis: Redis, settings: Settings
) -> None:
    before = len(upstream.calls)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hold:2"}]}
    async with httpx.AsyncClient(base_url=cluster.urls[0], timeout=httpx.Timeout(2.0)) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
            await http.post("/v1/chat/completions", json=body)

    async def started() -> Call | None:
        return next((c for c in upstream.calls[before:] if c.message == "hold:2"), None)

    call = await apoll("the upstream call", started, within=10)
    message_id = call.headers["x-request-id"]
    keys = Keys.from_settings(settings)

    async def final() -> bytes | None:
        state = await redis.hget(await msg_key(redis, keys, message_id), "state")
        return state if state in (b"cancelled", b"completed", b"failed") else None

    assert await apoll("the message to end", final, within=10) == b"cancelled"

    async def gone() -> float | None:
        return call.disconnected_at

    await apoll("the model server to see the disconnect", gone, within=10)


NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"


async def run_node(*args: str) -> dict[str, object]:
    """tests/interop/node/stream.mjs: the official openai npm package, as a Node app uses it."""
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), (
        "the openai npm package is missing: run `infra/local/install.sh node`"
    )
    proc = await asyncio.create_subprocess_exec(
        "node", "stream.mjs", *args, cwd=NODE_DIR, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_the_node_sdk_reads_an_answer_and_aborts_one(
    cluster: Cluster, upstream: FakeOpenAI, redis: Redis, settings: Settings
) -> None:
    base = f"{cluster.urls[0]}/v1"
    whole = await run_node(base, MODEL, "what is Kafka?")
    assert whole["text"] == "".join(reply("what is Kafka?")), whole
    assert whole["finish_reason"] == "stop"

    aborted = await run_node(base, MODEL, "hold:3", "3")  # AbortController after 3 chunks
    assert aborted["aborted"] is True, aborted
    assert aborted["text"] == "t0 t1 t2 "
    message_id = message_id_of(str(aborted["id"]))
    keys = Keys.from_settings(settings)

    async def final() -> bytes | None:
        state = await redis.hget(await msg_key(redis, keys, message_id), "state")
        return state if state in (b"cancelled", b"completed", b"failed") else None

    assert await apoll("the aborted message to end", final, within=10) == b"cancelled"
    call = await upstream.call_for(message_id)

    async def gone() -> float | None:
        return call.disconnected_at

    await apoll("the model server to see the disconnect", gone, within=10)
