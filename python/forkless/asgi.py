"""ASGI middleware: each HTTP/WebSocket request runs on one generation and is counted.

``python -m forkless.uvicorn`` wraps the app itself; wrap it yourself with another server:

    app = forkless.asgi.Middleware(app)

An asyncio server must not block its loop, so a hot swap is taken up at the start of the next
request even while others run (or by forkless's watcher while the worker is idle). Inside a
request, ``forkless.generation()`` (and ``scope["forkless.generation"]``) is the generation it
started on. An ``on_generation`` callback that rebinds a module in place is seen by a request
suspended at an ``await`` between two uses of the module: use the pinned generation (or one
module per generation) where that matters.
"""

from . import _core


class Middleware:
    """Wraps an ASGI app (see the module's docstring)."""

    forkless_wrapped = True

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        generation, token = _core.begin_request(block=False)
        scope["forkless.generation"] = generation
        try:
            return await self.app(scope, receive, send)
        finally:
            _core.end_request(token)


def wrap(app):
    """``Middleware(app)``, unless ``app`` already is one."""
    return app if getattr(app, "forkless_wrapped", False) else Middleware(app)
