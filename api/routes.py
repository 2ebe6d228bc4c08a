"""HTTP routes of contract v1. Thin: parse, call the service, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import Caller, StreamCaller
from api.limits import Slot
from api.service import CANCEL_MESSAGES, ChatService
from api.sse import SSEResponse, sse_response
from chatpipe.history import SessionMessages
from chatpipe.schemas import (
    ID_PATTERN,
    CancelBody,
    CancelResult,
    ChatAccepted,
    ChatBody,
    MessageInfo,
    SessionCancelled,
    SessionDeleted,
)

router = APIRouter()

NOT_FOUND_DOC: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such message (in this session)"}
}
AUTH_DOC: dict[int | str, dict[str, Any]] = {
    401: {"description": "AUTH_MODE on: missing, invalid or expired credentials"},
    403: {"description": "AUTH_MODE on: the session or message belongs to another user"},
}
LIMIT_DOC: dict[int | str, dict[str, Any]] = {
    429: {"description": "a per-user limit is reached; see Retry-After"},
    503: {"description": "unavailable or this instance's SSE connections are full; Retry-After"},
}
# FastAPI answers 400 to a body that is not JSON at all (422 to JSON that does not validate);
# found undocumented by the schemathesis run (tests/security/test_fuzz_api.py)
BODY_DOC: dict[int | str, dict[str, Any]] = {400: {"description": "the body is not valid JSON"}}


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


def _sse(request: Request, events: Any, slot: Slot, **headers: str) -> SSEResponse:
    """The SSE response of a stream (api/sse.py); it releases `slot` however it ends."""
    return sse_response(request, events, slot.release, **headers)


def _stream_url(request: Request, message_id: str, user_id: str | None) -> str:
    """The contract's path; with AUTH_MODE on, plus a short-lived stream token for this
    message (an EventSource cannot send an Authorization header)."""
    url = f"/api/chat/{message_id}/stream"
    tokens = request.app.state.auth.stream_tokens
    if tokens is None or user_id is None:
        return url
    return f"{url}?token={tokens.issue(message_id, user_id)}"


@router.post(
    "/api/chat",
    status_code=202,
    response_model=ChatAccepted,
    tags=["chat"],
    responses={
        **AUTH_DOC,
        **BODY_DOC,
        409: {"description": "message_id already used, or if_busy=reject and the session is busy"},
        413: {"description": "message too large"},
        **LIMIT_DOC,
        503: {"description": "Kafka or Redis unavailable; see Retry-After"},
    },
)
async def post_chat(body: ChatBody, request: Request, caller: Caller) -> ChatAccepted:
    """Queue a chat message. The request is in Kafka (acks=all) before the 202. With AUTH_MODE
    on, the user is the authenticated one and `stream_url` carries a stream token."""
    req = await _service(request).submit(body, caller, request.headers.get("traceparent"))
    return ChatAccepted(
        message_id=req.message_id,
        session_id=req.session_id,
        stream_url=_stream_url(request, req.message_id, req.user_id if caller else None),
    )


@router.get(
    "/api/chat/{message_id}/stream",
    tags=["chat"],
    responses={
        400: {"description": "Last-Event-ID is not a stream id (`<ms>-<seq>`, unsigned 64-bit)"},
        **NOT_FOUND_DOC,
        **AUTH_DOC,
        **LIMIT_DOC,
    },
    response_class=SSEResponse,
)
async def get_stream(
    message_id: str,
    request: Request,
    caller: StreamCaller,
    last_event_id: Annotated[str | None, Header()] = None,
) -> SSEResponse:
    """The answer as Server-Sent Events: `chunk` {seq, delta}, then one `done` {status, reason?}.
    With AUTH_MODE on: the `token` of `stream_url`, or the bearer header."""
    events, slot = await _service(request).open_stream(message_id, last_event_id, caller)
    return _sse(request, events, slot)


@router.post(
    "/api/chat/stream",
    tags=["chat"],
    response_class=SSEResponse,
    responses={
        **AUTH_DOC,
        **BODY_DOC,
        409: {"description": "message_id already used, or if_busy=reject and the session is busy"},
        413: {"description": "message too large"},
        **LIMIT_DOC,
    },
)
async def post_chat_stream(body: ChatBody, request: Request, caller: Caller) -> SSEResponse:
    """Queue a chat message and answer with its SSE stream directly."""
    service = _service(request)
    req, slot = await service.submit_to_stream(body, caller, request.headers.get("traceparent"))
    events, slot = await service.open_stream(req.message_id, None, caller, slot)
    return _sse(request, events, slot, **{"X-Message-Id": req.message_id})


async def _cancel(body: CancelBody, request: Request, caller: Caller) -> Response:
    status = await _service(request).cancel(body, caller)
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


CANCEL_DOC = {**NOT_FOUND_DOC, **AUTH_DOC, **BODY_DOC}


@router.post("/api/cancel", response_model=CancelResult, tags=["cancel"], responses=CANCEL_DOC)
async def post_cancel(body: CancelBody, request: Request, caller: Caller) -> Response:
    """Stop a message on the first click, whichever instance receives it."""
    return await _cancel(body, request, caller)


@router.post("/cancel", response_model=CancelResult, tags=["cancel"], responses=CANCEL_DOC)
async def post_cancel_seed(body: CancelBody, request: Request, caller: Caller) -> Response:
    """The seed's cancel path, kept for its callers: same as `POST /api/cancel`."""
    return await _cancel(body, request, caller)


