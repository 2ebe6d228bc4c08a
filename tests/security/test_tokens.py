"""Stream tokens (chatpipe/tokens.py): what `stream_url` carries so an EventSource can open the
stream of one message, and nothing else, for a short while."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from chatpipe.errors import ChatpipeError
from chatpipe.settings import Settings
from chatpipe.tokens import AUDIENCE, StreamTokenError, StreamTokens, stream_key

KEY = b"k" * 32


def tokens(ttl_s: int = 300) -> StreamTokens:
    return StreamTokens(KEY, ttl_s)


def test_a_token_opens_its_own_message() -> None:
    grant = tokens().verify(tokens().issue("m-1", "alice"), "m-1")
    assert (grant.message_id, grant.user_id) == ("m-1", "alice")
    assert grant.expires_at - time.time() == pytest.approx(300, abs=5)


def test_an_expired_token_is_rejected_with_401() -> None:
    old = tokens(ttl_s=60).issue("m-1", "alice", now=time.time() - 61)
    with pytest.raises(StreamTokenError, match="expired") as caught:
        tokens().verify(old, "m-1")
    assert caught.value.status == 401


def test_a_token_for_another_message_is_rejected_with_403() -> None:
    other = tokens().issue("m-2", "alice")
    with pytest.raises(StreamTokenError, match="another message") as caught:
        tokens().verify(other, "m-1")
    assert caught.value.status == 403


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_a_tampered_token_is_rejected_with_401() -> None:
    token = tokens().issue("m-2", "alice")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["mid"] = "m-1"  # point it at another message, keep the signature
    forged = f"{header}.{_b64(claims)}.{signature}"
    with pytest.raises(StreamTokenError, match="signature") as caught:
        tokens().verify(forged, "m-1")
    assert caught.value.status == 401
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(StreamTokenError):
        tokens().verify(flipped, "m-2")
    with pytest.raises(StreamTokenError, match="invalid"):
        tokens().verify("not-a-token", "m-2")


def test_a_token_signed_with_another_key_is_rejected() -> None:
    theirs = StreamTokens(b"x" * 32, 300).issue("m-1", "alice")
    with pytest.raises(StreamTokenError, match="signature"):
        tokens().verify(theirs, "m-1")


def test_an_unsigned_or_other_audience_token_is_rejected() -> None:
    now = int(time.time())
    claims = {"aud": AUDIENCE, "sub": "alice", "mid": "m-1", "exp": now + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(StreamTokenError):
        tokens().verify(unsigned, "m-1")
    bearer_like = jwt.encode({**claims, "aud": "api"}, KEY, algorithm="HS256")
    with pytest.raises(StreamTokenError, match="invalid"):
        tokens().verify(bearer_like, "m-1")


def test_the_key_is_derived_from_the_jwt_secret_or_must_be_set() -> None:
    secret = "s" * 40
    derived = stream_key(Settings(auth_mode="jwt", jwt_secret=secret))
    assert derived != secret.encode()
    assert len(derived) == 32
    own = stream_key(Settings(auth_mode="jwt", jwt_secret=secret, stream_token_secret="t" * 32))
    assert own == b"t" * 32
    with pytest.raises(ChatpipeError, match="STREAM_TOKEN_SECRET"):
        stream_key(Settings(auth_mode="api_key", api_keys="u:k"))
    with pytest.raises(ChatpipeError, match="32 bytes"):
        StreamTokens(b"short", 60)
