"""The seed's app as it was, for the side-by-side measurement: no forkless, and every gunicorn
worker builds the model and holds its own copy of the weights::

    WEIGHTS=../linear/weights-seed.safetensors gunicorn -w 4 -b 127.0.0.1:8091 baseline_app:app

(``gunicorn --preload`` is what fails with "Cannot re-initialize CUDA in forked subprocess".)
It loads the same weights file as the forkless workers (``WEIGHTS``; read with numpy, no
safetensors package needed) so that its answers can be checked, and answers the same requests:
``POST /`` ``{"x": [...]}`` or ``{"seed": n}`` → ``{"result": Σ y, "worker": pid}``; ``/infer`` too.
"""

import json
import os

import numpy as np
import torch
from flask import Flask, jsonify, request

from seeded import seeded_input

HEAD = 8


def read_safetensors(path):
    """{name: numpy array} of a float32 safetensors file (header: 8-byte length, JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=np.float32).reshape(meta["shape"])
    return out


device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tensors = read_safetensors(os.environ.get("WEIGHTS", os.path.join(os.path.dirname(__file__), "..", "linear",
                                                                  "weights.safetensors")))
OUT, IN = tensors["weight"].shape
model = torch.nn.Linear(IN, OUT)  # the seed: torch.nn.Linear(10000, 50000), in every worker
with torch.no_grad():
    model.weight.copy_(torch.from_numpy(tensors["weight"]))
    model.bias.copy_(torch.from_numpy(tensors["bias"]))
model = model.to(device).eval()
del tensors

app = Flask(__name__)


def forward(x):
    with torch.inference_mode():
        y = model(torch.from_numpy(x).to(device, non_blocking=True))
        out = torch.cat([y.sum(dtype=torch.float64).reshape(1), y[:HEAD].double()]).tolist()
    return out[0], out[1:]


def input_vector():
    body = request.get_json(force=True, silent=True) or {}
    if "seed" in body:
        return seeded_input(body["seed"], IN)
    return np.asarray(body["x"], dtype=np.float32)


@app.post("/")
def predict():
    total, _ = forward(input_vector())
    return jsonify(result=total, worker=os.getpid())


@app.post("/infer")
def infer():
    total, head = forward(input_vector())
    return jsonify(y_sum=total, y_head=head, generation=1, worker=os.getpid())


@app.get("/healthz")
def healthz():
    return jsonify(status="ok", worker=os.getpid())
