"""`python -m api`"""

from __future__ import annotations

import sys

import uvicorn

from api.app import create_app
from api.auth import AuthConfigError
from chatpipe.gcwatch import freeze_startup
from chatpipe.logs import setup_logging
from chatpipe.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings, "api")
    try:
        app = create_app(settings)
    except AuthConfigError as e:  # a setting that cannot work: one clear line, exit 2
        print(f"api: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    freeze_startup(settings.gc_freeze)  # what imports and create_app left: out of the GC's way
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.api_keep_alive_s,
    )


if __name__ == "__main__":
    main()
