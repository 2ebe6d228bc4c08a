"""The limit baseline: `python -m bench.baselines.limit` (API_PORT, SIM_*).

One process streams the simulator straight to SSE. A cancel (`POST /cancel`, same process)
interrupts the local stream at once, also before its first token, like chatpipe's consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from ai_consumer.interrupt import until_set
from ai_consumer.llm.factory import make_provider
from api.sse import SSEResponse
from bench.baselines import chunk, done, now, request_of, serve, sse
from chatpipe.history import alone
from chatpipe.schemas import CancelBody, ChatBody
from chatpipe.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    provider = make_provider(settings)
    app = FastAPI(title="bench limit baseline")
    flags: dict[str, asyncio.Event] = {}  # running, or cancelled before it started
    finished: OrderedDict[str, None] = OrderedDict()

    @app.post("/chat")
    async def chat(body: ChatBody) -> SSEResponse:
        req = request_of(body, uuid.uuid4().hex)
        cancelled = flags.setdefault(req.message_id, asyncio.Event())

        async def events() -> AsyncIterator[dict[str, Any]]:
            seq = 0
            try:
                async with contextlib.aclosing(
                    until_set(
                        provider.stream(req, alone(req)),
                        cancelled,
                    )
                ) as tokens:
                    async for delta in tokens:
                        seq += 1
                        yield chunk(seq, delta, now())
                yield done(seq + 1, "cancelled" if cancelled.is_set() else "completed")
            finally:
                flags.pop(req.message_id, None)
                finished[req.message_id] = None
                while len(finished) > 100_000:
                    finished.popitem(last=False)

        return sse(settings, events())

    @app.post("/cancel")
    async def cancel(body: CancelBody) -> dict[str, str]:
        if body.message_id in finished:
            return {"status": "completed", "message": "Message already completed"}
        flags.setdefault(body.message_id, asyncio.Event()).set()
        return {"status": "cancelled", "message": "Streaming cancelled successfully"}

    return app


def main() -> None:
    settings = Settings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
