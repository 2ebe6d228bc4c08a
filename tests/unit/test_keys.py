"""Keys: with the default empty prefix they are exactly the contract's (and the seed's) keys,
so the operations commands in the docs and the seed's callers keep working."""

from __future__ import annotations

from chatpipe import keys as keys_module
from chatpipe.keys import Keys, cancel_record_key
from chatpipe.settings import Settings


def test_empty_prefix_gives_the_contract_keys() -> None:
    k = Keys()
    assert k.active("s-1") == "chat:active:s-1"
    assert k.cancel("s-1", "m-1") == "chat:cancel:s-1:m-1"
    assert k.msg("m-1") == "chat:msg:m-1"
    assert k.stream("m-1") == "chat:stream:m-1"


def test_prefix_is_put_in_front_of_every_key() -> None:
    k = Keys("tenant7:")
    names = [
        k.active("s"),
        k.cancel("s", "m"),
        k.msg("m"),
        k.stream("m"),
        k.lease("m"),
        k.wakeup("api-1"),
    ]
    assert all(n.startswith("tenant7:chat:") for n in names)
    assert k.cancel("s", "m") == "tenant7:chat:cancel:s:m"


def test_keys_from_settings_use_the_key_prefix() -> None:
    settings = Settings(key_prefix="x:", _env_file=None)
    assert Keys.from_settings(settings).msg("m") == "x:chat:msg:m"


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
    assert k.cancel(*mallory) == "chat:cancel:s:42%3Aabc"
    # '%' is escaped too, so an escaped id cannot pass for another one
    assert cancel_record_key("a%3A", "b") != cancel_record_key("a:", "b")


def test_composite_keys_are_injective_over_the_id_alphabet() -> None:
    """Every pair of ids from the contract's alphabet gives its own key (exhaustive over short
    ids made of the characters that matter)."""
    import itertools

    alphabet = ["a", ":", "%", "0"]
    ids = ["".join(p) for n in range(1, 4) for p in itertools.product(alphabet, repeat=n)]
    seen: dict[str, tuple[str, str]] = {}
    for pair in itertools.product(ids, repeat=2):
        key = cancel_record_key(*pair)
        assert seen.setdefault(key, pair) == pair, (key, seen[key], pair)
