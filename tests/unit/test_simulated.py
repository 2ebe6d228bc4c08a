"""SimulatedProvider: the same message always gets the same answer; max_tokens is honoured."""

from __future__ import annotations

from ai_consumer.llm.simulated import SimulatedProvider, simulated_tokens
from chatpipe.history import alone
from chatpipe.schemas import ChatOptions, ChatRequest


def request(message: str, max_tokens: int | None = None, message_id: str = "m-1") -> ChatRequest:
    options = ChatOptions(max_tokens=max_tokens) if max_tokens else None
    return ChatRequest(message_id=message_id, session_id="s-1", message=message, options=options)


async def answer(provider: SimulatedProvider, req: ChatRequest) -> list[str]:
    return [token async for token in provider.stream(req, alone(req))]


async def test_same_message_gives_the_same_text() -> None:
    provider = SimulatedProvider(tokens=12, token_delay_ms=0, first_token_delay_ms=0)
    first = await answer(provider, request("what is Kafka?", message_id="m-1"))
    second = await answer(provider, request("what is Kafka?", message_id="m-2"))
    assert first == second
    assert len(first) == 12
    assert first == simulated_tokens(request("what is Kafka?"), 12)


async def test_different_messages_give_different_text() -> None:
    provider = SimulatedProvider(tokens=8, token_delay_ms=0, first_token_delay_ms=0)
    texts = {
        "".join(await answer(provider, request(m)))
        for m in ("hello", "what is Kafka?", "and Redis?", "tell me more")
    }
    assert len(texts) > 1


async def test_tokens_are_deltas_that_join_into_readable_text() -> None:
    provider = SimulatedProvider(tokens=5, token_delay_ms=0, first_token_delay_ms=0)
    tokens = await answer(provider, request("hi"))
    assert not tokens[0].startswith(" ")
    assert all(t.startswith(" ") and t.strip() for t in tokens[1:])
    assert len("".join(tokens).split(" ")) == 5


async def test_options_max_tokens_is_honoured() -> None:
    provider = SimulatedProvider(tokens=60, token_delay_ms=0, first_token_delay_ms=0)
    short = await answer(provider, request("hi", max_tokens=3))
    full = await answer(provider, request("hi"))
    assert len(short) == 3
    assert len(full) == 60
    assert short == full[:3]


async def test_closing_early_is_clean() -> None:
    provider = SimulatedProvider(tokens=100, token_delay_ms=0, first_token_delay_ms=0)
    stream = provider.stream(request("hi"), alone(request("hi")))
    assert await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await provider.aclose()
