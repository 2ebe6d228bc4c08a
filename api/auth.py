"""Who is calling: bearer JWT (HS256 secret, RS256 PEM key or JWKS file) or a static API key.

`AUTH_MODE=none` (the default: local dev, the v1 contract tests) authenticates nobody and every
dependency here answers None. Otherwise a request without valid credentials is refused with 401
and `WWW-Authenticate: Bearer`; the user id is the token's `sub` (or the API key's user) and
never comes from a request body. Keys are read once, when the app starts.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, Query, Request
from starlette.datastructures import Headers

from chatpipe.errors import ChatpipeError
from chatpipe.schemas import ID_PATTERN
from chatpipe.settings import Settings
from chatpipe.tokens import StreamTokenError, StreamTokens

USER_ID = re.compile(ID_PATTERN)
PRINCIPAL = "chatpipe.principal"  # the scope key of a caller api/guard.py authenticated


class Unauthenticated(ChatpipeError):
    """No usable credentials: 401."""


class Forbidden(ChatpipeError):
    """Authenticated, but not allowed to touch this session or message: 403."""


class AuthConfigError(ChatpipeError):
    """The auth settings cannot work (missing key, unreadable file): the api does not start."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise AuthConfigError(f"{what} {path!r} is unreadable: {e.strerror}") from None


def parse_api_keys(spec: str) -> dict[str, str]:
    """`user1:key1,user2:key2` -> {key: user}."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        user, sep, key = item.partition(":")
        if not sep or not user or not key:
            raise AuthConfigError("API_KEYS must look like user1:key1,user2:key2")
        if not USER_ID.match(user):
            raise AuthConfigError(f"API_KEYS: {user!r} is not a valid user id")
        out[key] = user
    if not out:
        raise AuthConfigError("AUTH_MODE=api_key needs API_KEYS")
    return out


class Authenticator:
    """Verifies credentials for one `AUTH_MODE`; built once at start-up from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self.leeway = settings.jwt_leeway_s
        self.audience = settings.jwt_audience or None
        self.issuer = settings.jwt_issuer or None
        self.algorithm = settings.jwt_algorithm
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        self._api_keys: dict[str, str] = {}
        self.stream_tokens: StreamTokens | None = None
        if self.mode == "none":
            if settings.enforce_ownership:
                raise AuthConfigError(
                    "ENFORCE_OWNERSHIP=true needs AUTH_MODE on the api (no caller identity)"
                )
            return
        if self.mode == "api_key":
            self._api_keys = parse_api_keys(settings.api_keys.get_secret_value())
        elif self.algorithm == "HS256":
            secret = settings.jwt_secret.get_secret_value()
            if len(secret.encode()) < 32:
                raise AuthConfigError("JWT_SECRET must be set, at least 32 bytes (HS256)")
            self._key = secret
        elif settings.jwt_jwks_file:
            try:
                self._jwks = jwt.PyJWKSet.from_dict(
                    json.loads(_read(settings.jwt_jwks_file, "JWT_JWKS_FILE"))
                )
            except (ValueError, jwt.PyJWKSetError) as e:
                raise AuthConfigError(f"JWT_JWKS_FILE is not a usable JWKS: {e}") from None
        elif settings.jwt_public_key_file:
            self._key = _read(settings.jwt_public_key_file, "JWT_PUBLIC_KEY_FILE")
        else:
            raise AuthConfigError("RS256 needs JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE")
        try:
            self.stream_tokens = StreamTokens.from_settings(settings)
        except ChatpipeError as e:
            raise AuthConfigError(str(e)) from None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def authenticate(self, credential: str | None) -> Principal:
        """The caller behind a bearer token or API key; Unauthenticated otherwise."""
        if not credential:
            raise Unauthenticated("missing credentials: send Authorization: Bearer <token>")
        if self.mode == "api_key":
            return self._api_key(credential)
        return self._jwt(credential)

    def _api_key(self, given: str) -> Principal:
        found = None
        for key, user in self._api_keys.items():  # compare with every key, in constant time
            if hmac.compare_digest(key.encode(), given.encode()):
                found = user
        if found is None:
            raise Unauthenticated("invalid API key")
        return Principal(found)

    def _verification_key(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        keys = self._jwks.keys
        if kid is None and len(keys) == 1:
            return keys[0].key
        for k in keys:
            if k.key_id == kid:
                return k.key
        raise Unauthenticated("invalid token: no key with this kid in the JWKS")

    def _jwt(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._verification_key(token),
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID.match(sub):
            raise Unauthenticated("invalid token: `sub` is not a valid user id")
        return Principal(sub)


def credential_of(headers: Headers) -> str | None:
    """`Authorization: Bearer <token>`, else `X-API-Key`. Read by hand rather than with
    FastAPI's security classes, so the OpenAPI document declares security only when it is on
    (`secure_openapi`)."""
    header = headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated("Authorization must be `Bearer <token>`")
        return value.strip()
    return headers.get("x-api-key")


def authenticator(request: Request) -> Authenticator:
    auth: Authenticator = request.app.state.auth
    return auth


async def caller(request: Request) -> Principal | None:
    """The authenticated caller, or None with AUTH_MODE=none."""
    auth = authenticator(request)
    if not auth.enabled:
        return None
    checked: Principal | None = request.scope.get(PRINCIPAL)  # api/guard.py, before the body
    return checked or auth.authenticate(credential_of(request.headers))


async def stream_caller(
    request: Request,
    message_id: str,
    token: Annotated[
        str | None,
        Query(description="stream token from `stream_url` (EventSource cannot send headers)"),
    ] = None,
) -> Principal | None:
    """The caller of a stream: a stream token for this message (from `stream_url`) or the
    usual credentials. None with AUTH_MODE=none."""
    auth = authenticator(request)
    if not auth.enabled:
        return None
    if token is not None:
        assert auth.stream_tokens is not None
        try:
            grant = auth.stream_tokens.verify(token, message_id)
        except StreamTokenError as e:
            if e.status == 403:
                raise Forbidden(e.reason) from None
            raise Unauthenticated(e.reason) from None
        return Principal(grant.user_id)
    return auth.authenticate(credential_of(request.headers))


Caller = Annotated[Principal | None, Depends(caller)]
StreamCaller = Annotated[Principal | None, Depends(stream_caller)]


SECURED_TAGS = {"chat", "cancel"}


def secure_openapi(app: FastAPI, auth: Authenticator) -> None:
    """With AUTH_MODE on, declare the bearer (and API key) schemes on the chat and cancel
    operations of the OpenAPI document; with it off the document declares none (it is true)."""
    if not auth.enabled:
        return
    build = app.openapi
    schemes: dict[str, Any] = {"bearer": {"type": "http", "scheme": "bearer"}}
    if auth.mode == "api_key":
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = schemes
            for operations in schema["paths"].values():
                for op in operations.values():
                    if SECURED_TAGS & set(op.get("tags", ())):
                        op["security"] = [{name: []} for name in schemes]
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
