"""Authentication (api/auth.py): who the caller is, from a bearer JWT (HS256, RS256 with a PEM
key or a JWKS file) or a static API key, and the settings that cannot work refused at start."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from api.auth import AuthConfigError, Authenticator, Unauthenticated, parse_api_keys
from chatpipe.settings import Settings

SECRET = "a-shared-secret-of-at-least-32-bytes!"


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 60, **extra}


def hs256(**overrides: Any) -> Authenticator:
    return Authenticator(Settings(auth_mode="jwt", jwt_secret=SECRET, **overrides))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_auth_off_by_default_authenticates_nobody() -> None:
    auth = Authenticator(Settings())
    assert not auth.enabled
    assert auth.stream_tokens is None


def test_hs256_token_gives_its_subject() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert hs256().authenticate(token).user_id == "alice"


def _hs(payload: dict[str, object], key: str | None = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=alg)


# Tokens are built when the test runs, not at collection: a long run would see "expired".
REJECTED: dict[str, tuple[Callable[[], str | None], str]] = {
    "none": (lambda: None, "missing credentials"),
    "empty": (lambda: "", "missing credentials"),
    "garbage": (lambda: "garbage", "invalid token"),
    "expired": (lambda: _hs(claims(exp=int(time.time()) - 120)), "expired"),
    "wrong-key": (lambda: _hs(claims(), "another-secret-that-is-also-32-bytes!!"), "invalid"),
    "no-exp": (lambda: _hs({"sub": "alice"}), "exp"),
    "no-sub": (lambda: _hs({"exp": int(time.time()) + 60}), "sub"),
    "bad-sub": (lambda: _hs(claims(sub="al ice/..")), "not a valid user id"),
    "alg-none": (lambda: _hs(claims(), None, "none"), "invalid"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_hs256_rejects(case: str) -> None:
    make, why = REJECTED[case]
    with pytest.raises(Unauthenticated, match=why):
        hs256().authenticate(make())


def test_expiry_leeway_covers_clock_skew() -> None:
    just_expired = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert hs256(jwt_leeway_s=30).authenticate(just_expired).user_id == "alice"
    with pytest.raises(Unauthenticated, match="expired"):
        hs256(jwt_leeway_s=0).authenticate(just_expired)


def test_audience_and_issuer_are_checked_when_set() -> None:
    auth = hs256(jwt_audience="chatpipe", jwt_issuer="https://idp.example")
    good = jwt.encode(claims(aud="chatpipe", iss="https://idp.example"), SECRET, algorithm="HS256")
    assert auth.authenticate(good).user_id == "alice"
    for bad in (
        claims(aud="other", iss="https://idp.example"),
        claims(aud="chatpipe", iss="https://evil.example"),
        claims(iss="https://idp.example"),
    ):
        with pytest.raises(Unauthenticated):
            auth.authenticate(jwt.encode(bad, SECRET, algorithm="HS256"))


def test_rs256_with_a_pem_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "pub.pem"
    path.write_text(pem(rsa_key))
    auth = Authenticator(
        Settings(
            auth_mode="jwt",
            jwt_algorithm="RS256",
            jwt_public_key_file=str(path),
            stream_token_secret="t" * 32,
        )
    )
    assert auth.authenticate(jwt.encode(claims(), rsa_key, algorithm="RS256")).user_id == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated, match="invalid"):
        auth.authenticate(jwt.encode(claims(), other, algorithm="RS256"))
    # algorithm confusion: an HS256 token signed with the public key's text is refused
    with pytest.raises(Unauthenticated):
        auth.authenticate(jwt.encode(claims(), "x" * 64, algorithm="HS256"))


def test_rs256_with_a_jwks_file_picks_the_key_by_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {"keys": []}
    for kid, key in (("k1", rsa_key), ("k2", second)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    auth = Authenticator(
        Settings(
            auth_mode="jwt",
            jwt_algorithm="RS256",
            jwt_jwks_file=str(path),
            stream_token_secret="t" * 32,
        )
    )
    for kid, key in (("k1", rsa_key), ("k2", second)):  # rotation: both keys valid at once
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})
        assert auth.authenticate(token).user_id == "alice"
    wrong = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(Unauthenticated):
        auth.authenticate(wrong)
    unknown = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k9"})
    with pytest.raises(Unauthenticated, match="kid"):
        auth.authenticate(unknown)


def test_api_keys_map_to_users() -> None:
    auth = Authenticator(
        Settings(
            auth_mode="api_key", api_keys="alice:key-a, bob:key-b", stream_token_secret="t" * 32
        )
    )
    assert auth.authenticate("key-a").user_id == "alice"
    assert auth.authenticate("key-b").user_id == "bob"
    with pytest.raises(Unauthenticated, match="invalid API key"):
        auth.authenticate("key-c")
    assert parse_api_keys("u1:k:with:colons") == {"k:with:colons": "u1"}


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"auth_mode": "jwt"}, "JWT_SECRET"),
        ({"auth_mode": "jwt", "jwt_secret": "short"}, "JWT_SECRET"),
        ({"auth_mode": "jwt", "jwt_algorithm": "RS256"}, "JWT_PUBLIC_KEY_FILE"),
        (
            {"auth_mode": "jwt", "jwt_algorithm": "RS256", "jwt_public_key_file": "/nonexistent"},
            "unreadable",
        ),
        ({"auth_mode": "api_key"}, "API_KEYS"),
        ({"auth_mode": "api_key", "api_keys": "nokey"}, "API_KEYS"),
        ({"auth_mode": "api_key", "api_keys": "alice:k"}, "STREAM_TOKEN_SECRET"),
        ({"enforce_ownership": True}, "ENFORCE_OWNERSHIP"),
    ],
    ids=[
        "no-secret",
        "short-secret",
        "no-key",
        "bad-file",
        "no-keys",
        "bad-keys",
        "no-stream",
        "own",
    ],
)
def test_unusable_settings_stop_the_start(values: dict[str, Any], why: str) -> None:
    with pytest.raises(AuthConfigError, match=why):
        Authenticator(Settings(**values))


def test_secrets_do_not_show_in_settings_repr() -> None:
    s = Settings(auth_mode="jwt", jwt_secret=SECRET, api_keys="alice:key-a")
    assert SECRET not in repr(s)
    assert "key-a" not in repr(s)
