"""Errors the OpenAI way on the `/v1/` routes: `{"error": {"message", "type", "param", "code"}}`
with the status codes the official SDKs map to their exception classes (400 BadRequestError,
401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 429
RateLimitError, 5xx InternalServerError). A request body that does not validate is a 400 naming
the parameter (OpenAI answers 400 where FastAPI would answer 422)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from api.service import NotFound
from chatpipe.errors import ChatpipeError

PREFIX = "/v1/"

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded", 413: "too_large"}


class InvalidRequest(ChatpipeError):
    """The request asks for something chatpipe cannot do: fix the named parameter."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class UpstreamFailed(ChatpipeError):
    """The model server failed the answer (its reason in the message): retry or give up."""

    code = "upstream_error"


class ModelNotFound(NotFound):
    """The `model` is not one of the served models (`GET /v1/models`)."""


def is_openai(path: str) -> bool:
    return path.startswith(PREFIX)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(
    exc: ChatpipeError, status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The OpenAI-style answer to a chatpipe error that maps to `status`."""
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or CODES.get(status)
    if isinstance(exc, ModelNotFound):
        code = "model_not_found"
    return JSONResponse(
        error_body(status, str(exc), param, code), status_code=status, headers=headers
    )


def validation_error(errors: Sequence[Any]) -> JSONResponse:
    """A body that does not validate: 400 naming the first parameter at fault."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    loc = [p for p in loc if not _union_branch(p)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return JSONResponse(error_body(400, message, param, code), status_code=400)


TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _union_branch(part: str) -> bool:
    """A part of a pydantic error location that names a union's branch (`str`,
    `list[InputItem]`, `function-after[...]`), not a parameter."""
    return part in TYPE_NAMES or "[" in part or part.startswith(("function-", "tagged-union"))
