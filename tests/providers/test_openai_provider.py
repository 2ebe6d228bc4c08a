"""The OpenAI-compatible provider against a real HTTP server (tests/providers/upstream.py).

What users rely on: the answer arrives delta by delta in order; a cancel closes the upstream
HTTP stream at once (that is what makes vLLM stop generating and free the GPU); every upstream
failure ends the message with a reason a person can read; the key goes where it belongs and
nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ai_consumer.interrupt import until_set
from ai_consumer.llm import ProviderError, TokenUsage
from ai_consumer.llm.factory import make_provider
from ai_consumer.llm.openai import OpenAIProvider, completions_url
from chatpipe.errors import ChatpipeError
from chatpipe.history import alone
from chatpipe.schemas import ChatOptions, ChatRequest
from chatpipe.settings import Settings
from tests.providers.upstream import (
    COMPLETION_TOKENS,
    ERROR_MESSAGE,
    PROMPT_TOKENS,
    FakeOpenAI,
    refused_url,
    reply,
    serve,
)

WITHIN = 0.1  # the upstream sees the disconnect this soon after a cancel, in seconds
KEY = "sk-test-7f3a9c1e5b"


def settings_for(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "llm_provider": "openai",
        "llm_base_url": base_url,
        "llm_model": "fake-model",
        "llm_api_key": "",
        "llm_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def request(message: str, options: ChatOptions | None = None, n: int = 1) -> ChatRequest:
    return ChatRequest(message_id=f"m{n}", session_id="s1", message=message, options=options)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with serve(FakeOpenAI()) as fake:
        yield fake


@contextlib.asynccontextmanager
async def provider_for(base_url: str, **overrides: Any) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(settings_for(base_url, **overrides))
    try:
        yield provider
    finally:
        await provider.aclose()


async def collect(provider: OpenAIProvider, req: ChatRequest) -> list[str]:
    return [delta async for delta in provider.stream(req, alone(req))]


async def failure(provider: OpenAIProvider, req: ChatRequest) -> str:
    with pytest.raises(ProviderError) as caught:
        await asyncio.wait_for(collect(provider, req), 10)
    return caught.value.reason


# --- streaming ---------------------------------------------------------------------------


async def test_yields_the_deltas_in_order(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url) as provider:
        deltas = await collect(provider, request("hello"))

    # role-only, empty, comment, finish and usage-only chunks yield nothing
    assert deltas == reply("hello")
    call = upstream.calls[0]
    assert call.path == "/v1/chat/completions"
    assert call.body == {
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "model": "fake-model",
    }
    assert call.headers["accept"] == "text/event-stream"
    assert call.headers["x-request-id"] == "m1"
    # read to its end: a clean finish, not a disconnect
    assert not call.disconnected.is_set()


async def test_the_model_servers_token_counts_are_reported(upstream: FakeOpenAI) -> None:
    usage = TokenUsage()
    async with provider_for(upstream.url) as provider:
        req = request("hello")
        deltas = [d async for d in provider.stream(req, alone(req), usage)]
    assert len(deltas) == 5
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    async with provider_for(upstream.url, llm_stream_usage=False) as provider:
        await collect(provider, request("again"))
    assert "stream_options" not in upstream.calls[-1].body  # for a server that refuses it


async def test_a_finished_stream_leaves_its_connection_for_the_next(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url) as provider:
        await collect(provider, request("one"))
        await collect(provider, request("two", n=2))
    first, second = upstream.calls
    assert first.client_port == second.client_port  # kept alive, no new TCP (or TLS) handshake


async def test_request_options_choose_model_max_tokens_and_temperature(
    upstream: FakeOpenAI,
) -> None:
    opts = ChatOptions(model="other-model", max_tokens=7, temperature=0.0)
    async with provider_for(upstream.url) as provider:
        assert await collect(provider, request("hi", opts)) == reply("hi")
        assert await collect(provider, request("hi", ChatOptions(max_tokens=3), 2)) == reply("hi")

    first, second = upstream.calls
    assert first.body["model"] == "other-model"
    assert first.body["max_tokens"] == 7
    assert first.body["temperature"] == 0.0
    assert second.body["model"] == "fake-model"
    assert second.body["max_tokens"] == 3
    assert "temperature" not in second.body


async def test_no_model_anywhere_lets_the_server_choose(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url, llm_model="") as provider:
        assert await collect(provider, request("hi")) == reply("hi")
    assert "model" not in upstream.calls[0].body


async def test_a_server_that_ignores_stream_true_still_answers(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url) as provider:
        assert await collect(provider, request("json")) == ["all at once"]


@pytest.mark.parametrize(
    "suffix", ["", "/", "/v1", "/v1/"], ids=["bare", "slash", "v1", "v1-slash"]
)
async def test_base_url_with_or_without_v1(upstream: FakeOpenAI, suffix: str) -> None:
    async with provider_for(upstream.url + suffix) as provider:
        assert await collect(provider, request("hi")) == reply("hi")
    assert upstream.calls[0].path == "/v1/chat/completions"


async def test_base_url_path_prefix_is_kept(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url + "/llm/v1") as provider:
        assert await collect(provider, request("hi")) == reply("hi")
    assert upstream.calls[0].path == "/llm/v1/chat/completions"


def test_completions_url() -> None:
    assert completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert completions_url(" http://h:8000/v1/ ") == "http://h:8000/v1/chat/completions"
    assert (
        completions_url("https://api.openai.com/v1") == "https://api.openai.com/v1/chat/completions"
    )


async def test_two_streams_at_once_cancelling_one_leaves_the_other(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url) as provider:
        held = provider.stream(request("hold:100", n=1), alone(request("hold:100", n=1)))
        assert await anext(held) == "t0 "
        other = await collect(provider, request("meanwhile", n=2))
        await held.aclose()  # type: ignore[attr-defined]
    assert other == reply("meanwhile")
    held_call, other_call = upstream.calls
    await asyncio.wait_for(held_call.disconnected.wait(), 1)
    assert not other_call.disconnected.is_set()


# --- the key ------------------------------------------------------------------------------


async def test_sends_the_api_key_as_a_bearer_token(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url, llm_api_key=KEY) as provider:
        await collect(provider, request("hi"))
    assert upstream.calls[0].headers["authorization"] == f"Bearer {KEY}"


async def test_no_authorization_header_without_a_key(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url) as provider:
        await collect(provider, request("hi"))
    assert "authorization" not in upstream.calls[0].headers


async def test_the_key_is_never_logged_nor_shown(
    upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with provider_for(upstream.url, llm_api_key=KEY) as provider:
        await collect(provider, request("hi"))
        reason = await failure(provider, request("echo-key", n=2))  # the server repeats it
        shown = repr(provider.__dict__)
    assert reason.startswith("upstream returned 401: bad key Bearer ")
    assert KEY not in reason
    assert KEY not in shown
    assert caplog.records, "expected the provider's and httpx's log lines"
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(record.__dict__)


# --- cancel -------------------------------------------------------------------------------


async def test_cancel_mid_stream_closes_the_upstream_at_once(upstream: FakeOpenAI) -> None:
    """The handler's way: until_set(provider.stream(req, alone(req)), stream.cancelled), and a cancel sets
    the event from another task while the provider waits for the next token."""
    loop = asyncio.get_running_loop()
    cancelled = asyncio.Event()
    two = asyncio.Event()
    got: list[str] = []

    async def consume(provider: OpenAIProvider) -> None:
        async with contextlib.aclosing(
            until_set(provider.stream(request("hold:2"), alone(request("hold:2"))), cancelled)
        ) as it:
            async for delta in it:
                got.append(delta)
                if len(got) == 2:
                    two.set()

    async with provider_for(upstream.url) as provider:
        task = asyncio.create_task(consume(provider))
        await asyncio.wait_for(two.wait(), 5)
        call = upstream.calls[0]
        assert not call.disconnected.is_set()
        sent = loop.time()
        cancelled.set()
        await asyncio.wait_for(call.disconnected.wait(), 2)
        await asyncio.wait_for(task, 2)  # the iteration ended normally, no error

    assert call.disconnected_at is not None
    assert call.disconnected_at - sent < WITHIN
    assert got == ["t0 ", "t1 "]


@pytest.mark.parametrize(
    "message", ["stall", "silent"], ids=["before-first-token", "before-headers"]
)
async def test_cancel_before_the_first_token_closes_the_upstream(
    upstream: FakeOpenAI, message: str
) -> None:
    """A model still on its prompt (no token yet), or a server that has not even answered."""
    loop = asyncio.get_running_loop()
    cancelled = asyncio.Event()
    got: list[str] = []

    async def consume(provider: OpenAIProvider) -> None:
        async with contextlib.aclosing(
            until_set(provider.stream(request(message), alone(request(message))), cancelled)
        ) as it:
            async for delta in it:
                got.append(delta)

    async with provider_for(upstream.url) as provider:
        task = asyncio.create_task(consume(provider))
        call = await upstream.next_call()
        sent = loop.time()
        cancelled.set()
        await asyncio.wait_for(call.disconnected.wait(), 2)
        await asyncio.wait_for(task, 2)

    assert call.disconnected_at is not None
    assert call.disconnected_at - sent < WITHIN
    assert got == []


async def test_breaking_out_of_the_loop_closes_the_upstream(upstream: FakeOpenAI) -> None:
    """The handler's other way out: the Redis flag says cancelled, it breaks, aclosing closes."""
    loop = asyncio.get_running_loop()
    never = asyncio.Event()
    async with provider_for(upstream.url) as provider:
        async with contextlib.aclosing(
            until_set(provider.stream(request("hold:3"), alone(request("hold:3"))), never)
        ) as it:
            async for delta in it:
                if delta == "t1 ":
                    break
        closed = loop.time()
        call = upstream.calls[0]
        await asyncio.wait_for(call.disconnected.wait(), 2)
    assert call.disconnected_at is not None
    assert call.disconnected_at - closed < WITHIN


