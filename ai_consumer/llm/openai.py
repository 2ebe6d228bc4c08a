"""An OpenAI-compatible streaming client: vLLM, Ollama, llama.cpp server, LiteLLM, OpenAI.

`POST {LLM_BASE_URL}/v1/chat/completions` with `stream: true`; the answer arrives as Server-Sent
Events, one `data: {json}` per chunk and `data: [DONE]` at the end. The deltas
(`choices[0].delta.content`) are yielded as they come.

Stopping: the caller closes the generator (`aclose()`), or the task running it is cancelled.
Either way the `async with client.stream(...)` below exits at once and closes the HTTP
response; a response that was not read to its end takes its connection with it (httpcore
does not return a half-read connection to the pool), so the model server sees the client
disconnect and stops generating (vLLM aborts the request then).

Failures become `ProviderError(reason)`, the reason the user sees in the `failed` event:
`upstream returned 500: <excerpt of the error body>`, `upstream timed out after 30s` (no byte
for LLM_TIMEOUT_S: httpx's read timeout), `could not connect to upstream ...`, `upstream sent
a malformed chunk: ...`, `upstream error: ...` (an error object inside the stream, as vLLM
sends it). The API key goes only into the Authorization header (httpx masks it in reprs) and
is scrubbed from every reason; it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson

from ai_consumer.llm import ProviderError, TokenUsage
from chatpipe.errors import ChatpipeError
from chatpipe.schemas import ChatMessage, ChatRequest
from chatpipe.settings import Settings

log = logging.getLogger(__name__)

EXCERPT_CHARS = 200
ERROR_BODY_BYTES = 8192
KEEPALIVE_CONNECTIONS = 32
DRAIN_S = 0.05  # after [DONE], how long the end of the body may take to keep the connection


def completions_url(base_url: str) -> str:
    """`http://h:8000`, `http://h:8000/`, `http://h:8000/v1` and `http://h:8000/v1/` all give
    `http://h:8000/v1/chat/completions` (a path prefix, e.g. a proxy's `/llm`, is kept)."""
    base = base_url.strip().rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def safe_url(url: httpx.URL) -> str:
    """The URL without user info or query (where credentials hide), for reasons and logs."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """One line, at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def error_text(raw: bytes, content_type: str = "") -> str:
    """The readable part of an error body: OpenAI's `{"error": {"message": ...}}`, FastAPI's
    `{"detail": ...}`, Ollama's `{"error": "..."}`, or the text itself (HTML tags dropped)."""
    if not raw:
        return ""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        found = _message_of(obj)
        if found:
            return excerpt(found)
    text = raw.decode("utf-8", errors="replace")
    if "html" in content_type or text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", " ", text)
    return excerpt(text)


def _message_of(obj: dict[str, Any]) -> str:
    for key in ("error", "detail", "message"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):
            inner = _message_of(value)
            if inner:
                return inner
        if isinstance(value, list) and value:  # FastAPI's validation errors
            return excerpt(orjson.dumps(value).decode())
    return ""


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Event: `data:` lines joined by newlines, dispatched at
    the blank line that ends an event (WHATWG rules; comments such as `: ping` skipped)."""
    event, data = "", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:  # the stream ended without the final blank line
        yield event, "\n".join(data)


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible server (settings `LLM_*`)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.llm_base_url.strip():
            raise ChatpipeError(
                "LLM_PROVIDER=openai needs LLM_BASE_URL (e.g. http://127.0.0.1:8000 for vLLM, "
                "http://127.0.0.1:11434 for Ollama, https://api.openai.com)"
            )
        url = httpx.URL(completions_url(settings.llm_base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise ChatpipeError(f"LLM_BASE_URL must be an http(s) URL, got {safe_url(url)!r}")
        self.url = url
        self.model = settings.llm_model
        self.timeout_s = settings.llm_timeout_s
        self.stream_usage = settings.llm_stream_usage
        self._secret = settings.llm_api_key  # masked in reprs; only for scrubbing
        api_key = settings.llm_api_key.get_secret_value()
        headers = {"Accept": "text/event-stream", "User-Agent": "chatpipe"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # One connection per concurrent stream: a stream holds its connection until it ends,
        # and a cancelled one closes it (never reused half-read).
        streams = max(1, settings.max_concurrent_streams)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(
                max_connections=streams,
                max_keepalive_connections=min(streams, KEEPALIVE_CONNECTIONS),
            ),
        )
        log.info(
            "LLM provider: OpenAI-compatible %s (model %s, timeout %gs, api key %s)",
            safe_url(url),
            self.model or "chosen by the server",
            self.timeout_s,
            "set" if api_key else "not set",
        )

    def body(self, request: ChatRequest, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        """The chat completion request for `request`, given the conversation `messages`."""
        opts = request.options
        out: dict[str, Any] = {
            "messages": [m.model_dump(include={"role", "content"}) for m in messages],
            "stream": True,
        }
        if self.stream_usage:  # the token counts, in a last chunk (OpenAI, vLLM, Ollama...)
            out["stream_options"] = {"include_usage": True}
        model = (opts.model if opts else None) or self.model
        if model:
            out["model"] = model
        if opts and opts.max_tokens:
            out["max_tokens"] = opts.max_tokens
        if opts and opts.temperature is not None:
            out["temperature"] = opts.temperature
        return out

    async def stream(
        self,
        request: ChatRequest,
        messages: Sequence[ChatMessage],
        usage: TokenUsage | None = None,
    ) -> AsyncIterator[str]:
        try:
            async with self._client.stream(
                "POST",
                self.url,
                json=self.body(request, messages),
                headers={"X-Request-Id": request.message_id},
            ) as response:
                if not response.is_success:
                    raise ProviderError(self._scrub(await self._status_reason(response)))
                ctype = response.headers.get("content-type", "")
                if "json" in ctype and "event-stream" not in ctype:
                    # a server that ignored `stream: true` answers with one completion
                    text = self._whole(await response.aread())
                    if text:
                        yield text
                    return
                finished = False
                events = sse_data(response.aiter_lines())
                async for event, data in events:
                    if data.strip() == "[DONE]":
                        await self._drain(events)
                        return
                    if event == "error":
                        raise ProviderError(
                            self._scrub(f"upstream error: {error_text(data.encode())}")
                        )
                    delta, done = self._chunk(data, usage)
                    finished = finished or done
                    if delta:
                        yield delta
                if not finished:
                    raise ProviderError("upstream ended the stream before it finished")
        except httpx.TimeoutException as e:
            raise ProviderError(self._timeout_reason(e)) from None
        except httpx.ConnectError as e:
            detail = str(e) or type(e).__name__
            raise ProviderError(
                self._scrub(f"could not connect to upstream {safe_url(self.url)}: {detail}")
            ) from None
        except httpx.RemoteProtocolError as e:
            detail = str(e) or type(e).__name__
            raise ProviderError(self._scrub(f"upstream broke off the response: {detail}")) from None
        except httpx.HTTPError as e:
            raise ProviderError(
                self._scrub(f"upstream request failed: {type(e).__name__}: {e}")
            ) from None

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- helpers -----------------------------------------------------------------------
    def _scrub(self, reason: str) -> str:
        secret = self._secret.get_secret_value()
        return reason.replace(secret, "***") if secret else reason

    def _timeout_reason(self, e: httpx.TimeoutException) -> str:
        what = {
            httpx.ConnectTimeout: " connecting",
            httpx.WriteTimeout: " sending the request",
            httpx.PoolTimeout: " waiting for a free connection",
        }.get(type(e), "")
        return f"upstream timed out after {self.timeout_s:g}s{what}"

    @staticmethod
    async def _drain(events: AsyncIterator[tuple[str, str]]) -> None:
        """Read the end of the body that follows `[DONE]` (normally already received), so the
        connection goes back to the pool; a server that keeps the response open after `[DONE]`
        gets DRAIN_S, then its connection is closed (as after a cancel)."""
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(DRAIN_S):
                async for _ in events:
                    pass

    async def _status_reason(self, response: httpx.Response) -> str:
        raw = b""
        try:
            async for part in response.aiter_bytes():
                raw += part
                if len(raw) >= ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass  # the status says enough
        text = error_text(raw[:ERROR_BODY_BYTES], response.headers.get("content-type", ""))
        status = f"upstream returned {response.status_code}"
        return f"{status}: {text}" if text else status

    def _chunk(self, data: str, usage: TokenUsage | None = None) -> tuple[str, bool]:
        """(content delta, finished) of one `chat.completion.chunk`; its `usage`, when it has
        one (the last chunk, with `stream_options.include_usage`), goes into `usage`."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderError(
                self._scrub(f"upstream sent a malformed chunk: {excerpt(data, 80)}")
            ) from None
        if not isinstance(obj, dict):
            raise ProviderError(
                self._scrub(f"upstream sent a malformed chunk: {excerpt(data, 80)}")
            )
        if obj.get("error"):
            raise ProviderError(
                self._scrub(f"upstream error: {error_text(orjson.dumps(obj)) or 'unknown'}")
            )
        counted = obj.get("usage")
        if usage is not None and isinstance(counted, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                value = counted.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(usage, name, value)
        choices = obj.get("choices")
        if not choices:  # a usage-only chunk (stream_options.include_usage), a keep-alive
            return "", False
        first = choices[0] if isinstance(choices, list) else None
        delta = first.get("delta") if isinstance(first, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if (
            not isinstance(first, dict)
            or not isinstance(delta, dict | None)
            or not (content is None or isinstance(content, str))
        ):
            raise ProviderError(
                self._scrub(f"upstream sent a malformed chunk: {excerpt(data, 80)}")
            )
        return content or "", bool(first.get("finish_reason"))

    def _whole(self, raw: bytes) -> str:
        """The text of a non-streamed `chat.completion`."""
        try:
            obj = orjson.loads(raw)
            content = obj["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ProviderError(
                self._scrub(
                    f"upstream sent a malformed completion: {excerpt(raw.decode(errors='replace'), 80)}"
                )
            ) from None
        if content is not None and not isinstance(content, str):
            raise ProviderError("upstream sent a malformed completion: content is not text")
        return content or ""
