"""HTTP routes of contract v1. Thin: parse, call the service, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from api.service import CANCEL_MESSAGES, ChatService
from chatpipe.schemas import CancelBody, CancelResult, ChatAccepted, ChatBody

router = APIRouter()

NOT_FOUND_DOC: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such message (in this session)"}
}


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


def _sse(request: Request, events: Any, **headers: str) -> EventSourceResponse:
    s = request.app.state.settings
    return EventSourceResponse(
        events,
        ping=s.sse_heartbeat_s,
        send_timeout=s.sse_send_timeout_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


def _stream_url(message_id: str) -> str:
    return f"/api/chat/{message_id}/stream"


@router.post(
    "/api/chat",
    status_code=202,
    response_model=ChatAccepted,
    tags=["chat"],
    responses={
        409: {"description": "message_id already used"},
        413: {"description": "message too large"},
        503: {"description": "Kafka or Redis unavailable; see Retry-After"},
    },
)
async def post_chat(body: ChatBody, request: Request) -> ChatAccepted:
    """Queue a chat message. The request is in Kafka (acks=all) before the 202."""
    req = await _service(request).submit(body, request.headers.get("traceparent"))
    return ChatAccepted(
        message_id=req.message_id, session_id=req.session_id, stream_url=_stream_url(req.message_id)
    )


@router.get(
    "/api/chat/{message_id}/stream",
    tags=["chat"],
    responses=NOT_FOUND_DOC,
    response_class=EventSourceResponse,
)
async def get_stream(
    message_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """The answer as Server-Sent Events: `chunk` {seq, delta}, then one `done` {status, reason?}."""
    events = await _service(request).open_stream(message_id, last_event_id)
    return _sse(request, events)


@router.post(
    "/api/chat/stream",
    tags=["chat"],
    response_class=EventSourceResponse,
    responses={413: {"description": "message too large"}, 503: {"description": "unavailable"}},
)
async def post_chat_stream(body: ChatBody, request: Request) -> EventSourceResponse:
    """Queue a chat message and answer with its SSE stream directly."""
    service = _service(request)
    req = await service.submit(body, request.headers.get("traceparent"))
    events = await service.open_stream(req.message_id, None)
    return _sse(request, events, **{"X-Message-Id": req.message_id})


async def _cancel(body: CancelBody, request: Request) -> Response:
    status = await _service(request).cancel(body)
    if status == "not_found":
        return JSONResponse(
            {
                "status": "not_found",
                "message": CANCEL_MESSAGES["not_found"],
                "detail": f"no message {body.message_id} in session {body.session_id}",
            },
            status_code=404,
        )
    shown: Literal["cancelled", "completed"] = "cancelled" if status == "cancelled" else "completed"
    result = CancelResult(status=shown, message=CANCEL_MESSAGES[status], message_id=body.message_id)
    return JSONResponse(result.model_dump())


@router.post("/api/cancel", response_model=CancelResult, tags=["cancel"], responses=NOT_FOUND_DOC)
async def post_cancel(body: CancelBody, request: Request) -> Response:
    """Stop a message on the first click, whichever instance receives it."""
    return await _cancel(body, request)


@router.post("/cancel", response_model=CancelResult, tags=["cancel"], responses=NOT_FOUND_DOC)
async def post_cancel_seed(body: CancelBody, request: Request) -> Response:
    """The seed's cancel path, kept for its callers: same as `POST /api/cancel`."""
    return await _cancel(body, request)


@router.get("/health", tags=["ops"])
async def health(request: Request) -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok", "instance_id": request.app.state.settings.instance_id}


@router.get("/ready", tags=["ops"], responses={503: {"description": "Kafka or Redis unreachable"}})
async def ready(request: Request) -> Response:
    """Readiness: Kafka and Redis reachable."""
    checks = await request.app.state.readiness.check()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ok else "unavailable",
            "checks": checks,
            **(
                {}
                if ok
                else {"detail": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")}
            ),
        },
        status_code=200 if ok else 503,
    )


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.demo_html)
