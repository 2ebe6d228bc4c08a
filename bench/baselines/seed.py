"""The seed design: `python -m bench.baselines.seed` (API_PORT, REDIS_URL, KEY_PREFIX, SIM_*,
CHECK_EVERY).

An "AI instance" streams the answer over HTTP SSE itself. Its Redis operations are the seed's
six (mission/seed-distributed-cancel-fix.md), under the seed's keys: register the active stream
(SETEX `chat:active:{session}` 300), check the flag (GET `chat:cancel:{session}:{message}`) on
every chunk, or on every CHECK_EVERY-th chunk (the seed's later revision checked every 10th),
then clear both (2 DEL). `POST /cancel` (sent to ANOTHER instance) does GET active, and SETEX
the flag 60 s when the active stream is that message: 1 GET + 1 SETEX.

The flag is only looked at when a token arrives, so a cancel during the model's silence before
its first token waits for that token.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from ai_consumer.llm.factory import make_provider
from api.sse import SSEResponse
from bench.baselines import chunk, done, now, request_of, serve, sse
from chatpipe.clients import make_redis
from chatpipe.history import alone
from chatpipe.keys import Keys
from chatpipe.schemas import CancelBody, ChatBody
from chatpipe.settings import Settings

ACTIVE_TTL_S = 300
CANCEL_TTL_S = 60


def create_app(settings: Settings, check_every: int) -> FastAPI:
    provider = make_provider(settings)
    keys = Keys.from_settings(settings)
    redis = make_redis(settings, max_connections=256)
    app = FastAPI(title=f"bench seed baseline (flag every {check_every} chunk)")

    @app.post("/chat")
    async def chat(body: ChatBody) -> SSEResponse:
        req = request_of(body, uuid.uuid4().hex)
        active = keys.active(req.session_id)
        flag = keys.cancel(req.session_id, req.message_id)
        await redis.setex(active, ACTIVE_TTL_S, req.message_id)  # register_active_stream

        async def events() -> AsyncIterator[dict[str, Any]]:
            seq, status = 0, "completed"
            try:
                async for delta in provider.stream(req, alone(req)):
                    at = now()
                    seq += 1
                    if seq % check_every == 0 and await redis.get(flag) is not None:
                        status = "cancelled"
                        break
                    yield chunk(seq, delta, at)
                yield done(seq + 1, status)
            finally:
                await redis.delete(active)  # clear_active_stream
                await redis.delete(flag)  # clear_cancel_flag

        return sse(settings, events())

    @app.post("/cancel")
    async def cancel(body: CancelBody) -> dict[str, str]:
        active = await redis.get(keys.active(body.session_id))
        if isinstance(active, bytes):
            active = active.decode()
        if active == body.message_id:
            await redis.setex(keys.cancel(body.session_id, body.message_id), CANCEL_TTL_S, "1")
            return {"status": "cancelled", "message": "Streaming cancelled successfully"}
        return {"status": "completed", "message": "Message already completed"}

    return app


def main() -> None:
    settings = Settings()
    serve(create_app(settings, int(os.environ.get("CHECK_EVERY", "1"))), settings)


if __name__ == "__main__":
    main()
