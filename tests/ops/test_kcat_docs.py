"""The commands of docs/operations.md, run as printed against the real broker, Redis and
chatpipe processes.

Every fenced block tagged `sh test=NAME` is taken from the markdown verbatim and run with bash;
the test only sets the documented variables (BROKER, PREFIX, KEY_PREFIX, GROUP, PARTITIONS,
REDIS_URL, API, LOGS) to its own namespace and replaces the documented placeholders
(`{session_id}`, `{message_id}`). Then it checks what an operator would read in the output.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from chatpipe.clients import make_consumer
from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.providers.procs import Proc, msg_starts, start, start_api, start_consumer, stopping
from tests.support.partitions import partition_of
from tests.support.wait import apoll

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
BLOCK = re.compile(r"^```sh test=([\w-]+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PLACEHOLDERS = ("session_id", "message_id")
TESTED = {
    "variables",
    "health",
    "stream",
    "list-topics",
    "session-responses",
    "read-requests",
    "publish-request",
    "read-cancels",
    "publish-cancel",
    "publish-session-cancel",
    "redis-session-cancel",
    "tombstone",
    "read-dlq",
    "lag",
    "redis-keys",
    "redis-message",
    "redis-where",
    "redis-cancel-flag",
    "logs",
}

needs_kcat = pytest.mark.skipif(
    shutil.which("kcat") is None, reason="kcat is not installed (apt-get install kcat)"
)
# a fast simulator: 5 tokens (the documented request asks for max_tokens 5), 1 ms apart
FAST = {"sim_tokens": 5, "sim_token_delay_ms": 1, "sim_first_token_delay_ms": 0}


def doc_blocks() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, body in BLOCK.findall(DOC.read_text()):
        assert name not in found, f"two blocks named test={name} in {DOC}"
        found[name] = body
    return found


BLOCKS = doc_blocks()


def variables() -> dict[str, str]:
    out = {}
    for line in BLOCKS["variables"].splitlines():
        assignment = line.split("#", 1)[0].strip()
        if assignment:
            name, _, value = assignment.partition("=")
            out[name] = value
    return out


@dataclass(frozen=True)
class Ops:
    """The documented variables, set to this test's namespace."""

    settings: Settings
    logs: Path
    api: str = ""

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "BROKER": s.kafka_bootstrap_servers.split(",")[0],
            "PREFIX": s.topic_prefix,
            "KEY_PREFIX": s.key_prefix,
            "GROUP": s.consumer_group,
            "PARTITIONS": str(s.topic_partitions),
            "REDIS_URL": s.redis_url,
            "API": self.api,
            "LOGS": str(self.logs),
        }

    async def run(self, name: str, **ids: str) -> str:
        """Run block `name` as printed, with `{placeholder}`s replaced by `ids`."""
        text = BLOCKS[name]
        for key, value in ids.items():
            assert key in PLACEHOLDERS, key
            text = text.replace("{" + key + "}", value)
        left = re.findall(r"\{([a-z_]+)\}", text)
        assert not left, f"block {name}: placeholders not given: {left}"
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            "set -o pipefail\n" + text,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, (
            f"block {name} exited {proc.returncode}:\n{text}\n{err.decode()}"
        )
        return out.decode()


def new_id(kind: str) -> str:
    return f"ops-{kind}-{uuid.uuid4().hex[:10]}"


