"""`python -m ai_consumer`"""

from __future__ import annotations

from ai_consumer.service import serve
from chatpipe.entry import run_service
from chatpipe.gcwatch import freeze_startup
from chatpipe.logs import setup_logging
from chatpipe.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings, "ai_consumer")
    freeze_startup(settings.gc_freeze)  # what imports left: out of the GC's way
    run_service(serve(settings), "ai_consumer", settings.event_loop)


if __name__ == "__main__":
    main()
