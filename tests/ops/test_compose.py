"""The Docker compose files, checked without Docker (no engine runs here): each is valid
against the Compose Specification's JSON Schema (tests/ops/vendor), and what the schema cannot
see holds too: services that are referenced exist, every chatpipe setting a file sets is one
chatpipe reads, files it mounts or builds from exist, and the multi-node file puts its api
instances behind nginx with the upstreams the nginx config names."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chatpipe.settings import Settings
from tests.support.nginx import CONF, upstream_servers

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMA = Path(__file__).parent / "vendor" / "compose-spec.schema.json"
FILES = sorted(INFRA.glob("docker-compose*.yml"))
CHATPIPE_COMMANDS = {"api", "ai_consumer", "cancel_listener"}
# variables a chatpipe container may set that are not chatpipe settings: the standard ones of
# OpenTelemetry (read by its SDK)
FOREIGN = re.compile(r"^OTEL_[A-Z_]+$")


@cache
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())  # resolves the `<<: *anchor` merge keys
    assert isinstance(data, dict)
    return data


def errors(data: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator().iter_errors(data)
    ]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def chatpipe_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a chatpipe process (python -m api|ai_consumer|cancel_listener)."""
    out = {}
    for name, service in data["services"].items():
        command = service.get("command") or []
        if len(command) >= 3 and command[:2] == ["python", "-m"]:
            assert command[2] in CHATPIPE_COMMANDS, f"{name}: unknown module {command[2]}"
            out[name] = service
    return out


def test_there_are_both_compose_files() -> None:
    assert [p.name for p in FILES] == ["docker-compose.multi.yml", "docker-compose.yml"]


def test_the_validator_rejects_what_compose_rejects() -> None:
    """The schema check can fail: a misspelt service key and a mistyped value are errors."""
    assert errors({"services": {"api": {"image": "x", "enviroment": {"A": "1"}}}})
    assert errors({"services": {"api": {"image": "x", "depends_on": 5}}})
    assert not errors({"services": {"api": {"image": "x", "ports": ["8000:8000"]}}})


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_specification(path: Path) -> None:
    found = errors(load(path))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_references_settings_and_paths_hold(path: Path) -> None:
    data = load(path)
    services = data["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            assert other in services, f"{name} depends on an unknown service {other}"
        build = service.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name}: mounts missing {source}"
    settings = {field.upper() for field in Settings.model_fields}
    ids = []
    for name, service in chatpipe_services(data).items():
        env = environment(service)
        unknown = {k for k in env if k not in settings and not FOREIGN.match(k)}
        assert not unknown, f"{name} sets variables chatpipe does not read: {sorted(unknown)}"
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092", name
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert {"kafka", "redis", "topics"} & set(service.get("depends_on") or {}), name
        if "INSTANCE_ID" in env:
            ids.append(env["INSTANCE_ID"])
    assert len(ids) == len(set(ids)), f"instance ids reused: {ids}"


def test_multi_node_compose_runs_several_instances_behind_nginx() -> None:
    data = load(INFRA / "docker-compose.multi.yml")
    services = chatpipe_services(data)
    kinds: dict[str, list[str]] = {}
    for name, service in services.items():
        kinds.setdefault(service["command"][2], []).append(name)
    assert len(kinds["api"]) == 3
    assert len(kinds["ai_consumer"]) == 3
    assert len(kinds["cancel_listener"]) == 1
    # each consumer names itself (events, logs and leases carry the instance id)
    consumer_ids = {environment(services[n]).get("INSTANCE_ID") for n in kinds["ai_consumer"]}
    assert None not in consumer_ids
    assert len(consumer_ids) == 3

    nginx = data["services"]["nginx"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(kinds["api"]) <= set(nginx["depends_on"])
    # the proxy's upstreams are exactly the api services, on the port they listen on
    expected = {f"{n}:{environment(services[n])['API_PORT']}" for n in kinds["api"]}
    assert set(upstream_servers(CONF.read_text())) == expected
    for name in kinds["api"]:
        env = environment(services[name])
        assert env["API_HOST"] == "0.0.0.0", f"{name} must listen beyond its container"
    # the ai_consumers and the listener serve /metrics on a fixed port in their container
    for name in kinds["ai_consumer"] + kinds["cancel_listener"]:
        env = environment(services[name])
        assert int(env["METRICS_PORT"]) > 0
        assert env["METRICS_HOST"] == "0.0.0.0"
