"""`python -m api`"""

from __future__ import annotations

import uvicorn

from api.app import create_app
from chatpipe.logs import setup_logging
from chatpipe.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings, "api")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
