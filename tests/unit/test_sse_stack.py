"""The SSE bodies skip the middleware wrappers (api/sse.py): only safe while every layer of
create_app's stack leaves response bodies alone. This fails when a layer is added: look at
what it does with `http.response.body` (GZip or BaseHTTPMiddleware must not be skipped), then
add it to api/sse.py's SEND_SAFE_LAYERS, or accept the slower send path."""

from __future__ import annotations

import pytest
from starlette.middleware.gzip import GZipMiddleware

from api.app import create_app
from api.sse import SEND_SAFE_LAYERS, stack_layers
from api.stalled import DropStalledClients
from chatpipe.settings import Settings

CORS = ("starlette.middleware.cors", "CORSMiddleware")


@pytest.mark.parametrize("cors", ["", "https://chat.example"])
def test_the_app_stack_is_the_known_one_and_bodies_skip_it(cors: str) -> None:
    stack = create_app(Settings(cors_allow_origins=cors)).build_middleware_stack()
    layers = stack_layers(stack)
    # every layer is a known one, once, and all of them are there (CORS only when configured):
    # a new layer fails here until someone looks at what it does with bodies
    assert len(layers) == len(set(layers))
    assert set(layers) == (SEND_SAFE_LAYERS if cors else SEND_SAFE_LAYERS - {CORS})
    assert isinstance(stack, DropStalledClients)
    assert stack.raw_send


def test_a_body_rewriting_layer_turns_the_raw_send_off() -> None:
    app = create_app(Settings())
    app.add_middleware(GZipMiddleware)
    stack = app.build_middleware_stack()
    assert ("starlette.middleware.gzip", "GZipMiddleware") in stack_layers(stack)
    assert ("starlette.middleware.gzip", "GZipMiddleware") not in SEND_SAFE_LAYERS
    assert isinstance(stack, DropStalledClients)
    assert not stack.raw_send
