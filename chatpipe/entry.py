"""Running a service's main coroutine: chatpipe's own errors end the process with one readable
log line (for example a refused Kafka or Redis login at start) instead of a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from chatpipe.errors import ChatpipeError

EXIT_ERROR = 1


def run_service(main: Coroutine[Any, Any, None], service: str) -> None:
    try:
        asyncio.run(main)
    except ChatpipeError as e:
        logging.getLogger(service).critical("%s stopped: %s", service, e)
        raise SystemExit(EXIT_ERROR) from None