async def test_cancelling_the_task_closes_the_upstream(upstream: FakeOpenAI) -> None:
    """A task iterating the provider is cancelled (shutdown) while waiting for a token."""
    loop = asyncio.get_running_loop()
    first = asyncio.Event()

    async def consume(provider: OpenAIProvider) -> None:
        async for _ in provider.stream(request("hold:1"), alone(request("hold:1"))):
            first.set()

    async with provider_for(upstream.url) as provider:
        task = asyncio.create_task(consume(provider))
        await asyncio.wait_for(first.wait(), 5)
        sent = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        call = upstream.calls[0]
        await asyncio.wait_for(call.disconnected.wait(), 2)
    assert call.disconnected_at is not None
    assert call.disconnected_at - sent < WITHIN


async def test_cancelling_the_task_inside_until_set_closes_the_upstream(
    upstream: FakeOpenAI,
) -> None:
    """The worker's shutdown after the grace period cancels handler tasks (lanes.cancel_all)."""
    first = asyncio.Event()
    never = asyncio.Event()

    async def consume(provider: OpenAIProvider) -> None:
        async with contextlib.aclosing(
            until_set(provider.stream(request("hold:1"), alone(request("hold:1"))), never)
        ) as it:
            async for _ in it:
                first.set()

    async with provider_for(upstream.url) as provider:
        task = asyncio.create_task(consume(provider))
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        outcome = await asyncio.gather(task, return_exceptions=True)
        call = upstream.calls[0]
        try:
            await asyncio.wait_for(call.disconnected.wait(), 1)
        finally:
            for t in asyncio.all_tasks():  # the step task until_set left behind
                if t is not asyncio.current_task() and "async_generator_asend" in repr(t):
                    t.cancel()
    assert isinstance(outcome[0], asyncio.CancelledError)


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("status:500", f"upstream returned 500: {ERROR_MESSAGE}"),
        ("status:429", f"upstream returned 429: {ERROR_MESSAGE}"),
        ("status-text:404", "upstream returned 404: no such model"),
        ("status-html:502", "upstream returned 502: 502 Bad Gateway nginx"),
    ],
)
async def test_an_error_status_fails_with_status_and_excerpt(
    upstream: FakeOpenAI, message: str, expected: str
) -> None:
    async with provider_for(upstream.url) as provider:
        assert await failure(provider, request(message)) == expected


