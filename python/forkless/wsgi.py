"""WSGI middleware: each request runs on one generation, is counted, and lets hot swaps in
between requests.

``python -m forkless.gunicorn`` wraps the app itself; wrap it yourself with another server:

    app.wsgi_app = forkless.wsgi.Middleware(app.wsgi_app)   # Flask

Inside a request, ``forkless.generation()`` (and ``environ["forkless.generation"]``) is the
generation the request started on, even if a hot swap happens meanwhile.
"""

from . import _core


class Middleware:
    """Wraps a WSGI app (see the module's docstring)."""

    forkless_wrapped = True

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        generation, token = _core.begin_request(block=True)
        environ["forkless.generation"] = generation
        try:
            body = self.app(environ, start_response)
        except BaseException:
            _core.end_request(token)
            raise
        return _Body(body, token)


class _Body:
    """The response body, ending the request when the server closes it (PEP 3333)."""

    __slots__ = ("_body", "_token")

    def __init__(self, body, token):
        self._body = body
        self._token = token

    def __iter__(self):
        return iter(self._body)

    def close(self):
        token, self._token = self._token, None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if token is not None:
                _core.end_request(token)


def wrap(app):
    """``Middleware(app)``, unless ``app`` already is one."""
    return app if getattr(app, "forkless_wrapped", False) else Middleware(app)
