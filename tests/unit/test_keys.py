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
