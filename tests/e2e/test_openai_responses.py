"""Issue 15: OpenAI's background responses through the official `openai` SDK, across two api
instances: resume on the other api with `starting_after` (exact: no gap, no duplicate), cancel
from the other api, an idempotent cancel, `previous_response_id`.

2 api + 3 ai_consumer + the cancel listener, LLM_PROVIDER=openai against a recording
OpenAI-compatible server (tests/providers/upstream.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import DEFAULT_ENV
from tests.providers.upstream import FakeOpenAI, provider_env, reply
from tests.support.cluster import Cluster
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
WORDS = 20  # slow:20 -> w0 .. w19, 50 ms apart


@pytest.fixture(scope="module")
def cluster_env(upstream: FakeOpenAI) -> dict[str, object]:
    return {**DEFAULT_ENV, **provider_env(upstream, MODEL)}


@pytest.fixture
async def sdks(cluster: Cluster) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    a, b = (
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-x", max_retries=0, timeout=30)
        for url in cluster.urls[:2]
    )
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def read_all(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def test_a_background_stream_dropped_on_one_api_resumes_exactly_on_the_other(
    sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    a, b = sdks
    stream = await a.responses.create(
        model=MODEL, input=f"slow:{WORDS}", background=True, stream=True
    )
    before: list[Any] = []
    async for event in stream:
        before.append(event)
        if sum(e.type == "response.output_text.delta" for e in before) == 5:
            break
    await stream.close()  # the connection drops; a background response goes on
    response_id = before[0].response.id
    assert before[0].type == "response.created"
    assert before[0].response.status == "queued"
    last = before[-1].sequence_number

    after = await read_all(
        await b.responses.retrieve(response_id, stream=True, starting_after=last)
    )
    assert [e.sequence_number for e in after] == list(range(last + 1, last + 1 + len(after)))
    assert after[-1].type == "response.completed"
    assert after[-1].response.status == "completed"
    whole = await read_all(await b.responses.retrieve(response_id, stream=True))
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert [e.sequence_number for e in before + after] == [e.sequence_number for e in whole]
    text = "".join(f"w{i} " for i in range(WORDS))
    assert deltas(before) + deltas(after) == deltas(whole) == text

    done = await a.responses.retrieve(response_id)
    assert done.status == "completed"
    assert done.output_text == text
    assert done.background is True
    assert done.usage is not None
    assert done.usage.output_tokens == 7  # the model's count (tests/providers/upstream.py)


async def test_a_cancel_on_the_other_api_ends_it_cancelled_and_a_finished_one_stays(
    sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], upstream: FakeOpenAI
) -> None:
    a, b = sdks
    stream = await a.responses.create(model=MODEL, input="hold:3", background=True, stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if deltas(seen) == "t0 t1 t2 ":
            break
    response_id = seen[0].response.id
    cancelled = await b.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_text == "t0 t1 t2 "
    rest = await read_all(stream)  # the stream on api A ends too
    assert rest[-1].type == "response.incomplete"  # OpenAI has no response.cancelled
    assert rest[-1].response.status == "cancelled"
    call = await upstream.call_for(response_id)

    async def gone() -> float | None:
        return call.disconnected_at

    await apoll("the model server to see the disconnect", gone, within=10)
    assert (await a.responses.cancel(response_id)).status == "cancelled"  # idempotent

    finished = await a.responses.create(model=MODEL, input="hello", background=True)
    assert finished.status == "queued"

    async def completed() -> str | None:
        status = (await b.responses.retrieve(finished.id)).status
        return status if status == "completed" else None

    await apoll("the background response to complete", completed, within=20)
    again = await b.responses.cancel(finished.id)
    assert again.status == "completed"  # a finished response is returned unchanged
    assert again.output_text == "".join(reply("hello"))


async def test_previous_response_id_continues_the_conversation(
    sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], upstream: FakeOpenAI
) -> None:
    a, b = sdks
    first = await a.responses.create(model=MODEL, input="what is Kafka?", instructions="be brief")
    assert first.status == "completed"
    assert first.output_text == "".join(reply("what is Kafka?"))
    second = await b.responses.create(
        model=MODEL, input="and Redis?", previous_response_id=first.id
    )
    assert second.output_text == "".join(reply("and Redis?"))
    assert second.previous_response_id == first.id
    call = await upstream.call_for(second.id)
    assert call.body["messages"] == [  # the first exchange; its instructions not carried over
        {"role": "user", "content": "what is Kafka?"},
        {"role": "assistant", "content": "".join(reply("what is Kafka?"))},
        {"role": "user", "content": "and Redis?"},
    ]


async def test_unknown_and_bad_responses_are_answered_the_openai_way(
    sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    a, _ = sdks
    with pytest.raises(openai.NotFoundError):
        await a.responses.retrieve("resp_nothing")
    with pytest.raises(openai.NotFoundError):
        await a.responses.cancel("resp_nothing")
    with pytest.raises(openai.NotFoundError):
        await a.responses.create(model=MODEL, input="x", previous_response_id="resp_nothing")
    with pytest.raises(openai.BadRequestError) as tools:
        await a.responses.create(
            model=MODEL, input="x", tools=[{"type": "function", "name": "f", "parameters": {}}]
        )
    assert tools.value.param == "tools"
    too_many = [{"role": "user", "content": "x"}] * 1001
    with pytest.raises(openai.BadRequestError) as many:
        await a.responses.create(model=MODEL, input=too_many)  # type: ignore[arg-type]
    assert many.value.param == "input"
    for bad_input in ("", [], [{"role": "assistant", "content": "no user"}]):
        with pytest.raises(openai.BadRequestError):
            await a.responses.create(model=MODEL, input=bad_input)  # type: ignore[arg-type]
