"""The Docker compose files, checked without Docker (no engine runs here): each is valid
against the Compose Specification's JSON Schema (tests/ops/vendor), and what the schema cannot
see holds too: services that are referenced exist, every chatpipe setting a file sets is one
chatpipe reads, files it mounts or builds from exist, the processes bootstrap from every
broker of the file, and the multi-node file puts its api instances behind nginx with the
upstreams the nginx config names, runs 3 Kafka brokers that keep every topic on all three with
two in sync (RF 3, min ISR 2), and runs the processes on a Redis Cluster of 3 primaries + 3
replicas."""

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


def kafka_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Kafka brokers of a file (the apache/kafka image)."""
    return {
        name: service
        for name, service in data["services"].items()
        if str(service.get("image", "")).startswith("apache/kafka:")
    }


def internal_listener(broker: dict[str, Any]) -> str:
    """host:port where the other containers reach a broker (its INTERNAL listener)."""
    advertised = environment(broker)["KAFKA_ADVERTISED_LISTENERS"].split(",")
    found = [a.removeprefix("INTERNAL://") for a in advertised if a.startswith("INTERNAL://")]
    assert len(found) == 1, advertised
    return found[0]


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
    brokers = {internal_listener(b) for b in kafka_services(data).values()}
    assert brokers, "no Kafka broker"
    ids = []
    for name, service in chatpipe_services(data).items():
        env = environment(service)
        unknown = {k for k in env if k not in settings and not FOREIGN.match(k)}
        assert not unknown, f"{name} sets variables chatpipe does not read: {sorted(unknown)}"
        # every broker of the file (any one is enough to start; a dead one is skipped)
        assert set(env["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == brokers, name
        redis_host = env["REDIS_URL"].removeprefix("redis://").split(":", 1)[0]
        assert str(services[redis_host]["image"]).startswith("redis:"), name
        assert {"redis", "topics"} & set(service.get("depends_on") or {}), name
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


def test_multi_node_compose_runs_three_brokers_keeping_every_topic_on_all_three() -> None:
    data = load(INFRA / "docker-compose.multi.yml")
    brokers = kafka_services(data)
    assert len(brokers) == 3
    envs = {name: environment(b) for name, b in brokers.items()}
    # one KRaft cluster: one id, distinct node ids, each a broker and one of 3 voters
    assert len({env["CLUSTER_ID"] for env in envs.values()}) == 1
    node_ids = {name: env["KAFKA_NODE_ID"] for name, env in envs.items()}
    assert sorted(node_ids.values()) == ["1", "2", "3"]
    for name, env in envs.items():
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", name
        voters = set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
        assert voters == {f"{node_ids[n]}@{n}:9093" for n in brokers}, name
        assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(","), name
        # every topic on all three brokers, two in sync for a write: the internal ones too
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2", name
        assert env["KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR"] == "2", name
        assert internal_listener(brokers[name]).startswith(f"{name}:"), name
        assert brokers[name]["healthcheck"], name
    # each its own data and its own port on the host
    volumes = [v.split(":", 1)[0] for b in brokers.values() for v in b["volumes"]]
    assert len(set(volumes)) == 3
    published = [p.split(":", 1)[0] for b in brokers.values() for p in b["ports"]]
    assert len(set(published)) == 3
    # chatpipe's topics: RF 3, min ISR 2, created once all three brokers answer
    topics = data["services"]["topics"]
    assert topics["command"] == ["chatpipe", "topics"]
    env = environment(topics)
    assert (env["TOPIC_REPLICATION_FACTOR"], env["TOPIC_MIN_INSYNC_REPLICAS"]) == ("3", "2")
    depends = topics["depends_on"]
    assert {n: depends[n]["condition"] for n in brokers} == dict.fromkeys(
        brokers, "service_healthy"
    )


def test_multi_node_compose_runs_on_a_redis_cluster_of_three_primaries_and_three_replicas() -> None:
    data = load(INFRA / "docker-compose.multi.yml")
    services = data["services"]
    nodes = {
        name: s
        for name, s in services.items()
        if "--cluster-enabled yes" in " ".join(map(str, s.get("command") or []))
    }
    assert len(nodes) == 6
    for name, node in nodes.items():
        assert node["hostname"] == name
        command = " ".join(node["command"])
        assert "--appendonly yes" in command, name
        # reachable by name from the other containers after a restart (a new container IP)
        assert "--cluster-preferred-endpoint-type hostname" in command, name
        assert len(node["volumes"]) == 1, name
    create = services["redis-cluster-create"]
    script = " ".join(create["command"])
    assert "redis-cli --cluster create" in script
    assert "--cluster-replicas 1" in script  # 6 nodes: 3 primaries, each with a replica
    assert {n for n in nodes if f"{n}:6379" in script} == set(nodes)
    assert "cluster_state:ok" in script  # made once; a no-op on the next `up`
    assert set(create["depends_on"]) == set(nodes)
    # every process on the cluster, once it is made
    for name, service in chatpipe_services(data).items():
        env = environment(service)
        host = env["REDIS_URL"].removeprefix("redis://").split(":", 1)[0]
        assert host in nodes, name
        assert env["REDIS_CLUSTER"] == "true", name
        condition = service["depends_on"]["redis-cluster-create"]["condition"]
        assert condition == "service_completed_successfully", name
    assert not [n for n, s in services.items() if "profiles" in s]  # `up` starts it all
