"""One entry of a message's Redis Stream (`chat:{b}:stream:{message_id}`), the one encoding of
the events SSE readers replay: field `e` the event (started, chunk, restart, done), `s` its seq,
`d` its JSON data. Python writes and reads entries only through this module; the Lua scripts
that write or read one (write.lua, finish.lua, claim.lua) name the same three fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from chatpipe.codec import dumps

EVENT, SEQ, DATA = b"e", b"s", b"d"
Fields = dict[bytes, bytes]


def encode(event: str, seq: int, data: dict[str, Any]) -> dict[str, str | int | bytes]:
    """The fields of a new entry (for XADD)."""
    return {"e": event, "s": seq, "d": dumps(data)}


def event_of(fields: Fields) -> bytes:
    return fields.get(EVENT, b"")


def data_of(fields: Fields) -> bytes:
    """The event's JSON data as written (`{}` when it has none)."""
    return fields.get(DATA, b"{}")


def seq_of(fields: Fields) -> int:
    return int(fields[SEQ])


def delta_of(fields: Fields) -> str:
    """A chunk's text."""
    return str(orjson.loads(data_of(fields)).get("delta", ""))
