"""`python -m ai_consumer`"""

from __future__ import annotations

import asyncio

from ai_consumer.service import serve
from chatpipe.logs import setup_logging
from chatpipe.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings, "ai_consumer")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
