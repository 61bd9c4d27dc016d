"""A plain WSGI app for the tests: probes what a write to the shared weights does."""

import json

import forkless

forkless.attach()


def app(environ, start_response):
    g = forkless.generation()
    weight = g.numpy("weight")
    probe = {"generation": g.number, "writeable": bool(weight.flags.writeable), "first": float(weight[0, 0])}
    try:
        weight[0, 0] = 1.0
        probe["write"] = "allowed"
    except Exception as e:  # noqa: BLE001 - reported to the test
        probe["write"] = f"{type(e).__name__}: {e}"
    try:
        weight.flags.writeable = True
        probe["set_writeable"] = "allowed"
    except Exception as e:  # noqa: BLE001
        probe["set_writeable"] = f"{type(e).__name__}: {e}"
    probe["zero_copy"] = weight.ctypes.data == g.dlpack("weight").data_ptr
    body = json.dumps(probe).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]