async def test_a_stalled_upstream_times_out_and_is_closed(upstream: FakeOpenAI) -> None:
    loop = asyncio.get_running_loop()
    async with provider_for(upstream.url, llm_timeout_s=0.5) as provider:
        began = loop.time()
        reason = await failure(provider, request("stall"))
        took = loop.time() - began
        call = upstream.calls[0]
        await asyncio.wait_for(call.disconnected.wait(), 2)
    assert reason == "upstream timed out after 0.5s"
    assert 0.5 <= took < 2.0


async def test_a_server_that_never_answers_times_out(upstream: FakeOpenAI) -> None:
    async with provider_for(upstream.url, llm_timeout_s=0.5) as provider:
        reason = await failure(provider, request("silent"))
    assert reason == "upstream timed out after 0.5s"


async def test_nothing_listening_fails_with_a_connect_reason() -> None:
    url = refused_url()
    async with provider_for(url) as provider:
        reason = await failure(provider, request("hi"))
    assert reason.startswith(f"could not connect to upstream {url}/v1/chat/completions: ")


@pytest.mark.parametrize(
    ("message", "good", "expected"),
    [
        ("malformed", ["fine"], "upstream sent a malformed chunk: {not json"),
        ("error-event", ["fine"], "upstream error: CUDA out of memory"),
        ("cut", ["partial"], "upstream ended the stream before it finished"),
    ],
)
async def test_a_broken_stream_fails_after_the_good_part(
    upstream: FakeOpenAI, message: str, good: list[str], expected: str
) -> None:
    got: list[str] = []

    async def consume(provider: OpenAIProvider) -> None:
        async for delta in provider.stream(request(message), alone(request(message))):
            got.append(delta)

    async with provider_for(upstream.url) as provider:
        with pytest.raises(ProviderError) as caught:
            await consume(provider)
    assert caught.value.reason == expected
    assert got == good


async def test_a_dropped_connection_fails_with_what_happened(upstream: FakeOpenAI) -> None:
    got: list[str] = []

    async def consume(provider: OpenAIProvider) -> None:
        async for delta in provider.stream(request("drop"), alone(request("drop"))):
            got.append(delta)

    async with provider_for(upstream.url) as provider:
        with pytest.raises(ProviderError) as caught:
            await consume(provider)
    assert got == ["partial"]
    assert caught.value.reason.startswith("upstream broke off the response: peer closed")


# --- wiring --------------------------------------------------------------------------------


async def test_the_factory_builds_it_from_the_settings(upstream: FakeOpenAI) -> None:
    provider = make_provider(settings_for(upstream.url))
    try:
        assert isinstance(provider, OpenAIProvider)
        assert [d async for d in provider.stream(request("hi"), alone(request("hi")))] == reply(
            "hi"
        )
    finally:
        await provider.aclose()


@pytest.mark.parametrize("url", ["", "  ", "ftp://h/v1", "not a url"])
def test_a_missing_or_bad_base_url_stops_the_start(url: str) -> None:
    with pytest.raises(ChatpipeError, match="LLM_BASE_URL"):
        OpenAIProvider(settings_for(url))
