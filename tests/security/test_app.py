"""The app's security wiring without Kafka or Redis: CORS (CORS_ALLOW_ORIGINS), the OpenAPI
document's security schemes, and 401s, which are all answered before any service is reached
(the app runs here without its lifespan)."""

from __future__ import annotations

import time

import httpx
import jwt

from api.app import create_app
from chatpipe.settings import Settings
from chatpipe.tokens import StreamTokens, stream_key

SECRET = "an-app-test-secret-of-at-least-32-bytes"
AUTH = Settings(auth_mode="jwt", jwt_secret=SECRET)
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def client(settings: Settings) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(settings))
    return httpx.AsyncClient(transport=transport, base_url="http://api")


async def preflight(settings: Settings, origin: str) -> httpx.Response:
    async with client(settings) as c:
        return await c.options("/api/chat", headers={"Origin": origin, **PREFLIGHT})


async def test_cors_is_off_by_default() -> None:
    response = await preflight(Settings(), "https://app.example")
    assert "access-control-allow-origin" not in response.headers


async def test_only_listed_origins_are_allowed() -> None:
    settings = Settings(cors_allow_origins="https://app.example, https://admin.example")
    allowed = await preflight(settings, "https://admin.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://admin.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = await preflight(settings, "https://evil.example")
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


def test_openapi_declares_security_only_when_auth_is_on() -> None:
    off = create_app(Settings()).openapi()
    assert "securitySchemes" not in off.get("components", {})
    assert all("security" not in op for ops in off["paths"].values() for op in ops.values())
    on = create_app(AUTH).openapi()
    assert on["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert on["paths"]["/api/chat"]["post"]["security"] == [{"bearer": []}]
    assert on["paths"]["/api/cancel"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in on["paths"]["/health"]["get"]


async def test_requests_without_usable_credentials_answer_401() -> None:
    body = {"session_id": "s1", "message": "hi"}
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 3600}, SECRET, "HS256")
    async with client(AUTH) as c:
        for headers, reason in (
            ({}, "missing credentials"),
            ({"Authorization": "Basic YWxpY2U6cHc="}, "Bearer"),
            ({"Authorization": f"Bearer {expired}"}, "expired"),
        ):
            for path in ("/api/chat", "/api/cancel", "/cancel", "/api/chat/stream"):
                response = await c.post(path, json={**body, "message_id": "m1"}, headers=headers)
                assert response.status_code == 401, (path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert reason in response.json()["detail"]


async def test_stream_tokens_are_checked_before_anything_else() -> None:
    tokens = StreamTokens(stream_key(AUTH), 60)
    async with client(AUTH) as c:
        other = await c.get("/api/chat/m1/stream", params={"token": tokens.issue("m2", "alice")})
        assert other.status_code == 403
        assert other.json()["detail"] == "stream token is for another message"
        old = tokens.issue("m1", "alice", now=time.time() - 120)
        expired = await c.get("/api/chat/m1/stream", params={"token": old})
        assert (expired.status_code, expired.json()["detail"]) == (401, "stream token expired")
