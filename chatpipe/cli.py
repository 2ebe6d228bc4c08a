"""The `chatpipe` command: `chatpipe topics`, `chatpipe dev`, `chatpipe contract`, `chatpipe keys`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from chatpipe.errors import ChatpipeError, TopicDrift
from chatpipe.settings import Settings


async def _topics(settings: Settings) -> int:
    from chatpipe.clients import make_admin
    from chatpipe.topics import ensure_topics

    admin = make_admin(settings)
    await admin.start()
    try:
        report = await ensure_topics(admin, settings)
    except TopicDrift as e:
        print(
            "topics differ from the design (fix them or delete and re-create them):",
            file=sys.stderr,
        )
        for line in str(e).splitlines():
            print(f"  DRIFT {line}", file=sys.stderr)
        return 2
    finally:
        await admin.close()
    for line in report.lines():
        print(line)
    return 0


def _keys(settings: Settings, session_id: str, message_id: str | None, only: str | None) -> int:
    """Print the Redis keys of a session (and of one of its messages), as redis-cli takes them:
    every key of a session carries its bucket's hash tag (chatpipe/keys.py, layout 2)."""
    from chatpipe.keys import Keys

    k = Keys.from_settings(settings)
    rows = [
        ("active", k.active(session_id)),
        ("open", k.open_messages(session_id)),
        ("history", k.history(session_id)),
        ("owner", k.owner(session_id)),
        ("session-cancel", k.session_cancelled(session_id)),
        ("leases", k.leases(k.bucket(session_id))),
    ]
    if message_id is not None:
        rows += [
            ("msg", k.msg(session_id, message_id)),
            ("stream", k.stream(session_id, message_id)),
            ("cancel", k.cancel(session_id, message_id)),
            ("lease", k.lease(session_id, message_id)),
            ("response", k.response(session_id, message_id)),
            ("where", k.where(message_id)),
        ]
    if only is not None:
        found = dict(rows).get(only)
        if found is None:
            print(
                f"chatpipe keys: no key {only!r}; one of: {', '.join(n for n, _ in rows)}",
                file=sys.stderr,
            )
            return 2
        print(found)
        return 0
    for name, key in rows:
        print(f"{name}\t{key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("topics", help="create the v1 topics; report drift in existing ones")
    dev = sub.add_parser("dev", help="run the whole system locally and print the demo URL")
    dev.add_argument("--apis", type=int, default=2, help="api processes (ports from API_PORT up)")
    dev.add_argument("--consumers", type=int, default=3, help="ai_consumer processes")
    dev.add_argument(
        "--no-stack", action="store_true", help="use the running Kafka/Redis as they are"
    )
    contract = sub.add_parser("contract", help="write docs/contract/ from the models")
    contract.add_argument("--check", action="store_true", help="exit 1 listing files that differ")
    contract.add_argument("--dir", type=Path, default=None, help="default: docs/contract")
    keys = sub.add_parser(
        "keys", help="print the Redis keys of a session (and a message) for redis-cli"
    )
    keys.add_argument("session_id")
    keys.add_argument("message_id", nargs="?", default=None)
    keys.add_argument(
        "--only", default=None, help="print only this key's name (e.g. msg, stream, cancel)"
    )
    args = parser.parse_args(argv)
    if args.command == "contract":
        from chatpipe_contract import run

        return run(check_only=args.check, directory=args.dir)
    settings = Settings()
    if args.command == "keys":
        return _keys(settings, args.session_id, args.message_id, args.only)
    try:
        if args.command == "topics":
            return asyncio.run(_topics(settings))
        from chatpipe.devstack import run_dev

        return run_dev(
            settings, apis=args.apis, consumers=args.consumers, start_stack=not args.no_stack
        )
    except ChatpipeError as e:
        print(f"chatpipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
