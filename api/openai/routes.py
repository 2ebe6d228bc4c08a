"""The `/v1/` routes: OpenAI's chat completions and models, on chatpipe's pipeline. Thin:
parse, call api/openai/completions.py, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from api.auth import Caller
from api.limits import Slot
from api.openai.completions import Completions
from api.openai.responses import Responses, response_object
from api.openai.schemas import CompletionRequest, Model, ModelList, ResponseRequest
from api.sse import SSEResponse, sse_response
from chatpipe.schemas import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid or unsupported parameter (OpenAI error object)"},
    401: {"description": "AUTH_MODE on: missing or invalid API key"},
    404: {"description": "unknown model"},
    429: {"description": "a per-user limit is reached; see Retry-After"},
    502: {"description": "the model server failed the answer"},
    503: {"description": "Kafka or Redis unavailable; see Retry-After"},
}


STREAMS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the object (JSON), or with `stream: true` its events (text/event-stream)",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    **ERRORS,
}


def _sse(request: Request, events: Any, slot: Slot, **headers: str) -> SSEResponse:
    """The SSE response of a stream (api/sse.py); it releases `slot` however it ends."""
    return sse_response(request, events, slot.release, **headers)


def _responses(request: Request) -> Responses:
    responses: Responses = request.app.state.responses
    return responses


ResponseId = Annotated[str, Path(pattern=ID_PATTERN, description="the response's id (resp_...)")]


def _completions(request: Request) -> Completions:
    completions: Completions = request.app.state.completions
    return completions


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(request: Request, caller: Caller) -> ModelList:
    """The model names `model` may take."""
    return ModelList(data=[Model(id=name) for name in _completions(request).models])


@router.post("/chat/completions", responses=STREAMS)
async def chat_completions(body: CompletionRequest, request: Request, caller: Caller) -> Response:
    """OpenAI's chat completion, streamed (`stream: true`) or whole; closing the stream (or the
    connection) cancels the answer."""
    completions = _completions(request)
    chat, message_id, entries, slot = await completions.start(body, request, caller)
    headers = {"X-Chatpipe-Message-Id": message_id, "X-Chatpipe-Session-Id": chat.session_id}
    if body.stream:
        events = completions.stream(body, chat, message_id, entries, caller)
        return _sse(request, events, slot, **headers)
    try:
        whole = await completions.whole(body, chat, message_id, entries, caller, request)
    finally:
        await slot.release()
    return JSONResponse(whole.model_dump(mode="json"), headers=headers)


@router.post("/responses", responses=STREAMS)
async def create_response(body: ResponseRequest, request: Request, caller: Caller) -> Response:
    """A response: `background: true` answers at once (`queued`) and the answer goes on
    without the client; `stream: true` streams its events (resume: `GET ...?stream=true`)."""
    responses = _responses(request)
    asked = await responses.create(body, caller, request.headers.get("traceparent"))
    if body.stream:
        events, slot = await responses.events(asked, caller)
        return _sse(request, events, slot)
    if body.background:
        return JSONResponse(response_object(asked, "queued", "", None, None))
    return JSONResponse(await responses.wait_final(asked, caller))


@router.get("/responses/{response_id}", responses=STREAMS)
async def get_response(
    response_id: ResponseId,
    request: Request,
    caller: Caller,
    stream: bool = False,
    starting_after: Annotated[
        int | None, Query(ge=-1, description="resume after this sequence_number")
    ] = None,
) -> Response:
    """The response (any instance); `stream=true`: its events, after `starting_after`."""
    responses = _responses(request)
    if stream:
        asked = await responses.asked(response_id, caller)
        events, slot = await responses.events(asked, caller, starting_after)
        return _sse(request, events, slot)
    return JSONResponse(await responses.retrieve(response_id, caller))


@router.post("/responses/{response_id}/cancel", responses=ERRORS)
async def cancel_response(response_id: ResponseId, request: Request, caller: Caller) -> Response:
    """Stop the response from any instance; a finished one is returned unchanged."""
    return JSONResponse(await _responses(request).cancel(response_id, caller))
