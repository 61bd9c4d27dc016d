"""forkless for Python: a WSGI/ASGI service as a forkless worker.

The supervisor (``supervisor run config.toml``) loads a model's weights once, into shared
memory (a sealed memfd on the host, a CUDA VMM allocation on a GPU), and starts N workers that
map them read-only. This package makes a Python process such a worker:

    import forkless, torch

    # Like a Rust worker, on a background thread. The check decides on the generation at attach
    # and on every hot swap's offer: a refused swap is aborted for every worker, and
    # `supervisor reload-model` fails with the reason. A check sees names, dtypes and shapes.
    generation = forkless.attach(accept={"weight": ("float32", (50000, 10000))})
    with torch.device("meta"):
        model = torch.nn.Linear(10000, 50000)       # no memory of its own
    forkless.bind(model)                            # parameters = the shared tensors, no copy
    forkless.on_generation(lambda g: forkless.bind(model, g))   # hot swaps, between requests

and serve it with one of the launchers, which take the listening sockets the supervisor
bound (``LISTEN_FDS``), count requests and report the worker ready::

    python -m forkless.gunicorn app:app      # WSGI (Flask): gunicorn, one worker process
    python -m forkless.uvicorn app:app       # ASGI: uvicorn, one process

With ``[lane] enabled = true`` in the config, requests of every worker share GPU passes:
declare the pass with ``forkless.lane_pass(run)`` and submit with ``generation.submit(bytes)``
(docs/LANE.md, "From Python").

Tensors are zero-copy and read-only: numpy arrays with ``writeable=False`` and torch tensors on
the host path, torch tensors on ``cuda:N`` on the GPU path (through DLPack).
"""

from ._core import (
    AttachError,
    BindError,
    Candidate,
    Generation,
    LaneError,
    LaneFull,
    Refused,
    TensorInfo,
    attach,
    count_request,
    cuda_stack_limit,
    generation,
    info,
    is_attached,
    lane_pass,
    load,
    on_generation,
    ready,
)
from ._bind import bind, bind_problems

__all__ = [
    "AttachError",
    "BindError",
    "Candidate",
    "Generation",
    "LaneError",
    "LaneFull",
    "Refused",
    "TensorInfo",
    "attach",
    "bind",
    "bind_problems",
    "count_request",
    "cuda_stack_limit",
    "generation",
    "info",
    "is_attached",
    "lane_pass",
    "load",
    "on_generation",
    "ready",
]
