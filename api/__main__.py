"""`python -m api`"""

from __future__ import annotations

import sys

import uvicorn

from api.app import create_app
from api.auth import AuthConfigError
from api.exiting import ServerExit
from chatpipe.gcwatch import freeze_startup
from chatpipe.logs import setup_logging
from chatpipe.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings, "api")
    exiting = ServerExit()  # open SSE responses end when the server starts shutting down
    try:
        app = create_app(settings, exiting)
    except AuthConfigError as e:  # a setting that cannot work: one clear line, exit 2
        print(f"api: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=settings.api_keep_alive_s,
            loop=settings.event_loop,  # uvicorn's names: auto (uvloop when installed), asyncio, uvloop
        )
    )
    exiting.follow(lambda: server.should_exit)
    freeze_startup(settings.gc_freeze)  # what imports and create_app left: out of the GC's way
    server.run()


if __name__ == "__main__":
    main()