async def read_until(
    settings: Settings,
    topic: str,
    done: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    within: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Records of `topic` from the beginning until `done(records)` (a Kafka long poll, no
    sleeping): what the kcat commands will then find there."""
    consumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(within):
            while not done(records):
                batch = await consumer.getmany(timeout_ms=500)
                for part in batch.values():
                    records.extend(part)
    finally:
        await consumer.stop()
    return records


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, object]]:
    return [orjson.loads(r.value) for r in records if r.value is not None]


def terminal_for(*message_ids: str) -> Callable[[list[ConsumerRecord[bytes, bytes]]], bool]:
    def done(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        ended = {
            v["message_id"]
            for v in values(records)
            if v.get("type") in ("chat.completed", "chat.cancelled", "chat.failed")
        }
        return set(message_ids) <= ended

    return done


def key_value_lines(out: str) -> list[tuple[str, dict[str, object]]]:
    """`%k %s` lines -> (key, JSON value)."""
    rows = []
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        rows.append((key, orjson.loads(value)))
    return rows


# --- the document itself -----------------------------------------------------------------


def test_every_documented_check_is_run_here() -> None:
    assert set(BLOCKS) == TESTED


def test_the_variables_default_to_the_local_stack() -> None:
    defaults = Settings.model_fields
    assert variables() == {
        "BROKER": "127.0.0.1:9092",
        "PREFIX": "",
        "KEY_PREFIX": "",
        "GROUP": defaults["consumer_group"].default,
        "PARTITIONS": str(defaults["topic_partitions"].default),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "API": "http://127.0.0.1:8000",
        "LOGS": "~/.local/state/chatpipe/dev-logs",
    }


def test_commands_use_only_documented_variables_and_placeholders() -> None:
    documented = set(variables())
    for name, body in BLOCKS.items():
        if name == "variables":
            continue
        shell = body.split("<<'EOF'")[0]  # a quoted heredoc's body is not expanded by the shell
        local = set(re.findall(r"^([A-Z_]+)=", shell, re.MULTILINE))
        used = set(re.findall(r"\$\{?([A-Z_]+)", shell))
        assert used <= documented | local, f"block {name} uses {used - documented - local}"
        holes = set(re.findall(r"\{([a-z_]+)\}", body))
        assert holes <= set(PLACEHOLDERS), f"block {name} has placeholders {holes}"


# --- the broker alone --------------------------------------------------------------------


@needs_kcat
async def test_list_topics_shows_the_topics_and_their_partitions(
    topics: Settings, tmp_path: Path
) -> None:
    out = await Ops(topics, tmp_path).run("list-topics")
    listed = dict(re.findall(r'topic "([^"]+)" with (\d+) partitions', out))
    p = topics.topic_prefix
    assert listed == {
        f"{p}chat.requests": "12",
        f"{p}chat.cancels": "12",
        f"{p}chat.responses": "12",
        f"{p}chat.requests.dlq": "1",
    }


# --- cancels: kcat, the compacted topic, the listener's replay, the Redis flag -----------


@needs_kcat
async def test_cancels_read_back_with_keys_and_tombstones_and_flag_redis(
    topics: Settings, redis: Redis, tmp_path: Path
) -> None:
    ops = Ops(topics, tmp_path)
    live = {"session_id": new_id("s"), "message_id": new_id("m")}
    gone = {"session_id": new_id("s"), "message_id": new_id("m")}
    await ops.run("publish-cancel", **live)
    await ops.run("publish-cancel", **gone)
    await ops.run("tombstone", **gone)

    rows = re.findall(
        r"^key=(\S+) value=(.*) partition=(\d+) offset=(\d+)$", await ops.run("read-cancels"), re.M
    )
    by_key: dict[str, list[tuple[str, int]]] = {}
    for key, value, partition, _ in rows:
        by_key.setdefault(key, []).append((value, int(partition)))
    live_key = f"{live['session_id']}:{live['message_id']}"
    gone_key = f"{gone['session_id']}:{gone['message_id']}"
    assert set(by_key) == {live_key, gone_key}
    ((value, partition),) = by_key[live_key]
    assert orjson.loads(value) == {
        "schema_version": 1,
        "type": "chat.cancel",
        **live,
    }
    assert partition == partition_of(
        live_key, topics.topic_partitions
    )  # where the api would have put it
    (first, p1), (second, p2) = by_key[gone_key]
    assert orjson.loads(first)["message_id"] == gone["message_id"]
    assert second == "NULL"
    assert p1 == p2  # the tombstone is on top of the record it deletes

    # an ai_consumer starting now replays the topic: one live cancel, the tombstoned one not
    consumer = await start_consumer(topics, tmp_path, "ai-1", **FAST)
    async with stopping(consumer):
        replayed = await consumer.log_line(msg_starts("replayed"), within=30)
        assert replayed["msg"] == f"replayed {topics.cancels_topic}: 1 live cancels re-flagged"
        flag, ttl = (await ops.run("redis-cancel-flag", **live)).split()
        assert flag == "1"
        assert 0 < int(ttl) <= topics.cancel_queued_ttl_s
        assert (await ops.run("redis-cancel-flag", **gone)).split() == ["0", "-2"]

        # the cancelled message's request arrives: it never starts, and chatpipe tombstones
        # the cancel once the message is final
        await ops.run("publish-request", **live)

        def tombstoned(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
            return any(r.key == live_key.encode() and r.value is None for r in records)

        await read_until(topics, topics.cancels_topic, tombstoned)
        out = await ops.run("read-cancels")
        assert re.findall(rf"^key={re.escape(live_key)} value=(\S+) ", out, re.M)[-1] == "NULL"

        await read_until(topics, topics.responses_topic, terminal_for(live["message_id"]))
        answer = key_value_lines(await ops.run("session-responses", **live))
        assert [v["type"] for _, v in answer] == ["chat.cancelled"]
        assert answer[0][1]["reason"] == "cancelled by user"


@needs_kcat
async def test_a_session_cancel_from_kcat_stops_a_request_no_consumer_has_fetched(
    topics: Settings, tmp_path: Path
) -> None:
    """Stop all from the shell: the request is in Kafka only (no ai_consumer runs yet); once
    the listener has the session's cancel time, the consumer that starts ends it cancelled."""
    ops = Ops(topics, tmp_path)
    ids = {"session_id": new_id("s"), "message_id": new_id("m")}
    listener = start("cancel_listener", topics, tmp_path, "listener-1", **FAST)
    async with stopping(listener):
        await listener.log_line(msg_starts("replayed"), within=30)
        await ops.run("publish-request", **ids)
        await ops.run("publish-session-cancel", **ids)

        async def marked() -> str | None:
            return (await ops.run("redis-session-cancel", **ids)).strip() or None

        at = await apoll("the session's cancel time in Redis", marked, within=20)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", at), at
        consumer = await start_consumer(topics, tmp_path, "ai-1", **FAST)
        async with stopping(consumer):
            await read_until(topics, topics.responses_topic, terminal_for(ids["message_id"]))
            answer = key_value_lines(await ops.run("session-responses", **ids))
    assert [v["type"] for _, v in answer] == ["chat.cancelled"]


# --- requests: kcat publishes, chatpipe answers, every view of it ---------------------------


@needs_kcat
async def test_a_request_published_with_kcat_is_answered_and_inspectable(
    topics: Settings, redis: Redis, tmp_path: Path
) -> None:
    ops = Ops(topics, tmp_path)
    a = {"session_id": new_id("s"), "message_id": new_id("m")}
    part = partition_of(a["session_id"], topics.topic_partitions)
    # another session on the same partition, and one on another partition
    same = next(
        s
        for s in (new_id("s") for _ in range(10_000))
        if partition_of(s, topics.topic_partitions) == part
    )
    b = {"session_id": same, "message_id": new_id("m")}
    other = next(
        s
        for s in (new_id("s") for _ in range(10_000))
        if partition_of(s, topics.topic_partitions) != part
    )
    c = {"session_id": other, "message_id": new_id("m")}

    consumer = await start_consumer(topics, tmp_path, "ai-1", **FAST)
    async with stopping(consumer):
        api = await start_api(topics, tmp_path, "api-1")
        ops = Ops(topics, tmp_path, api.url)
        async with stopping(api):
            for ids in (a, b, c):
                await ops.run("publish-request", **ids)
            responses = await read_until(
                topics,
                topics.responses_topic,
                terminal_for(a["message_id"], b["message_id"], c["message_id"]),
            )
            assert {r.partition for r in responses if r.key == b["session_id"].encode()} == {part}

            # one session's answer: only its records, in order, although b shares the partition
            rows = key_value_lines(await ops.run("session-responses", **a))
            assert {key for key, _ in rows} == {a["session_id"]}
            assert [v["type"] for _, v in rows] == ["chat.started"] + ["chat.chunk"] * 5 + [
                "chat.completed"
            ]
            assert {v["message_id"] for _, v in rows} == {a["message_id"]}
            assert [v["seq"] for _, v in rows] == list(range(7))

            # the request as kcat wrote it: on the session's partition (the same one chatpipe
            # answered on), with the documented headers
            out = await ops.run("read-requests")
            (line,) = [ln for ln in out.splitlines() if f" key={a['session_id']} " in ln]
            assert line.startswith(f"partition={part} ")
            assert line.endswith(" headers=content-type=application/json,event-type=chat.request")
            assert len(re.findall(r"^partition=", out, re.M)) == 3

            # the api streams it, although the request never went through an api
            sse = await ops.run("stream", **a)
            assert sse.count("event: chunk") == 5
            assert "event: done" in sse
            assert '"status":"completed"' in sse

            # Redis: the final state, the event stream, lifetimes, no active stream any more
            # (redis-cli prints one value per line when its output is not a terminal)
            lines = (await ops.run("redis-message", **a)).split("\n")
            assert lines.pop() == ""
            first_entry = next(i for i, ln in enumerate(lines) if re.fullmatch(r"\d+-\d+", ln))
            fields = dict(zip(lines[0:first_entry:2], lines[1:first_entry:2], strict=True))
            assert fields["state"] == "completed"
            assert fields["session"] == a["session_id"]
            assert fields["owner"] == consumer_instance(consumer)
            events = lines[first_entry:-2]
            assert events.count("chunk") == 5
            assert events[-6:] == ["e", "done", "s", "6", "d", '{"status":"completed"}']
            ttl, active = lines[-2:]
            assert 0 < int(ttl) <= topics.final_ttl_s
            assert active == ""  # GET of a deleted key: an empty line

            keys = (await ops.run("redis-keys")).split()
            # key layout 2: chat:{<bucket>}:msg:<message_id>, in its session's bucket
            k = Keys.from_settings(topics)
            msg_keys = {k.msg(ids["session_id"], ids["message_id"]) for ids in (a, b, c)}
            assert set(keys) == msg_keys  # no active key (nothing streams), the 3 messages
            # a message known by its id alone: its session (the ai_consumer recorded it: OBSERVE)
            for ids in (a, b, c):
                assert (await ops.run("redis-where", **ids)).split("\n") == [ids["session_id"], ""]

            health = await ops.run("health")
            assert '"status":"ok"' in health
            assert '"status":"ready"' in health
            assert re.search(r"^chatpipe_sse_clients ", health, re.M)
            assert re.search(
                r'^chatpipe_http_requests_total\{route="/ready",status="200"\}', health, re.M
            )

            # one message across the processes' logs, in time order
            logged = (await ops.run("logs", **a)).splitlines()
            assert logged
            assert all(a["message_id"] in ln for ln in logged)
            assert logged == sorted(logged)
            assert any('"msg":"message completed"' in ln for ln in logged)

            # a record nobody can parse goes to the DLQ; the DLQ command shows why
            garbage = await asyncio.create_subprocess_exec(
                "kcat", "-b", ops.env()["BROKER"], "-P", "-t", topics.requests_topic, "-K|",
                "-H", "source=ops-test",
                stdin=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await garbage.communicate(f"{a['session_id']}|this is not json\n".encode())
            assert garbage.returncode == 0
            await read_until(topics, topics.dlq_topic, lambda records: bool(records))
            dlq = await ops.run("read-dlq")
            head, value = dlq.splitlines()
            assert head.startswith(f"offset=0 key={a['session_id']} headers=dlq-reason=")
            assert "dlq-kind=" in head
            assert f"dlq-source-topic={topics.requests_topic}," in head
            assert "original-source=ops-test" in head
            assert value == "  value=this is not json"

        # a stopped consumer has committed everything it finished: no lag
        await consumer.stop()
        lag = (await ops.run("lag")).splitlines()
        assert lag[0] == "partition end committed lag"
        rows_lag = [ln.split() for ln in lag[1:-1]]
        assert sorted(int(r[0]) for r in rows_lag) == list(range(topics.topic_partitions))
        assert sum(int(r[1]) for r in rows_lag) == 4  # 3 requests + the dead letter's record
        assert all(r[3] == "0" for r in rows_lag), lag
        assert lag[-1] == "total lag 0"


def consumer_instance(proc: Proc) -> str:
    line = next(iter(proc.find(lambda ln: "instance_id" in ln)))
    return str(line["instance_id"])
