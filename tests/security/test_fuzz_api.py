"""Schemathesis against the api's own OpenAPI schema (issue 7, must-show 5).

A real api process and a real ai_consumer (tests/support/cluster.py) on the shared Kafka and Redis,
in a namespace of this module. Every operation of /openapi.json gets generated requests, valid
and invalid; every answer must be no 5xx, a status code the schema documents, the documented
content type, and a body (and headers) that match the documented schema.

Bounded: a derandomized, fixed example budget per operation; the simulator answers in 3 short
tokens and an unknown message's stream gives up after 100 ms, so the SSE endpoints end quickly;
each call has a timeout. The per-user limits are off for this module (AUTH_MODE none: every
generated request is the same anonymous user), so the fuzzer reaches past the 429s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from chatpipe.settings import Settings

# the e2e module fixtures: a module-wide namespace, its settings and its topics
from tests.e2e.conftest import cluster_settings, ns  # noqa: F401
from tests.e2e.conftest import cluster_topics as cluster_topics
from tests.support.cluster import Cluster

pytestmark = pytest.mark.e2e

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
ENV: dict[str, object] = {
    "sim_tokens": 3,
    "sim_token_delay_ms": 5,
    "sse_unknown_grace_ms": 100,
    "sse_heartbeat_s": 0.5,
    "rate_limit_per_minute": 0,
    "max_streams_per_user": 0,
}


@pytest.fixture(scope="module")
def fuzz_cluster(
    cluster_topics: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """1 api + 1 ai_consumer in this module's namespace (topics from tests/e2e/conftest.py)."""
    workdir = tmp_path_factory.mktemp("fuzz-api")
    cluster = Cluster(cluster_topics, workdir, apis=1, consumers=1, listener=False, env=ENV)
    with cluster.running(timeout=90) as running:
        yield running


# The schema as the app builds it (no clients needed: those are made in the lifespan); the
# test below also checks it is the one the running process serves.
APP_SCHEMA: dict[str, Any] = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


def test_the_running_api_serves_this_schema(fuzz_cluster: Cluster) -> None:
    served = httpx.get(f"{fuzz_cluster.api_procs[0].url}/openapi.json", timeout=10).json()
    assert served == APP_SCHEMA


@schema.parametrize()
@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_schema(case: Any, fuzz_cluster: Cluster) -> None:
    case.call_and_validate(base_url=fuzz_cluster.api_procs[0].url, checks=CHECKS, timeout=15)
    for proc in fuzz_cluster.procs:
        assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
