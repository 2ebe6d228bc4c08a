"""LLM providers behind one small interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from chatpipe.errors import Reject
from chatpipe.schemas import ChatMessage, ChatRequest


class ProviderError(Reject):
    """The upstream failed; `reason` is shown to the user in the `failed` event."""


@dataclass(slots=True)
class TokenUsage:
    """What the model counted for one answer, filled in by the provider as it learns it
    (None: not known; the handler then counts one token per chunk)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Provider(Protocol):
    """Streams the answer to one request as text deltas. `messages` is the conversation the
    model is given (chatpipe/history.py: the session's earlier turns and this message, or the
    request's own `messages`); `request` carries the ids and options; `usage`, when given,
    receives the model's own token counts as the provider learns them.

    The caller may stop iterating at any time (a cancel, a shutdown) and then closes the
    generator with `aclose()`; a provider releases its upstream (closes the HTTP stream) there.
    """

    def stream(
        self,
        request: ChatRequest,
        messages: Sequence[ChatMessage],
        usage: TokenUsage | None = None,
    ) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...
