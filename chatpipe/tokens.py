"""Stream tokens: short-lived signed grants to read one message's SSE stream.

A browser's `EventSource` cannot send an `Authorization` header, so `POST /api/chat` puts one of
these in `stream_url` (`?token=`). It is a JWT (HS256) whose audience is fixed to
`chatpipe-stream`, with the message id (`mid`), the user (`sub`) and an expiry; it is signed with
`STREAM_TOKEN_SECRET` (or a key derived from `JWT_SECRET`), so every api instance verifies what
any other issued, and it cannot be passed off as a bearer token (another audience, another key).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

import jwt

from chatpipe.errors import ChatpipeError
from chatpipe.settings import Settings

AUDIENCE = "chatpipe-stream"
ALGORITHM = "HS256"


class StreamTokenError(ChatpipeError):
    """A stream token that cannot be used: `status` 401 (unusable) or 403 (another message)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class StreamGrant:
    message_id: str
    user_id: str
    expires_at: int


def stream_key(settings: Settings) -> bytes:
    """The signing key: STREAM_TOKEN_SECRET, else one derived from the HS256 JWT_SECRET
    (a separate key, so a stream token never verifies as a bearer JWT and vice versa)."""
    own = settings.stream_token_secret.get_secret_value()
    if own:
        return own.encode()
    shared = settings.jwt_secret.get_secret_value()
    if settings.auth_mode == "jwt" and settings.jwt_algorithm == "HS256" and shared:
        return hmac.new(shared.encode(), b"chatpipe stream token v1", hashlib.sha256).digest()
    raise ChatpipeError(
        "STREAM_TOKEN_SECRET is not set (needed with AUTH_MODE="
        f"{settings.auth_mode}, JWT_ALGORITHM={settings.jwt_algorithm})"
    )


class StreamTokens:
    """Issues and verifies stream tokens with one key and lifetime."""

    def __init__(self, key: bytes, ttl_s: int, leeway_s: int = 0) -> None:
        if len(key) < 32:  # RFC 7518 3.2: an HS256 key has at least 256 bits
            raise ChatpipeError("STREAM_TOKEN_SECRET must be at least 32 bytes")
        self._key = key
        self.ttl_s = ttl_s
        self.leeway_s = leeway_s

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamTokens:
        return cls(stream_key(settings), settings.stream_token_ttl_s)

    def issue(self, message_id: str, user_id: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "aud": AUDIENCE,
            "sub": user_id,
            "mid": message_id,
            "iat": issued,
            "exp": issued + self.ttl_s,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str, message_id: str) -> StreamGrant:
        """The grant of `token` for `message_id`; StreamTokenError (401 expired or invalid,
        403 issued for another message) otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub", "mid", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise StreamTokenError("stream token expired") from None
        except jwt.InvalidSignatureError:
            raise StreamTokenError("stream token invalid: bad signature") from None
        except jwt.InvalidTokenError as e:
            raise StreamTokenError(f"stream token invalid: {e}") from None
        if claims["mid"] != message_id:
            raise StreamTokenError("stream token is for another message", status=403)
        return StreamGrant(str(claims["mid"]), str(claims["sub"]), int(claims["exp"]))
