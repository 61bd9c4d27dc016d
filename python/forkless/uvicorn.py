"""``python -m forkless.uvicorn APP [options]``: an ASGI app as a forkless worker.

uvicorn serving the supervisor's listening sockets (``LISTEN_FDS``, what ``uvicorn --fd 3``
does) is one process, so the supervisor exec's the worker itself: it attaches (on a background
thread, while uvicorn imports the app), serves, and reports ready once uvicorn listens and the
app's lifespan startup is done. The app is wrapped in ``forkless.asgi.Middleware`` (one
generation per request, request counting). Signals are uvicorn's: TERM drains;
``max_requests`` makes the forkless link send TERM.

The sockets are handed to uvicorn as socket objects made from the inherited fds (the family
detected from the fd), which is what ``--fd`` does, except that ``--fd`` labels them AF_UNIX and
asyncio then skips TCP_NODELAY on their connections.
"""

import argparse
import os
import socket
import sys


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m forkless.uvicorn", description=__doc__.split("\n\n")[0])
    parser.add_argument("app", help="module:attribute of the ASGI app")
    parser.add_argument("--app-dir", default=".", help="added to sys.path before importing the app")
    parser.add_argument("--factory", action="store_true", help="APP is a factory that returns the app")
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    parser.add_argument("--http", default="auto")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--lifespan", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--timeout-keep-alive", type=int, default=5)
    parser.add_argument("--timeout-graceful-shutdown", type=int, default=None)
    parser.add_argument("--limit-concurrency", type=int, default=None)
    parser.add_argument("--root-path", default="")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import forkless

    forkless.attach(wait=False)  # the CUDA context overlaps the imports below
    import uvicorn

    from .asgi import wrap

    fds = [int(fd) for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0")))]
    if not fds:
        print("forkless.uvicorn: LISTEN_FDS is not set: this runs under `supervisor run`", file=sys.stderr)
        return 78
    sys.path.insert(0, os.path.abspath(args.app_dir))

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            self.config.loaded_app = wrap(self.config.loaded_app)
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                forkless.attach()
                forkless.ready()

    config = uvicorn.Config(
        args.app,
        factory=args.factory,
        log_level=args.log_level,
        access_log=args.access_log,
        http=args.http,
        loop=args.loop,
        lifespan=args.lifespan,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        limit_concurrency=args.limit_concurrency,
        root_path=args.root_path,
        workers=1,
    )
    sockets = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    for fd in fds:
        os.close(fd)
    Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
