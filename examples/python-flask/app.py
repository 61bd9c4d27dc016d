"""The seed's Flask app, served by forkless workers from one shared copy of the weights.

The seed built ``torch.nn.Linear(10000, 50000)`` in every gunicorn worker (4 workers, 4 copies
of 1.9 GB) and answered ``POST /`` with the sum of the output. Here the model is the same
module, but its parameters are the tensors the forkless owner loaded once (``forkless.bind``:
zero-copy, read-only; on a GPU, one CUDA allocation mapped by every worker). Its size follows
the weights file. Run it with ``python -m forkless.gunicorn app:app`` under ``supervisor run``
(config.toml here).

- ``POST /`` ``{"x": [in floats]}`` or ``{"seed": n}`` → ``{"result": Σ y, "generation": G,
  "worker": pid}``, y = W x + b. ``{"seed": n}`` draws x exactly as the linear demo does
  (``seeded.py``), so answers can be compared with the Rust worker's on the same weights.
- ``POST /infer``: the same, answered with the linear demo's fields (``y_sum``, ``y_head``,
  ``generation``, ``worker``), so ``chaos run`` drives this service as it drives the demo.
- ``GET /healthz``: 200 ``{"status": "ok", ...}``.

torch is optional: with it (and always on the GPU) the model is the torch module; without it
(CI, the host path) numpy computes the same ``W @ x + b`` in float32 over the shared arrays.
``FORKLESS_EXAMPLE_ENGINE=numpy`` forces numpy.

With ``[lane] enabled = true`` in the config, requests do not run the model in their own
worker: they submit x to the batch lane, and one pass (``lane_run``, in whichever worker holds
the lane) answers the requests of every worker at once (docs/LANE.md, "From Python").
"""

import os
import sys
import time

started = time.monotonic()
import numpy as np  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

import forkless  # noqa: E402
from seeded import seeded_input  # noqa: E402

try:  # imported while forkless attaches (and opens the CUDA context) on its own thread
    import torch
except ImportError:
    torch = None
imported = time.monotonic()


def is_linear(g):
    """What this app can serve: a float32 Linear layer, weight [out, in] and bias [out]."""
    have = {t.name: t for t in g.tensors()}
    w, b = have.get("weight"), have.get("bias")
    if w is None or b is None:
        return f"needs tensors 'weight' [out, in] and 'bias' [out], has {sorted(have)}"
    if w.dtype != "float32" or b.dtype != "float32" or len(w.shape) != 2 or b.shape != (w.shape[0],):
        return f"weight {w.dtype} {list(w.shape)} and bias {b.dtype} {list(b.shape)} are not a float32 Linear layer"
    return None


# The supervisor's current weights, mapped read-only. Keep no Generation (or array of one) in a
# global past start-up: it would keep the weights of an old generation mapped after a hot swap.
# In a request, forkless.generation() is the request's.
generation = forkless.attach(accept=is_linear)
attached = time.monotonic()
OUT, IN = generation.info("weight").shape
BACKEND = generation.backend
HEAD = 8

ENGINE = "torch" if torch is not None and os.environ.get("FORKLESS_EXAMPLE_ENGINE") != "numpy" else "numpy"
if BACKEND == "cuda" and ENGINE != "torch":
    raise SystemExit("the weights are in GPU memory: this app needs torch there")

if ENGINE == "torch":
    with torch.device("meta"):  # no memory of its own: bind() gives it the shared tensors
        model = torch.nn.Linear(IN, OUT)
    forkless.bind(model, generation)
    forkless.on_generation(lambda g: forkless.bind(model, g))  # hot swaps, between requests
    device = torch.device(generation.device)

    def forward(x):
        with torch.inference_mode():
            y = model(torch.from_numpy(x).to(device, non_blocking=True))
            out = torch.cat([y.sum(dtype=torch.float64).reshape(1), y[:HEAD].double()]).tolist()
        return out[0], out[1:]

    def warm_up():
        forward(np.zeros(IN, dtype=np.float32))
        if device.type == "cuda":
            torch.cuda.synchronize()

