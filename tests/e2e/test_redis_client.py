"""A product bug found by the e2e suite, as a minimal failing test (belongs in tests/integration).

`chatpipe.clients.make_redis` returns `Redis(connection_pool=pool)`: a client that does not own
its pool, so `await client.aclose()` leaves every pooled connection open. Processes close their
clients that way on shutdown, and every test using the shared `redis` fixture leaks its
connections into ResourceWarnings. Fix: `return Redis.from_pool(pool)`.
"""

from __future__ import annotations

from chatpipe.clients import make_redis
from chatpipe.settings import Settings


async def test_closing_a_client_from_make_redis_closes_its_connections(settings: Settings) -> None:
    client = make_redis(settings, max_connections=2)
    pool = client.connection_pool
    await client.ping()
    await client.aclose()
    try:
        still_open = [c for c in pool._available_connections if c.is_connected]
        assert still_open == [], "aclose() left the pool's connections open"
    finally:
        await pool.disconnect()
