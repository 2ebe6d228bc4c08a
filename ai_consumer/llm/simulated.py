"""The embedded simulator: deterministic text at a configurable pace, no network."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

from ai_consumer.llm import TokenUsage
from chatpipe.schemas import ChatMessage, ChatRequest

WORDS = [
    "the",
    "pipeline",
    "streams",
    "every",
    "token",
    "through",
    "Kafka",
    "and",
    "Redis",
    "so",
    "that",
    "any",
    "instance",
    "can",
    "serve",
    "the",
    "answer",
    "and",
    "any",
    "instance",
    "can",
    "stop",
    "it",
    "on",
    "the",
    "first",
    "click",
    "while",
    "the",
    "model",
    "keeps",
    "its",
    "promise",
    "of",
    "order",
    "per",
    "session",
    "and",
    "exactly",
    "one",
    "final",
    "event",
    "for",
    "every",
    "message",
    "it",
    "accepted",
]


def simulated_tokens(
    request: ChatRequest, count: int, messages: Sequence[ChatMessage] | None = None
) -> list[str]:
    """The deterministic answer to `request` given the conversation `messages`: derived from
    every user message the model was given, so the same conversation gives the same text and a
    test sees the history arrive (without history: from the message alone)."""
    users = [m.content for m in messages or () if m.role == "user"] or [request.message]
    digest = hashlib.sha256("\n".join(users).encode()).digest()
    start = digest[0] % len(WORDS)
    # one message: the words in order from `start` (47 texts); a conversation also picks a
    # stride (47 x 46 texts: two conversations rarely share an answer; 47 is prime)
    stride = 1 if len(users) == 1 else 1 + digest[1] % (len(WORDS) - 1)
    return [
        ("" if i == 0 else " ") + WORDS[(start + i * stride) % len(WORDS)] for i in range(count)
    ]


class SimulatedProvider:
    def __init__(self, tokens: int, token_delay_ms: float, first_token_delay_ms: float) -> None:
        self.tokens = tokens
        self.delay = token_delay_ms / 1000
        self.first_delay = first_token_delay_ms / 1000

    async def stream(
        self,
        request: ChatRequest,
        messages: Sequence[ChatMessage],
        usage: TokenUsage | None = None,
    ) -> AsyncIterator[str]:
        opts = request.options
        count = opts.max_tokens if opts and opts.max_tokens else self.tokens
        if usage is not None:
            usage.prompt_tokens = sum(len(m.content.split()) for m in messages)
            usage.completion_tokens = 0
        loop = asyncio.get_running_loop()
        # pace against a schedule, not by chaining sleeps, so the rate holds under load
        due = loop.time() + self.first_delay
        for i, token in enumerate(simulated_tokens(request, count, messages)):
            if i:
                due += self.delay
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if usage is not None:  # a word is a token here
                usage.completion_tokens = i + 1
            yield token

    async def aclose(self) -> None:
        return None
