"""A plain ASGI app for the tests: y = W x + b for {"seed": n}, with numpy."""

import json
import os
import sys

import forkless

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python-flask"))
from seeded import seeded_input  # noqa: E402

forkless.attach()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    g = forkless.generation()
    w, b = g.numpy("weight"), g.numpy("bias")
    y = w @ seeded_input(json.loads(body)["seed"], w.shape[1]) + b
    out = json.dumps({"result": float(y.sum(dtype="float64")), "generation": g.number}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
