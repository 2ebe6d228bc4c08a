"""What a request with a body must show before the api reads that body: its credentials and its
size.

FastAPI reads and parses a route's body before it runs the route's dependencies, so without
this layer an api with AUTH_MODE on waited for (and held in memory) the whole body of anyone,
credentials or not, and only the message text had a cap (MAX_MESSAGE_BYTES, after the parse).
This layer answers first:

- AUTH_MODE on: a POST without valid credentials is answered 401 from its headers alone; its
  body is never read. The principal is kept in the scope (`PRINCIPAL`), so the route's
  `caller` dependency does not verify the token a second time.
- A body over `max_bytes` (API_MAX_BODY_BYTES) is answered 413: on its Content-Length before
  any of it is read, or, chunked, as soon as the bytes read pass the cap.

The body is read here, at most `max_bytes` of it, and handed to the app as one message.
Starlette's own `RequestBodyLimitMiddleware` (FastAPI's `max_body_size`) caps a body as it is
read, but only once the route reads it (after nothing: auth comes later), and answers a
plain-text "Content Too Large" without saying which limit; hence this small layer.
It never touches a response body.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import PRINCIPAL, Authenticator, credential_of
from chatpipe.errors import ChatpipeError

WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(ChatpipeError):
    """The request's body is over API_MAX_BODY_BYTES: send less (413)."""


class GuardBodies:
    def __init__(
        self,
        app: ASGIApp,
        auth: Authenticator,
        max_bytes: int,
        refuse: Callable[[ChatpipeError, str], Response],
    ) -> None:
        self.app = app
        self.auth = auth
        self.max_bytes = max_bytes
        # the api's error answer (status, reason, headers) of an error on a path
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WITH_BODY:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            if self.auth.enabled:
                scope[PRINCIPAL] = self.auth.authenticate(credential_of(headers))
            body = await self._body(headers, receive)
        except ChatpipeError as e:
            await self.refuse(e, scope.get("path", ""))(scope, receive, send)
            return
        if body is None:
            return  # the client left before its body was in: no one to answer
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:  # the app listens for the client's disconnect from here on
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _body(self, headers: Headers, receive: Receive) -> bytes | None:
        too_large = BodyTooLarge(
            f"the request body is over API_MAX_BODY_BYTES ({self.max_bytes} bytes)"
        )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            raise too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)
