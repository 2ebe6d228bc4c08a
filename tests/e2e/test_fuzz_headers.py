"""Fuzzing what the schema fuzzer (tests/security/test_fuzz_api.py) does not reach: the HTTP
headers the api reads (`Last-Event-ID`, `Authorization`, `X-API-Key`, `traceparent`) and ids
with every character `ID_PATTERN` allows (issue 12).

Real processes (2 api, 1 ai_consumer, 1 cancel_listener, AUTH_MODE=jwt) on the shared Kafka and
Redis. Hypothesis, derandomized with a fixed budget: the same inputs every run. Each header gets
an answer the contract documents (2xx, 400 with the reason, 401 with `WWW-Authenticate`), never
a 5xx, and the api still serves everyone else afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatpipe.schemas import ID_PATTERN
from tests.e2e.conftest import DEFAULT_ENV, ClusterShape
from tests.support.cluster import Cluster

pytestmark = pytest.mark.e2e

SECRET = "fuzz-headers-jwt-secret-of-at-least-32-bytes"
BUDGET = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def header_text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Printable ASCII without surrounding blanks: what an HTTP client lets through."""
    return st.text(PRINTABLE, min_size=min_size, max_size=max_size).map(str.strip)


# ids, numbers and near-misses of a Redis stream id: over 64 bits, negative, several dashes
STREAM_IDS = st.from_regex(r"\A-?[0-9]{1,25}(-{1,2}-?[0-9]{0,25})?\Z")


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_tokens": 3,
        "sim_token_delay_ms": 5,
        "sim_first_token_delay_ms": 0,
        "auth_mode": "jwt",
        "jwt_secret": SECRET,
        "rate_limit_per_minute": 0,
        "max_streams_per_user": 0,
        "sse_unknown_grace_ms": 100,
    }


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    return ClusterShape(apis=2, consumers=1)


def bearer(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_procs[0].url, timeout=10) as c:
        yield c


def answered(client: httpx.Client, user: str, session: str, message_id: str | None = None) -> str:
    """Post a chat as `user` and read its stream to the end; returns its message id."""
    body: dict[str, object] = {"session_id": session, "message": "hello there"}
    if message_id is not None:
        body["message_id"] = message_id
    posted = client.post("/api/chat", json=body, headers=bearer(user))
    assert posted.status_code == 202, posted.text
    mid = str(posted.json()["message_id"])
    with client.stream("GET", f"/api/chat/{mid}/stream", headers=bearer(user)) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert "event: done" in text, text
    assert '"status":"completed"' in text, text
    return mid


@pytest.fixture(scope="module")
def finished(client: httpx.Client) -> tuple[str, str]:
    user = f"alice-{uuid.uuid4().hex[:6]}"
    return user, answered(client, user, f"s-{uuid.uuid4().hex[:8]}")


@BUDGET
@given(last_event_id=st.one_of(STREAM_IDS, header_text(60)))
def test_any_last_event_id_is_answered_200_or_400_and_breaks_no_other_stream(
    client: httpx.Client, finished: tuple[str, str], cluster: Cluster, last_event_id: str
) -> None:
    user, message_id = finished
    headers = {**bearer(user), "Last-Event-ID": last_event_id}
    with client.stream("GET", f"/api/chat/{message_id}/stream", headers=headers) as r:
        if r.status_code == 400:
            r.read()
            assert "Last-Event-ID" in r.json()["detail"], r.text
        else:
            assert r.status_code == 200, (last_event_id, r.status_code)
            assert r.headers["content-type"].startswith("text/event-stream")
            # a finished message's stream ends (read to its end within the client's timeout),
            # with what follows that id: at most the `done`
            events = [
                line for line in "".join(r.iter_text()).splitlines() if line.startswith("event:")
            ]
            assert set(events) <= {"event: started", "event: chunk", "event: done"}, events
    # everyone else is still served
    with client.stream("GET", f"/api/chat/{message_id}/stream", headers=bearer(user)) as r:
        assert r.status_code == 200
        assert "event: done" in "".join(r.iter_text())
    assert all(p.alive() for p in cluster.procs)


@BUDGET
@given(
    header=st.sampled_from(["Authorization", "X-API-Key"]),
    value=st.one_of(
        header_text(80),
        st.builds(lambda t: f"Bearer {t}".strip(), header_text(80)),
        st.builds(lambda t: f"bearer {t}.{t}.{t}", header_text(20, min_size=1)),
    ),
)
def test_any_credential_header_is_a_401_with_its_reason_never_a_5xx(
    client: httpx.Client, finished: tuple[str, str], header: str, value: str
) -> None:
    _, message_id = finished
    requests = [
        ("POST", "/api/chat", {"session_id": "s-fuzz", "message": "hi"}),
        ("POST", "/api/cancel", {"session_id": "s-fuzz", "message_id": message_id}),
        ("GET", f"/api/chat/{message_id}/stream", None),
    ]
    for method, path, body in requests:
        r = client.request(method, path, json=body, headers={header: value})
        assert r.status_code == 401, (method, path, value, r.status_code, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"
        assert r.json()["detail"], r.text


@BUDGET
@given(traceparent=st.one_of(header_text(80), st.from_regex(r"\A[0-9a-f-]{1,60}\Z")))
def test_any_traceparent_is_used_or_ignored_and_the_chat_is_answered(
    client: httpx.Client, traceparent: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    body = {"session_id": f"s-{uuid.uuid4().hex[:8]}", "message": "hi"}
    r = client.post("/api/chat", json=body, headers={**bearer(user), "traceparent": traceparent})
    assert r.status_code == 202, (traceparent, r.status_code, r.text)


@settings(derandomize=True, max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    session=st.from_regex(ID_PATTERN, fullmatch=True),
    message_id=st.from_regex(ID_PATTERN, fullmatch=True),
)
def test_ids_with_every_allowed_character_are_answered_and_cancelled_by_their_owner(
    client: httpx.Client, session: str, message_id: str
) -> None:
    # unique per example (a reused id is a 409, a taken session a 403): a prefix from
    # ID_PATTERN's own alphabet, so the generated characters (`:` `.` `@` `-` `_`) stay
    unique = f"{uuid.uuid4().hex[:8]}"
    user = f"u-{unique}"
    mid = answered(client, user, f"{unique}{session}"[:128], f"{unique}{message_id}"[:128])
    r = client.post(
        "/api/cancel",
        json={"session_id": f"{unique}{session}"[:128], "message_id": mid},
        headers=bearer(user),
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed", r.text  # it had ended: nothing to stop
