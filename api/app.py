"""create_app + lifespan: clients are created here and passed in, never at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import Authenticator, Forbidden, Unauthenticated, secure_openapi
from api.exiting import ServerExit
from api.guard import BodyTooLarge, GuardBodies
from api.hub import Hub, InvalidStreamId
from api.limits import Full, Limited, RateLimiter, StreamLimits
from api.middleware import RequestCounter
from api.openai.completions import Completions
from api.openai.errors import (
    CODES,
    InvalidRequest,
    UpstreamFailed,
    error_body,
    is_openai,
    openai_error,
    validation_error,
)
from api.openai.responses import Responses
from api.openai.routes import router as openai_router
from api.readiness import Readiness
from api.routes import router
from api.service import ChatService, Conflict, NotFound, TooLarge
from api.stalled import App
from chatpipe.clients import ProducerHandle, make_producer, make_redis
from chatpipe.errors import ChatpipeError, Retry, Unavailable
from chatpipe.gcwatch import GCWatch
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State
from chatpipe.tracing import make_tracing

log = logging.getLogger(__name__)

STATUS = {
    InvalidStreamId: 400,
    InvalidRequest: 400,
    UpstreamFailed: 502,
    Unauthenticated: 401,
    Forbidden: 403,
    Conflict: 409,
    TooLarge: 413,
    BodyTooLarge: 413,
    NotFound: 404,
    Limited: 429,
    Full: 503,
    Unavailable: 503,
    Retry: 503,  # any other transient failure
}


def error_response(exc: ChatpipeError, settings: Settings, path: str = "") -> JSONResponse:
    """The api's answer to an error: its status, `{"detail": reason}` (on the `/v1/` routes
    OpenAI's error object) and the headers that tell the caller what to do (Retry-After,
    WWW-Authenticate)."""
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    headers: dict[str, str] | None = None
    if isinstance(exc, Limited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif status == 503:
        headers = {"Retry-After": str(settings.retry_after_s)}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if is_openai(path):
        return openai_error(exc, status, headers)
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None, exiting: ServerExit | None = None) -> FastAPI:
    """`exiting`: when the server starts shutting down (api/exiting.py; `__main__`'s)."""
    settings = settings or Settings()
    exiting = exiting or ServerExit()
    auth = Authenticator(settings)  # reads key files now: a bad setting fails the start

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        redis = make_redis(settings)
        # the hub's blocking reads: one at a time on a single Redis, one per bucket on a cluster
        readers = settings.redis_key_buckets + 1 if settings.redis_cluster else 2
        reader = make_redis(settings, max_connections=readers, socket_timeout=30)  # > XREAD BLOCK
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
            read_interval_s=settings.sse_read_interval_ms / 1000,
            per_bucket=settings.redis_cluster,
        )
        hub.start()
        app.state.settings = settings
        app.state.metrics = metrics
        tracing = make_tracing(settings, "api")
        keys = Keys.from_settings(settings)
        streams = StreamLimits(
            redis,
            keys,
            metrics,
            max_connections=settings.sse_max_connections,
            per_user=settings.max_streams_per_user,
            slot_ttl_s=settings.stream_slot_ttl_s,
            retry_after_s=settings.retry_after_s,
            prefix=settings.instance_id,
        )
        streams.start()
        rate = RateLimiter(redis, keys, settings.rate_limit_per_minute, metrics)
        app.state.service = ChatService(
            settings,
            State(redis, settings),
            producer,
            hub,
            metrics,
            rate,
            streams,
            tracing=tracing,
        )
        app.state.completions = Completions(app.state.service, settings)
        app.state.responses = Responses(app.state.service, settings)
        app.state.readiness = Readiness(redis, producer)
        app.state.demo_html = resources.files("api").joinpath("static/index.html").read_text()
        log.info(
            "api %s listening on %s:%d", settings.instance_id, settings.api_host, settings.api_port
        )
        app.state.exiting = exiting
        watching = asyncio.create_task(exiting.watch(), name="server-exit")
        gc_watch = GCWatch(metrics).install()
        try:
            yield
        finally:
            gc_watch.uninstall()
            watching.cancel()
            await streams.stop()
            await hub.stop()
            for closer in (producer.stop, reader.aclose, redis.aclose):
                with contextlib.suppress(Exception):
                    await closer()
            tracing.close()

    app = App(  # FastAPI that drops clients which stopped reading (api/stalled.py)
        title="chatpipe",
        version="1.4.0",  # docs/contract.md, HTTP versions
        summary="Streams LLM chat answers over SSE; cancel on the first click from any instance.",
        lifespan=lifespan,
    )
    app.state.auth = auth
    app.include_router(router)
    app.include_router(openai_router)
    secure_openapi(app, auth)

    # credentials and size before the body is read (inside CORS: its answers get CORS headers)
    app.add_middleware(
        GuardBodies,
        auth=auth,
        max_bytes=settings.api_max_body_bytes,
        refuse=lambda e, path: error_response(e, settings, path),
    )
    app.add_middleware(RequestCounter)
    origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
    if origins:  # empty: no CORS headers, browsers allow same-origin only
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-API-Key"],
            expose_headers=["Retry-After", "X-Message-Id", "X-Chatpipe-Message-Id"],
            max_age=600,
        )

    @app.exception_handler(ChatpipeError)
    async def on_error(request: Request, exc: ChatpipeError) -> JSONResponse:
        answer = error_response(exc, settings, request.url.path)
        if answer.status_code >= 500:
            log.warning(
                "%s %s -> %d: %s", request.method, request.url.path, answer.status_code, exc
            )
        return answer

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        if is_openai(request.url.path):
            return validation_error(exc.errors())
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if is_openai(request.url.path):
            body = error_body(exc.status_code, str(exc.detail), None, CODES.get(exc.status_code))
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    return app