else:
    weights = {}

    def use(g):
        weights.update(w=g.numpy("weight"), b=g.numpy("bias"))

    use(generation)
    forkless.on_generation(use)

    def forward(x):
        y = weights["w"] @ x + weights["b"]
        return float(y.sum(dtype=np.float64)), y[:HEAD].tolist()

    def warm_up():
        forward(np.zeros(IN, dtype=np.float32))


LANE = generation.has_lane
if LANE:
    # One pass for the requests of every worker. Each answer is Σ y then y[:HEAD], as float64.
    # The pass gets its generation each time and keeps none of it (a hot swap moves on).
    @forkless.lane_pass
    def lane_run(g, inputs):
        sizes = inputs.sizes()
        if sizes != [4 * IN] * len(sizes):  # the handlers check x; this is for any other caller
            return [ValueError(f"x must hold {IN} float32 values, not {n} bytes") if n != 4 * IN
                    else RuntimeError("another request of this pass was malformed: retry") for n in sizes]
        # All of them as one array, without a copy.
        x = np.frombuffer(inputs.joined(), dtype=np.float32).reshape(len(sizes), IN)
        if ENGINE == "torch":
            with torch.inference_mode():
                y = torch.nn.functional.linear(torch.from_numpy(x).to(device), g.torch("weight"), g.torch("bias"))
                rows = torch.cat([y.sum(dim=1, dtype=torch.float64)[:, None], y[:, :HEAD].double()], 1)
                rows = rows.cpu().numpy()
        else:
            y = x @ g.numpy("weight").T + g.numpy("bias")
            rows = np.concatenate([y.sum(axis=1, dtype=np.float64)[:, None], y[:, :HEAD]], axis=1)
        return [row.tobytes() for row in rows]

    def forward(x):  # noqa: F811 - the lane replaces the per-worker forward
        answer = np.frombuffer(forkless.generation().submit(x.tobytes()), dtype=np.float64)
        return float(answer[0]), answer[1:].tolist()

# A hot swap to weights this model cannot use (other names or sizes) is refused, not served.
forkless.attach(accept={"weight": ("float32", (OUT, IN)), "bias": ("float32", (OUT,))})
bound = time.monotonic()
if not LANE:  # with the lane, the first pass warms up (it needs ready(), after this import)
    warm_up()
del generation
print(f"app: {ENGINE} engine{' on the batch lane' if LANE else ''}, W [{OUT}, {IN}] on {BACKEND}: imports {1e3 * (imported - started):.0f} ms, then "
      f"attach {1e3 * (attached - imported):.0f} ms more, model bound {1e3 * (bound - attached):.0f} ms, warm-up "
      f"{1e3 * (time.monotonic() - bound):.0f} ms", file=sys.stderr)

app = Flask(__name__)


class BadRequest(ValueError):
    pass


@app.errorhandler(BadRequest)
def bad_request(error):
    return jsonify(error=str(error)), 400


@app.errorhandler(forkless.LaneFull)
def lane_full(error):
    return jsonify(error=str(error)), 503


@app.errorhandler(forkless.LaneError)
def lane_failed(error):
    return jsonify(error=str(error)), 500


def input_vector():
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or ("x" in body) == ("seed" in body):
        raise BadRequest('send {"x": [floats]} or {"seed": n}')
    if "seed" in body:
        try:
            return seeded_input(body["seed"], IN)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e)) from e
    x = np.asarray(body["x"], dtype=np.float32)
    if x.shape != (IN,):
        raise BadRequest(f"x must hold {IN} floats, not {x.size}")
    return x


@app.post("/")
def predict():
    total, _ = forward(input_vector())
    return jsonify(result=total, generation=forkless.generation().number, worker=os.getpid())


@app.post("/infer")
def infer():
    total, head = forward(input_vector())
    return jsonify(y_sum=total, y_head=head, generation=forkless.generation().number, worker=os.getpid())


@app.get("/healthz")
def healthz():
    return jsonify(status="ok", generation=forkless.generation().number, worker=os.getpid(), engine=ENGINE,
                   backend=BACKEND, model={"in": IN, "out": OUT})
