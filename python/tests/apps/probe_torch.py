"""A plain WSGI app that probes the torch side of the binding (scripts/gpu_python.py, section
readonly): zero-copy, CUDA graphs over the shared weights, and what a write does.

GET /info, /graph, /write/copy (an element set: a host-to-device copy), /write/kernel (an
in-place kernel). After a write that breaks the CUDA context the process answers, then exits 1
so that the supervisor replaces it.
"""

import json
import os
import threading

import torch

import forkless

forkless.attach()


def _linear(g):
    out, inputs = g.info("weight").shape
    with torch.device("meta"):
        layer = torch.nn.Linear(inputs, out)
    return forkless.bind(layer, g)


def info():
    g = forkless.generation()
    w = g.torch("weight")
    producer = g.dlpack("weight")
    return {"device": str(w.device), "dtype": str(w.dtype), "shape": list(w.shape), "zero_copy":
            w.data_ptr() == producer.data_ptr, "torch": torch.__version__, "stack_limit": forkless.cuda_stack_limit(),
            "generation": g.number}


def graph():
    g = forkless.generation()
    layer = _linear(g)
    device = torch.device(g.device)
    x = torch.linspace(-1, 1, layer.in_features, device=device)
    with torch.inference_mode():
        eager = layer(x).double().sum().item()
        if device.type != "cuda":
            return {"graph": "not on a GPU", "eager": eager}
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static)  # warm-up on a side stream, as CUDA graph capture wants
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            out = layer(static)
        static.copy_(x)
        captured.replay()
        torch.cuda.synchronize()
        replayed = out.double().sum().item()
    # The same kernels, though cuBLAS may pick another algorithm under capture: equal to rounding.
    return {"eager": eager, "graph": replayed, "equal": abs(eager - replayed) <= 1e-6 * max(1.0, abs(eager))}


def context_usable(device):
    try:
        return torch.ones(4, device=device).sum().item() == 4.0
    except Exception:  # noqa: BLE001
        return False


def write(kind):
    g = forkless.generation()
    w = g.torch("weight")
    before = w[0, 0].item()
    try:
        if kind == "copy":
            w[0, 0] = 1.0
        else:
            w[:2].add_(1.0)
        if w.is_cuda:
            torch.cuda.synchronize()
        outcome = "allowed"
    except Exception as e:  # noqa: BLE001 - reported
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    usable = context_usable(w.device)
    after = w[0, 0].item() if usable else None
    return {"write": outcome, "context_usable": usable, "before": before, "after": after}


ROUTES = {"/info": info, "/graph": graph, "/write/copy": lambda: write("copy"),
          "/write/kernel": lambda: write("kernel")}


def app(environ, start_response):
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        start_response("404 Not Found", [("content-length", "0")])
        return [b""]
    result = route()
    body = json.dumps(result).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    if result.get("context_usable") is False:
        threading.Timer(0.5, os._exit, args=(1,)).start()  # a broken CUDA context cannot serve
    return [body]