@router.post(
    "/api/sessions/{session_id}/cancel",
    response_model=SessionCancelled,
    tags=["cancel"],
    responses={**AUTH_DOC, 503: {"description": "Kafka or Redis unavailable; see Retry-After"}},
)
async def post_session_cancel(
    session_id: Annotated[str, Path(pattern=ID_PATTERN)], request: Request, caller: Caller
) -> SessionCancelled:
    """Stop every queued and streaming message of the session, from any instance."""
    return await _service(request).cancel_session(session_id, caller)


@router.delete(
    "/api/sessions/{session_id}",
    response_model=SessionDeleted,
    tags=["sessions"],
    responses={
        **AUTH_DOC,
        503: {"description": "Kafka or Redis unavailable, or still stopping; see Retry-After"},
    },
)
async def delete_session(
    session_id: Annotated[str, Path(pattern=ID_PATTERN)], request: Request, caller: Caller
) -> SessionDeleted:
    """Stop everything of the session, then remove its history and its messages' state."""
    return await _service(request).delete_session(session_id, caller)


@router.get(
    "/api/chat/{message_id}",
    response_model=MessageInfo,
    tags=["chat"],
    responses={**NOT_FOUND_DOC, **AUTH_DOC, 503: {"description": "Redis unavailable"}},
)
async def get_message(
    message_id: Annotated[str, Path(pattern=ID_PATTERN)], request: Request, caller: Caller
) -> MessageInfo:
    """The message's state and who handled it: the ai_consumer that generated it, the api
    that served its stream, the api that took its cancel, its takeovers."""
    return await _service(request).describe(message_id, caller)


@router.get(
    "/api/sessions/{session_id}/messages",
    response_model=SessionMessages,
    tags=["sessions"],
    responses={**AUTH_DOC, 503: {"description": "Redis unavailable; see Retry-After"}},
)
async def get_session_messages(
    session_id: Annotated[str, Path(pattern=ID_PATTERN)],
    request: Request,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=200, description="at most this many turns")] = 50,
    before: Annotated[
        str | None,
        Query(pattern=ID_PATTERN, description="only turns older than this message id"),
    ] = None,
) -> SessionMessages:
    """The session's conversation, oldest first: the newest `limit` turns (before `before`)."""
    return await _service(request).session_messages(session_id, caller, limit, before)


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
