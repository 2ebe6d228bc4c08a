"""The `/v1/` routes: OpenAI's chat completions and models, on chatpipe's pipeline. Thin:
parse, call api/openai/completions.py, shape the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.auth import Caller
from api.openai.completions import Completions
from api.openai.schemas import CompletionRequest, Model, ModelList
from api.sse import SSEResponse

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid or unsupported parameter (OpenAI error object)"},
    401: {"description": "AUTH_MODE on: missing or invalid API key"},
    404: {"description": "unknown model"},
    429: {"description": "a per-user limit is reached; see Retry-After"},
    502: {"description": "the model server failed the answer"},
    503: {"description": "Kafka or Redis unavailable; see Retry-After"},
}


def _completions(request: Request) -> Completions:
    completions: Completions = request.app.state.completions
    return completions


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(request: Request, caller: Caller) -> ModelList:
    """The model names `model` may take."""
    return ModelList(data=[Model(id=name) for name in _completions(request).models])


@router.post("/chat/completions", responses=ERRORS)
async def chat_completions(body: CompletionRequest, request: Request, caller: Caller) -> Response:
    """OpenAI's chat completion, streamed (`stream: true`) or whole; closing the stream (or the
    connection) cancels the answer."""
    completions = _completions(request)
    chat, message_id, entries, slot = await completions.start(body, request, caller)
    headers = {"X-Chatpipe-Message-Id": message_id, "X-Chatpipe-Session-Id": chat.session_id}
    if body.stream:
        s = request.app.state.settings
        return SSEResponse(
            completions.stream(body, chat, message_id, entries, caller),
            slot.release,
            heartbeat_s=s.sse_heartbeat_s,
            send_timeout_s=s.sse_send_timeout_s,
            headers=headers,
        )
    try:
        whole = await completions.whole(body, chat, message_id, entries, caller, request)
    finally:
        await slot.release()
    return JSONResponse(whole.model_dump(mode="json"), headers=headers)
