"""create_app + lifespan: clients are created here and passed in, never at import."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.hub import Hub
from api.middleware import RequestCounter
from api.readiness import Readiness
from api.routes import router
from api.service import ChatService, Conflict, NotFound, TooLarge
from chatpipe.clients import ProducerHandle, make_producer, make_redis
from chatpipe.errors import ChatpipeError, Unavailable
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)

STATUS = {Conflict: 409, TooLarge: 413, NotFound: 404, Unavailable: 503}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        redis = make_redis(settings)
        reader = make_redis(settings, max_connections=2, socket_timeout=30)  # > XREAD BLOCK
        producer = ProducerHandle(
            lambda: make_producer(
                settings, request_timeout_ms=int(settings.api_kafka_timeout_s * 1000)
            )
        )
        await producer.start()
        hub = Hub(
            reader,
            redis,
            Keys.from_settings(settings),
            settings.instance_id,
            metrics,
            settings.sse_client_queue,
        )
        hub.start()
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.service = ChatService(settings, State(redis, settings), producer, hub, metrics)
        app.state.readiness = Readiness(redis, producer)
        app.state.demo_html = resources.files("api").joinpath("static/index.html").read_text()
        log.info(
            "api %s listening on %s:%d", settings.instance_id, settings.api_host, settings.api_port
        )
        try:
            yield
        finally:
            await hub.stop()
            for closer in (producer.stop, reader.aclose, redis.aclose):
                with contextlib.suppress(Exception):
                    await closer()

    app = FastAPI(
        title="chatpipe",
        version="1.0.0",
        summary="Streams LLM chat answers over SSE; cancel on the first click from any instance.",
        lifespan=lifespan,
    )
    app.include_router(router)

    app.add_middleware(RequestCounter)

    @app.exception_handler(ChatpipeError)
    async def on_error(request: Request, exc: ChatpipeError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        headers = {"Retry-After": str(settings.retry_after_s)} if status == 503 else None
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    return app
