"""A plain ASGI app for the tests: Σ(W x + b) for {"seed": n}, with numpy; on the batch lane
(awaited with ``submit_async``) when the config has ``[lane]``."""

import json
import os
import sys

import numpy as np

import forkless

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python-flask"))
from seeded import seeded_input  # noqa: E402

generation = forkless.attach()
LANE = generation.has_lane
del generation

if LANE:
    # With [lane]: one pass for the requests of every worker, awaited without blocking the loop.
    @forkless.lane_pass
    def run(g, inputs):
        x = np.frombuffer(inputs.joined(), dtype=np.float32).reshape(len(inputs), -1)
        y = x @ g.numpy("weight").T + g.numpy("bias")
        return [row.tobytes() for row in y.sum(axis=1, dtype=np.float64)]


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
    x = seeded_input(json.loads(body)["seed"], w.shape[1])
    if LANE:
        total = float(np.frombuffer(await g.submit_async(x.tobytes()), dtype=np.float64)[0])
    else:
        total = float((w @ x + b).sum(dtype="float64"))
    out = json.dumps({"result": total, "generation": g.number}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
