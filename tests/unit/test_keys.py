"""Keys, layout 2 (contract 2.0.0): the seed's keys with the session's hash tag, so that every
key one operation touches together shares a Redis Cluster hash slot; and the composite keys
stay unambiguous."""

from __future__ import annotations

import itertools
import zlib

from redis.crc import key_slot

from chatpipe import keys as keys_module
from chatpipe.keys import Keys, bucket_of, cancel_record_key, split_record_key
from chatpipe.settings import Settings


def session_keys(k: Keys, session: str, message: str) -> list[str]:
    return [
        k.active(session),
        k.cancel(session, message),
        k.msg(session, message),
        k.stream(session, message),
        k.lease(session, message),
        k.response(session, message),
        k.session_cancelled(session),
        k.open_messages(session),
        k.history(session),
        k.owner(session),
        k.leases(k.bucket(session)),
        k.msg_prefix(session) + "other-message",
    ]


def test_the_contract_keys_carry_the_sessions_bucket_as_their_hash_tag() -> None:
    k = Keys()
    bucket = zlib.crc32(b"s-1") % 16  # as java.util.zip.CRC32 computes it
    assert k.bucket("s-1") == bucket == bucket_of("s-1", 16)
    assert k.active("s-1") == f"chat:{{{bucket}}}:active:s-1"
    assert k.cancel("s-1", "m-1") == f"chat:{{{bucket}}}:cancel:s-1:m-1"
    assert k.msg("s-1", "m-1") == f"chat:{{{bucket}}}:msg:m-1"
    assert k.stream("s-1", "m-1") == f"chat:{{{bucket}}}:stream:m-1"
    assert k.where("m-1") == "chat:where:m-1"


def test_every_key_of_a_session_and_its_messages_is_in_one_cluster_slot() -> None:
    k = Keys()
    for n in range(200):
        session, message = f"s-{n}", f"m-{n}"
        slots = {key_slot(key.encode()) for key in session_keys(k, session, message)}
        assert len(slots) == 1, (session, slots)
        assert slots == {key_slot(k.wakeup("api-1", k.bucket(session)).encode())}


def test_sessions_spread_over_every_bucket_and_buckets_over_distinct_slots() -> None:
    k = Keys(buckets=16)
    assert {k.bucket(f"s-{n}") for n in range(1000)} == set(range(16))
    assert len({key_slot(k.leases(b).encode()) for b in range(16)}) == 16


def test_prefix_is_put_in_front_of_every_key() -> None:
    k = Keys("tenant7:")
    names = [*session_keys(k, "s", "m"), k.wakeup("api-1", 0), k.where("m"), k.rate("u")]
    assert all(n.startswith("tenant7:chat:") for n in names)
    assert k.cancel("s", "m") == f"tenant7:chat:{{{k.bucket('s')}}}:cancel:s:m"


def test_keys_from_settings_use_the_key_prefix_and_the_bucket_count() -> None:
    settings = Settings(key_prefix="x:", redis_key_buckets=4, _env_file=None)
    keys = Keys.from_settings(settings)
    assert keys.buckets == 4
    assert keys.msg("s", "m") == f"x:chat:{{{zlib.crc32(b's') % 4}}}:msg:m"


def test_cancel_record_key_and_topic_names_are_the_contract_ones() -> None:
    assert cancel_record_key("s-1", "m-1") == "s-1:m-1"
    assert (keys_module.REQUESTS, keys_module.CANCELS) == ("chat.requests", "chat.cancels")
    assert (keys_module.RESPONSES, keys_module.DLQ) == ("chat.responses", "chat.requests.dlq")


def test_ids_with_the_separator_name_different_keys() -> None:
    k = Keys()
    alice, mallory = ("s:42", "abc"), ("s", "42:abc")
    assert k.cancel(*alice) != k.cancel(*mallory)
    assert cancel_record_key(*alice) != cancel_record_key(*mallory)
    assert cancel_record_key(*alice) == "s%3A42:abc"
    assert cancel_record_key(*mallory) == "s:42%3Aabc"
    assert k.cancel(*mallory) == f"chat:{{{k.bucket('s')}}}:cancel:s:42%3Aabc"
    # '%' is escaped too, so an escaped id cannot pass for another one
    assert cancel_record_key("a%3A", "b") != cancel_record_key("a:", "b")


def test_composite_keys_are_injective_over_the_id_alphabet() -> None:
    """Every pair of ids from the contract's alphabet gives its own key (exhaustive over short
    ids made of the characters that matter)."""
    alphabet = ["a", ":", "%", "0"]
    ids = ["".join(p) for n in range(1, 4) for p in itertools.product(alphabet, repeat=n)]
    seen: dict[str, tuple[str, str]] = {}
    for pair in itertools.product(ids, repeat=2):
        key = cancel_record_key(*pair)
        assert seen.setdefault(key, pair) == pair, (key, seen[key], pair)
        assert split_record_key(key) == pair
