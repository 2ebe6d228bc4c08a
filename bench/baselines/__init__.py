"""Baselines the benchmark compares chatpipe with, each a small FastAPI app run by uvicorn.

- `limit`: one process streams the simulator straight to SSE (no Kafka, no Redis): the cost of
  the streaming itself, the floor any design pays.
- `seed`: the seed design (mission/seed-distributed-cancel-fix.md): every "AI instance" streams
  over HTTP SSE itself and checks the Redis cancel flag with a GET on every chunk (or every
  `CHECK_EVERY`-th chunk); its `POST /cancel` sets the flag when the session's active stream is
  that message.

Both read the chatpipe settings from the environment (API_PORT, SIM_TOKENS, SIM_TOKEN_DELAY_MS,
SIM_FIRST_TOKEN_DELAY_MS, REDIS_URL, KEY_PREFIX) and use the same simulator and the same SSE
response (api/sse.py, with chatpipe's heartbeat and send timeout) as chatpipe, so only the
architecture differs. Their SSE events have chatpipe's shapes: `chunk`
{seq, delta, at} from seq 1, then one `done` {status}.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI

from api.sse import SSEResponse
from chatpipe.codec import now_rfc3339
from chatpipe.schemas import ChatBody, ChatRequest
from chatpipe.settings import Settings


def request_of(body: ChatBody, fallback_id: str) -> ChatRequest:
    return ChatRequest(
        message_id=body.message_id or fallback_id,
        session_id=body.session_id,
        user_id=body.user_id,
        message=body.message,
        options=body.options,
    )


def now() -> str:
    return now_rfc3339()  # as chatpipe stamps its chunks


def chunk(seq: int, delta: str, at: str) -> dict[str, Any]:
    """A chunk event; `at` is when the model produced the token (as chatpipe stamps it)."""
    data = {"seq": seq, "delta": delta, "at": at}
    return {"event": "chunk", "id": str(seq), "data": orjson.dumps(data).decode()}


def done(seq: int, status: str) -> dict[str, Any]:
    return {"event": "done", "id": str(seq), "data": orjson.dumps({"status": status}).decode()}


async def _encoded(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The SSE text of each event, as chatpipe's api writes it (api/service.py)."""
    async with contextlib.aclosing(events) as source:  # type: ignore[type-var]
        async for e in source:
            yield b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (
                e["id"].encode(),
                e["event"].encode(),
                e["data"].encode(),
            )


async def _nothing_to_release() -> None:
    return None


def sse(settings: Settings, events: AsyncIterator[dict[str, Any]]) -> SSEResponse:
    """chatpipe's SSE response (api/sse.py) with the api's settings (api/routes.py)."""
    return SSEResponse(
        _encoded(events),
        _nothing_to_release,
        heartbeat_s=settings.sse_heartbeat_s,
        send_timeout_s=settings.sse_send_timeout_s,
    )


def serve(app: FastAPI, settings: Settings) -> None:
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
