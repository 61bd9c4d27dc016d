#!/usr/bin/env python3
"""The Python-workers check of forkless (issue 12): the seed's Flask + PyTorch app
(examples/python-flask) as 4 forkless workers on a GPU, against plain `gunicorn -w 4` with a
copy of the weights in every worker. Run on the GPU machine from the repository root
(`scripts/gpu-check.sh python`), with what was prepared on a machine like CI:

    cargo build --release --bins && mkdir -p .gpu-bin && \\
      cp target/release/{supervisor,linear-worker,chaos,gpu-probe} .gpu-bin/
    python3 scripts/gpu_python.py --prepare   # .whl/: the forkless abi3 wheel (maturin) + flask,
                                              # gunicorn and their dependencies for CPython 3.12

The GPU machine needs python3 (>= 3.9) with torch and numpy, nvidia-smi, and no network: the
wheels in .whl/ are unpacked into $OUT/pylib, which the workers get as PYTHONPATH.

Sections (default: all, in this order; each prints PASS/FAIL lines):
  setup       unpack the wheels, check the imports, write the seed's model once (1.9 GB)
  context     what a PyTorch worker's GPU memory is made of (a probe process, stage by stage),
              and the per-request cost in one process (forward alone, through Flask)
  readonly    zero-copy torch tensors on cuda:N, CUDA graphs over them, and what a write does
  baseline    plain `gunicorn -w 4 baseline_app:app`: GPU memory, time to answer, throughput
  forkless    4 forkless Python workers: GPU memory (<= model + 4 x context + 2 % of the GPU),
              throughput at 16 keep-alive connections side by side with the baseline, profile
  lane        workers on the batch lane (one torch pass for every worker's requests): 4
              (LANE_WORKERS="4,8") at 16 and 64 connections (LANE_CONNECTIONS, LANE_WAIT_US), gthread workers with
              LANE_THREADS (16) threads each, every answer checked; LANE_KILL=1 SIGKILLs
              the worker running the passes every 2 s
  coldstart   supervisor start to "all 4 workers ready", weights in the page cache (<= 4 s)
  ownerkill   the owner SIGKILLed under load: 0 failed requests; a worker started afterwards
              attaches

`--backend host` runs the same on host memory with a small model (numpy/torch on the CPU), as
a dry run for machines without a GPU. Results: stdout, and $OUT (default /tmp/forkless-gpu-python):
gpu-python.txt, results.json, every child's log.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "python-flask"
APPS = ROOT / "python" / "tests" / "apps"
MIB = 1 << 20
PORT = 18090
BASELINE_PORT = 18091
SEEDS = list(range(64))
RESULTS = {}


class Check:
    def __init__(self, out):
        self.out = out
        self.failed = 0
        self.log = open(out / "gpu-python.txt", "a")

    def say(self, text=""):
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def verdict(self, ok, text):
        self.failed += 0 if ok else 1
        self.say(f"{'PASS' if ok else 'FAIL'} {text}")
        RESULTS.setdefault("verdicts", []).append({"ok": bool(ok), "text": text})


def sh(*cmd, timeout=120, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=check, **kw)


# ---------------------------------------------------------------------------------------------
# GPU memory (nvidia-smi)


def gpu_used_mib():
    if ARGS.backend != "cuda":
        return 0
    out = sh("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(ARGS.device)).stdout
    return int(out.split()[0])


def gpu_total_mib():
    if ARGS.backend != "cuda":
        return 0
    out = sh("nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", str(ARGS.device)).stdout
    return int(out.split()[0])


def gpu_apps_mib():
    """{pid: MiB} of every process NVML attributes GPU memory to."""
    if ARGS.backend != "cuda":
        return {}
    out = sh("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", check=False).stdout
    apps = {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            apps[int(parts[0])] = int(parts[1])
    return apps


def settle_gpu(patience=30):
    """Waits until GPU memory is back near the baseline (processes of a previous run gone)."""
    deadline = time.time() + patience
    while time.time() < deadline and gpu_used_mib() > BASELINE_MIB + 8:
        time.sleep(0.2)
    return gpu_used_mib()


class Sampler:
    """GPU utilisation and memory, sampled by `nvidia-smi` every 200 ms while running."""

    def __init__(self):
        self.samples = []
        self.proc = None
        if ARGS.backend == "cuda":
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(ARGS.device), "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                self.samples.append((time.time(), int(parts[0]), int(parts[1])))

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def utilisation(self, since, until):
        values = [u for t, u, _ in self.samples if since <= t <= until]
        return statistics.mean(values) if values else None


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def children_of(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Processes


class Logged:
    """A child process whose stdout+stderr go to a log file (and are kept for waiting on)."""

    def __init__(self, name, cmd, env=None, cwd=None):
        self.name = name
        self.lines = []
        self.log = open(OUT / f"{name}.log", "w")
        self.started = time.time()
        self.proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))
            self.log.write(line)
            self.log.flush()

    def wait_for(self, pattern, timeout=120, start=0):
        """(time, line) of the first line from index `start` matching `pattern`; None on timeout."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        seen = start
        while time.time() < deadline:
            while seen < len(self.lines):
                if regex.search(self.lines[seen][1]):
                    return self.lines[seen]
                seen += 1
            if self.proc.poll() is not None and not self.reader.is_alive() and seen >= len(self.lines):
                return None
            time.sleep(0.01)
        return None

    def mark(self):
        return len(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode


class Supervisor(Logged):
    def __init__(self, name, config):
        self.config = config
        super().__init__(name, [BIN / "supervisor", "run", "--log-format", "json", config])

    def ready(self, timeout=120):
        return self.wait_for("workers ready", timeout)

    def control(self, *args, timeout=60):
        return sh(BIN / "supervisor", *args, "-c", self.config, check=False, timeout=timeout)

    def status(self):
        run = self.control("status", "--json", timeout=10)
        return json.loads(run.stdout) if run.returncode == 0 and run.stdout.strip() else {}

    def pids(self, role):
        return [p["pid"] for p in self.status().get("processes", []) if p["role"] == role and p.get("pid")]

    def serving_pids(self):
        """The gunicorn worker (the process that serves) of every worker slot."""
        return [kid for master in self.pids("worker") for kid in children_of(master)]


def field(line, name):
    """A number logged as `"name": 1.5` (supervisor JSON)."""
    match = re.search(rf'"{name}"\s*:\s*"?([0-9.]+)', line or "")
    return float(match.group(1)) if match else None


def worker_env():
    env = {"PYTHONPATH": str(PYLIB), "PYTHONUNBUFFERED": "1"}
    if ARGS.cublas_env:
        env["CUBLAS_WORKSPACE_CONFIG"] = ARGS.cublas_env
    if ARGS.backend != "cuda":
        env["OMP_NUM_THREADS"] = "1"  # 4 workers on a few cores: one thread each
    return env


def python_config(name, workers=4, app="app:app", app_dir=EXAMPLE, extra="", gunicorn=()):
    command = [sys.executable, "-m", "forkless.gunicorn", "--chdir", str(app_dir), "--log-level", "warning",
               *ARGS.gunicorn_args.split(), *gunicorn, app]
    env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in worker_env().items())
    path = OUT / "configs" / f"{name}.toml"
    path.write_text(f"""[model]
path = {json.dumps(str(MODEL))}
backend = "{ARGS.backend}"

[cuda]
device = {ARGS.device}
stack_limit_bytes = {ARGS.stack}

[workers]
command = {json.dumps([str(c) for c in command])}
count = {workers}
listen = ["127.0.0.1:{PORT}"]
start_timeout_s = 120
env = {{ {env} }}

[supervisor]
graceful_timeout_s = 10
runtime_dir = {json.dumps(str(OUT / "run"))}
{extra}""")
    return path


# ---------------------------------------------------------------------------------------------
# Load: keep-alive HTTP/1.1 clients in several processes (no GIL between them), every answer
# checked against the reference.


def _client(addr, path, seeds, duration, conns, start_at, queue, offset):
    host, port = addr
    results = []
    lock = threading.Lock()

    def run(k):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        i = k
        latencies, wrong, failed, answers = [], [], [], 0
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + duration
        while time.time() < end:
            seed = seeds[i % len(seeds)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, json.dumps({"seed": seed}), {"content-type": "application/json"})
                reply = conn.getresponse()
                body = reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {body[:200]!r}")
                answer = json.loads(body)
                latencies.append(time.perf_counter() - t0)
                answers += 1
                value = answer.get("result", answer.get("y_sum"))
                wrong.append((seed, value, answer.get("generation", 1)))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                failed.append((time.time(), seed, repr(e)[:200]))
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
        with lock:
            results.append((latencies, wrong, failed))

    threads = [threading.Thread(target=run, args=(offset + k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = [x for r in results for x in r[0]]
    values = [x for r in results for x in r[1]]
    failed = [x for r in results for x in r[2]]
    queue.put((latencies, values, failed))


def drive(port, duration, connections=16, path="/", processes=None):
    """Closed-loop load: `connections` keep-alive connections over a few processes. Returns a
    dict with req/s, latency percentiles, failures and wrong answers."""
    processes = processes or min(4, connections)
    ctx = multiprocessing.get_context("spawn")  # this process has threads: no fork()
    queue = ctx.Queue()
    start_at = time.time() + 2.0  # every client process is up by then
    per = [connections // processes + (1 if k < connections % processes else 0) for k in range(processes)]
    procs = [ctx.Process(target=_client, args=(("127.0.0.1", port), path, SEEDS, duration, n, start_at, queue,
                                                sum(per[:k])))
             for k, n in enumerate(per) if n]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join(10)
    latencies = sorted(x for part in parts for x in part[0])
    values = [x for part in parts for x in part[1]]
    failed = [x for part in parts for x in part[2]]
    wrong = [(s, v, g) for s, v, g in values if not REFERENCE.matches(s, v)]
    pct = (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 2)) if latencies \
        else (lambda q: None)
    return dict(requests=len(latencies), rps=round(len(latencies) / duration, 1), p50_ms=pct(0.50),
                p99_ms=pct(0.99), max_ms=round(latencies[-1] * 1e3, 2) if latencies else None,
                mean_ms=round(statistics.mean(latencies) * 1e3, 2) if latencies else None,
                failed=len(failed), wrong=len(wrong), failures=failed[:5], wrong_examples=wrong[:5],
                http_failed=sum(1 for f in failed if "HTTP" in f[2]),
                started=start_at, ended=start_at + duration)


class Reference:
    """Σ y per seed in float64, from the weights file: y_sum = (Σ_o W[o, :]) · x + Σ b."""

    def __init__(self, path):
        import numpy as np

        raw = path.read_bytes() if path.stat().st_size < (1 << 30) else None
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        base = 8 + size

        def tensor(name):
            start, end = header[name]["data_offsets"]
            if raw is not None:
                return np.frombuffer(raw, dtype="<f4", count=(end - start) // 4, offset=base + start).reshape(
                    header[name]["shape"])
            return np.memmap(path, dtype="<f4", mode="r", offset=base + start, shape=tuple(header[name]["shape"]))

        w, b = tensor("weight"), tensor("bias")
        self.inputs = w.shape[1]
        col = np.zeros(w.shape[1], dtype=np.float64)
        for row in range(0, w.shape[0], 4096):
            col += w[row:row + 4096].astype(np.float64).sum(axis=0)
        self.bias = float(b.astype(np.float64).sum())
        self.sums = {}
        sys.path.insert(0, str(EXAMPLE))
        from seeded import seeded_input

        for seed in SEEDS:
            self.sums[seed] = float(col @ seeded_input(seed, self.inputs).astype(np.float64)) + self.bias

    def matches(self, seed, value):
        want = self.sums.get(seed)
        # float32 GEMV of 10000-long rows, 50000 of them summed: a few 1e-3 at most; another
        # model's answer is off by tens.
        return value is not None and want is not None and abs(value - want) <= 1e-4 * abs(want) + 0.05


def post(port, path, body, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


def get(port, path, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Sections


def section_setup(check):
    """Unpack the wheels, check the imports, write the model once and read it into the page cache."""
    wheels = sorted(WHEELS.glob("*.whl"))
    check.say(f"wheels in {WHEELS}: {', '.join(w.name for w in wheels) or 'none'}")
    if PYLIB.exists():
        shutil.rmtree(PYLIB)
    PYLIB.mkdir(parents=True)
    for wheel in wheels:
        unpack(wheel, PYLIB)
    probe = sh(sys.executable, "-c",
               "import forkless, flask, gunicorn, numpy, importlib.metadata as m\n"
               "print('forkless', forkless.__file__)\n"
               "print('flask', m.version('flask'), 'gunicorn', gunicorn.__version__, 'numpy', numpy.__version__)\n"
               "try:\n import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())\n"
               "except ImportError: print('torch missing')",
               env={**os.environ, "PYTHONPATH": str(PYLIB)}, check=False, timeout=120)
    check.say((probe.stdout + probe.stderr).strip())
    check.verdict(probe.returncode == 0 and "forkless" in probe.stdout,
                  f"python {sys.version.split()[0]} imports forkless, flask, gunicorn, numpy from the wheels")
    if ARGS.backend == "cuda":
        check.verdict("cuda True" in probe.stdout, "torch sees the GPU")
    for name in ("supervisor", "linear-worker"):
        check.verdict((BIN / name).exists(), f"{BIN / name} present")
    if not MODEL.exists():
        started = time.time()
        sh(BIN / "linear-worker", "make-weights", "--in", ARGS.model_in, "--out", ARGS.model_out, "--seed", 42, MODEL,
           timeout=600)
        check.say(f"wrote {MODEL.name} ({MODEL.stat().st_size / MIB:.0f} MiB) in {time.time() - started:.1f} s")
    subprocess.run(["cat", str(MODEL)], stdout=subprocess.DEVNULL, check=False)  # into the page cache
    global REFERENCE
    started = time.time()
    REFERENCE = Reference(MODEL)
    check.say(f"model {MODEL} ({MODEL.stat().st_size / MIB:.0f} MiB, W [{ARGS.model_out}, {ARGS.model_in}]); "
              f"reference for {len(SEEDS)} seeds in {time.time() - started:.1f} s")


def unpack(wheel, target):
    """A wheel is a zip: its files go to `target` as `pip install --target` would put them."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            parts = member.split("/")
            if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                dest = target / "/".join(parts[2:])
            elif parts[0].endswith(".data"):
                continue  # scripts, headers: not needed
            else:
                dest = target / member
            if member.endswith("/"):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if dest.suffix == ".so":
                dest.chmod(0o755)


CONTEXT_PROBE = r"""
import json, os, subprocess, sys, time
stage = {}
def nvml():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts[0] == str(os.getpid()):
            return int(parts[1])
    return 0
def mark(name):
    time.sleep(0.3)
    stage[name] = nvml()
mode = sys.argv[1]
device, stack, inputs, outputs = (int(a) for a in sys.argv[2:6])
t0 = time.time()
if mode == "forkless":
    import forkless._native as native
    stage["stack_limit_set"] = native.cuda_open(device, stack)
    mark("context (forkless, stack limit applied)")
t1 = time.time()
import torch
t2 = time.time()
dev = torch.device("cuda", device)
torch.zeros(1, device=dev)
torch.cuda.synchronize()
t3 = time.time()
mark("+ torch CUDA runtime")
with torch.device("meta"):
    layer = torch.nn.Linear(inputs, outputs)
w = torch.empty(outputs, inputs, device=dev).uniform_(-0.01, 0.01)
b = torch.zeros(outputs, device=dev)
layer.weight = torch.nn.Parameter(w, requires_grad=False); layer.bias = torch.nn.Parameter(b, requires_grad=False)
torch.cuda.synchronize()
weights_mib = nvml()
x = torch.linspace(-1, 1, inputs, device=dev)
with torch.inference_mode():
    layer(x).sum().item()
torch.cuda.synchronize()
stage["+ a forward (cuBLAS, activations)"] = nvml() - weights_mib + stage["+ torch CUDA runtime"]
sys.path.insert(0, os.environ["EXAMPLE"])
import numpy as np
from seeded import seeded_input
def forward(seed):
    with torch.inference_mode():
        y = layer(torch.from_numpy(seeded_input(seed, inputs)).to(dev, non_blocking=True))
        return torch.cat([y.sum(dtype=torch.float64).reshape(1), y[:8].double()]).tolist()
for s in range(20):
    forward(s)
n = 300
t = time.perf_counter()
for s in range(n):
    forward(s)
forward_ms = (time.perf_counter() - t) / n * 1e3
from flask import Flask, jsonify, request
app = Flask("probe")
@app.post("/")
def predict():
    out = forward(request.get_json(force=True)["seed"])
    return jsonify(result=out[0], worker=os.getpid())
client = app.test_client()
for s in range(20):
    client.post("/", json={"seed": s})
t = time.perf_counter()
for s in range(n):
    client.post("/", json={"seed": s})
flask_ms = (time.perf_counter() - t) / n * 1e3
after = native.cuda_open(device) if mode == "forkless" else None  # the stack limit now
print(json.dumps(dict(stages=stage, weights_mib=weights_mib - stage["+ torch CUDA runtime"], stack_limit_after=after,
                      import_torch_s=round(t2 - t1, 2), torch_cuda_init_s=round(t3 - t2, 2),
                      context_s=round(t1 - t0, 2), forward_ms=round(forward_ms, 3), flask_ms=round(flask_ms, 3))))
"""


def section_context(check):
    """What a PyTorch worker's GPU memory is made of, and the cost of one request in one process."""
    if ARGS.backend != "cuda":
        check.say("(host backend: no GPU context to measure)")
        return
    rows = {}
    for mode in ("forkless", "plain"):
        settle_gpu()
        run = sh(sys.executable, "-c", CONTEXT_PROBE, mode, ARGS.device, ARGS.stack, ARGS.model_in, ARGS.model_out,
                 env={**os.environ, **worker_env(), "EXAMPLE": str(EXAMPLE)}, check=False, timeout=300)
        (OUT / f"context-{mode}.log").write_text(run.stdout + run.stderr)
        try:
            rows[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            check.verdict(False, f"context probe ({mode}) failed: {run.stderr.strip()[-1500:]}")
    RESULTS["context"] = rows
    if "forkless" not in rows:
        return
    f = rows["forkless"]
    stages = f["stages"]
    check.say("A PyTorch worker's own GPU memory (NVML, MiB), stage by stage, in a probe process:")
    check.say("| stage | forkless worker (stack limit first) | plain torch process |")
    check.say("|---|---|---|")
    plain = rows.get("plain", {}).get("stages", {})
    for name in ("context (forkless, stack limit applied)", "+ torch CUDA runtime",
                 "+ a forward (cuBLAS, activations)"):
        check.say(f"| {name} | {stages.get(name)} | {plain.get(name, '-')} |")
    check.say(f"stack limit: set {stages.get('stack_limit_set')} B, after torch's first kernels "
              f"{f.get('stack_limit_after')} B (the driver raises it for a kernel that needs more, and keeps it)")
    check.say(f"times: CUDA context {f['context_s']} s, import torch {f['import_torch_s']} s, torch CUDA init "
              f"{f['torch_cuda_init_s']} s")
    check.say(f"one request in one process: forward alone {f['forward_ms']} ms (seed → x → GPU → Linear → sum), "
              f"through Flask's test client {f['flask_ms']} ms")
    global CONTEXT_MIB
    CONTEXT_MIB = stages["+ a forward (cuBLAS, activations)"]
    check.verdict(CONTEXT_MIB > 0, f"a PyTorch worker's context with forkless's stack limit: {CONTEXT_MIB} MiB "
                  f"(plain torch: {plain.get('+ a forward (cuBLAS, activations)', '?')} MiB)")


def section_readonly(check):
    """Zero-copy torch tensors, CUDA graphs over the shared weights, and what a write does."""
    settle_gpu()
    config = python_config("readonly", workers=1, app="probe_torch:app", app_dir=APPS,
                           extra="[restart]\nbackoff_initial_ms = 50\n")
    sup = Supervisor("readonly", config)
    try:
        if sup.ready() is None:
            return check.verdict(False, "readonly probe worker did not start (see readonly.log)")
        results = {}
        for path in ("/info", "/graph"):
            results[path] = get(PORT, path, timeout=60)[1]
            check.say(f"GET {path}: {json.dumps(results[path])}")
        info = results["/info"]
        on = "cuda" if ARGS.backend == "cuda" else "cpu"
        check.verdict(info.get("zero_copy") is True and info.get("device", "").startswith(on),
                      f"torch.from_dlpack gives a zero-copy tensor on {info.get('device')} (torch {info.get('torch')})")
        if ARGS.backend != "cuda":
            # torch has no read-only tensors: a CPU write hits the PROT_READ mapping (SIGSEGV).
            mark = sup.mark()
            try:
                outcome = get(PORT, "/write/copy", timeout=60)
            except (OSError, http.client.HTTPException) as e:
                outcome = repr(e)
            died = sup.wait_for(r"killed by signal 11|signal 11|status 139", timeout=30, start=mark)
            back = sup.wait_for(r"worker 0 ready", timeout=120, start=mark)
            after = get(PORT, "/info", timeout=60)[1]
            check.say(f"GET /write/copy (torch CPU tensor): {outcome}")
            check.verdict(died is not None and back is not None and after.get("zero_copy") is True,
                          "a write through a torch CPU tensor kills the worker with SIGSEGV (read-only mapping); "
                          "the supervisor replaces it and the weights are unchanged")
            RESULTS["readonly"] = dict(results, cpu_write=str(outcome), replaced=back is not None)
            return
        results["/write/copy"] = get(PORT, "/write/copy", timeout=60)[1]
        check.say(f"GET /write/copy: {json.dumps(results['/write/copy'])}")
        if ARGS.backend == "cuda":
            graph = results["/graph"]
            check.verdict(graph.get("equal") is True, f"a CUDA graph over the shared weights replays the eager answer "
                          f"({graph.get('graph')} vs {graph.get('eager')})")
            copy = results["/write/copy"]
            check.verdict(copy.get("write") != "allowed" and copy.get("after") == copy.get("before"),
                          f"an element write (host-to-device copy) is refused: {copy.get('write')}; context usable "
                          f"after it: {copy.get('context_usable')}")
            mark = sup.mark()
            kernel = get(PORT, "/write/kernel", timeout=60)[1]
            check.say(f"GET /write/kernel: {json.dumps(kernel)}")
            replaced = None
            if kernel.get("context_usable") is False:
                replaced = sup.wait_for(r"worker 0 ready", timeout=90, start=mark)
            after = get(PORT, "/info", timeout=60)[1]
            check.verdict(kernel.get("write") != "allowed" and after.get("zero_copy") is True,
                          f"an in-place kernel write faults ({kernel.get('write')}); context usable after: "
                          f"{kernel.get('context_usable')}; {'the worker was replaced and' if replaced else ''} "
                          f"serves the unchanged weights again")
            RESULTS["readonly"] = dict(results, kernel=kernel, after=after)
        else:
            RESULTS["readonly"] = results
    finally:
        sup.stop()


def run_load(check, label, port, processes_of, path="/"):
    """The load plus the profile: GPU utilisation, the serving processes' CPU use."""
    sampler = Sampler()
    pids = processes_of()
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    result = drive(port, ARGS.duration, ARGS.connections, path)
    cpu = {pid: round((cpu_seconds(pid) - cpu_before[pid]) / ARGS.duration * 100) for pid in pids}
    sampler.stop()
    result["gpu_util_pct"] = sampler.utilisation(result["started"], result["ended"])
    result["worker_cpu_pct"] = cpu
    check.say(f"{label}: {result['rps']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max "
              f"{result['max_ms']} ms; {result['requests']} answers, {result['failed']} failed, "
              f"{result['wrong']} wrong; "
              f"GPU utilisation {fmt(result['gpu_util_pct'])} %, serving processes' CPU {sorted(cpu.values())} %")
    if result["failures"]:
        check.say(f"  failures: {result['failures']}")
    if result["wrong_examples"]:
        check.say(f"  wrong: {result['wrong_examples']}")
    return result


def fmt(value):
    return "n/a" if value is None else f"{value:.0f}"


def section_baseline(check):
    """Plain `gunicorn -w 4 baseline_app:app`: every worker its own copy (the issue's baseline)."""
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            check.say("(torch is not installed: no baseline)")
            return
    except ImportError:
        return
    settle_gpu()
    before = gpu_used_mib()
    env = {**os.environ, **worker_env(), "WEIGHTS": str(MODEL)}
    gun = Logged("baseline", [sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{BASELINE_PORT}",
                              "--chdir", str(EXAMPLE), "--timeout", "300", "baseline_app:app"], env=env)
    try:
        first, all_four, seen = None, None, set()
        deadline = time.time() + 300
        while time.time() < deadline and gun.proc.poll() is None and len(seen) < 4:
            try:
                code, health = get(BASELINE_PORT, "/healthz", timeout=5)
                if code == 200:
                    first = first or time.time() - gun.started
                    seen.add(health["worker"])
            except OSError:
                time.sleep(0.05)
        all_four = time.time() - gun.started if len(seen) == 4 else None
        workers = children_of(gun.proc.pid)
        deadline = time.time() + 60  # the last copy may still be arriving on the GPU
        while ARGS.backend == "cuda" and time.time() < deadline and \
                sum(1 for pid in workers if gpu_apps_mib().get(pid, 0) > 100) < 4:
            time.sleep(0.2)
        time.sleep(1.0)
        used = gpu_used_mib() - before
        apps = gpu_apps_mib()
        per = [apps.get(pid) for pid in workers]
        memory = f"; GPU memory {used} MiB in all, per worker {per} MiB" if ARGS.backend == "cuda" else ""
        check.say(f"gunicorn -w 4 (a copy each): first answer {fmt_s(first)}, all 4 workers answering "
                  f"{fmt_s(all_four)} after launch{memory}")
        check.verdict(all_four is not None, "the baseline's 4 workers answer")
        result = run_load(check, "gunicorn -w 4", BASELINE_PORT, lambda: children_of(gun.proc.pid))
        RESULTS["baseline"] = dict(first_answer_s=first, all_answering_s=all_four, gpu_mib=used, per_worker_mib=per,
                                   load=result)
    finally:
        gun.stop()


def fmt_s(seconds):
    return "n/a" if seconds is None else f"{seconds:.1f} s"


def section_forkless(check):
    """4 forkless Python workers: memory, throughput (side by side with the baseline), profile."""
    settle_gpu()
    before = gpu_used_mib()
    sup = Supervisor("forkless", python_config("forkless"))
    try:
        ready = sup.ready(timeout=180)
        if ready is None:
            return check.verdict(False, "forkless: the 4 Python workers did not start (see forkless.log)")
        check.say(f"all 4 workers ready {field(ready[1], 'cold_start_ms')} ms after the supervisor's start")
        time.sleep(1.0)
        status = sup.status()
        warm = post(PORT, "/", {"seed": 1})
        check.verdict(warm[0] == 200 and REFERENCE.matches(1, warm[1].get("result")),
                      f"answer for seed 1 matches the float64 reference: {warm[1]}")
        used = gpu_used_mib() - before
        apps = gpu_apps_mib()
        serving = sup.serving_pids()
        per = [apps.get(pid, 0) for pid in serving]
        masters = [apps.get(pid, 0) for pid in sup.pids("worker")]
        owner = sum(apps.get(pid, 0) for pid in sup.pids("owner"))
        arena = (status.get("escrow_bytes") or MODEL.stat().st_size) // MIB
        result = dict(gpu_mib=used, per_worker_mib=per, masters_mib=masters, owner_mib=owner, arena_mib=arena,
                      unattributed_mib=(status.get("gpu_unattributed_bytes") or 0) // MIB)
        if ARGS.backend == "cuda":
            context = CONTEXT_MIB or max(per, default=0)
            literal = arena + 4 * context + 0.02 * gpu_total_mib()
            strict = (arena + owner + 4 * context) * 1.02
            check.say(f"GPU memory: {used} MiB in all = the arena {arena} MiB (escrow; NVML attributes it to no "
                      f"process: {result['unattributed_mib']} MiB) + the owner {owner} MiB + 4 Python workers "
                      f"{per} MiB "
                      f"(the gunicorn masters: {masters} MiB, no CUDA)")
            check.say(f"per worker: {statistics.mean(per):.0f} MiB against {context} MiB for a PyTorch worker's "
                      "context "
                      f"(section context: CUDA context + torch runtime + cuBLAS); no weights of its own")
            check.verdict(used <= literal, f"total {used} MiB <= model {arena} + 4 x {context} + 2 % of the GPU "
                          f"({0.02 * gpu_total_mib():.0f}) = {literal:.0f} MiB (with the owner counted and 2 % of the "
                          f"total: {strict:.0f} MiB)")
            base = RESULTS.get("baseline", {})
            if base.get("gpu_mib"):
                check.say(f"side by side: forkless {used} MiB, gunicorn -w 4 with copies {base['gpu_mib']} MiB")
        load = run_load(check, "forkless, 4 Python workers", PORT, sup.serving_pids)
        result["load"] = load
        if ARGS.backend == "cuda":
            apps = gpu_apps_mib()
            result["gpu_mib_after_load"] = gpu_used_mib() - before
            result["per_worker_mib_after_load"] = [apps.get(pid, 0) for pid in sup.serving_pids()]
            check.say(f"after the load: {result['gpu_mib_after_load']} MiB in all, per worker "
                      f"{result['per_worker_mib_after_load']} MiB")
        result["cold_start_ms"] = field(ready[1], "cold_start_ms")
        RESULTS["forkless"] = result
        check.verdict(load["failed"] == 0 and load["wrong"] == 0 and load["requests"] > 0,
                      f"forkless under load: {load['requests']} answers, every one checked: 0 failed, 0 wrong")
        base = RESULTS.get("baseline", {}).get("load")
        if base:
            ratio = load["rps"] / base["rps"] if base["rps"] else float("inf")
            check.say("| setup | req/s | p50 ms | p99 ms | GPU util % | serving processes' CPU % |")
            check.say("|---|---|---|---|---|---|")
            for label, r in (("gunicorn -w 4, a copy each", base), ("forkless, 4 Python workers", load)):
                check.say(f"| {label} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {fmt(r['gpu_util_pct'])} | "
                          f"{sorted(r['worker_cpu_pct'].values())} |")
            check.verdict(ratio >= 0.95, f"throughput: forkless {load['rps']} req/s vs gunicorn {base['rps']} req/s "
                          f"(x{ratio:.2f}; at least gunicorn's, within 5 % noise)")
        check.say(profile(load))
    finally:
        sup.stop()


class LeaderKiller:
    """SIGKILLs the worker process that holds the lane (status `leader_pid`) every 2 s."""

    def __init__(self, sup, every=2.0):
        self.sup, self.every, self.kills = sup, every, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        time.sleep(2.0 + self.every)  # drive() starts its clients 2 s from now
        while not self.done.is_set():
            (lane,) = self.sup.status().get("lanes") or [{}]
            leader = lane.get("leader_pid")
            if leader:
                try:
                    os.kill(leader, signal.SIGKILL)
                    self.kills.append((time.time(), leader))
                except ProcessLookupError:
                    pass
            self.done.wait(self.every)

    def stop(self):
        self.done.set()
        self.thread.join(10)
        return self.kills


def section_lane(check):
    """Python workers on the batch lane ([lane]: one torch pass for every worker's requests):
    LANE_WORKERS="4" at LANE_CONNECTIONS="16,64", every answer checked."""
    rows = []
    # LANE_BASELINE=1: each row also without [lane] (same workers, threads and load): every
    # request thread runs its own batch-1 forward.
    modes = [True, False] if os.environ.get("LANE_BASELINE") == "1" else [True]
    runs = [(int(w), int(c), on) for w in os.environ.get("LANE_WORKERS", "4").split(",")
            for c in os.environ.get("LANE_CONNECTIONS", "16,64").split(",") for on in modes]
    for workers, connections, on in runs:
        settle_gpu()
        lane = f"\n[lane]\nenabled = {str(on).lower()}\nmax_batch = 32\nmax_wait_us = {os.environ.get('LANE_WAIT_US', 200)}\n"
        if os.environ.get("LANE_KILL") == "1":
            lane += "\n[restart]\nmax_restarts = 1000\nwithin_s = 60\n"
        # A sync gunicorn worker has one request in flight, so a pass could carry 4 at most:
        # threads let each worker submit as many as its connections.
        threads = ("--worker-class", "gthread", "--threads", os.environ.get("LANE_THREADS", "16"))
        name = f"{'lane' if on else 'nolane'}-w{workers}-c{connections}"
        sup = Supervisor(name, python_config(name, workers=workers, extra=lane, gunicorn=threads))
        try:
            if sup.ready(timeout=180) is None:
                return check.verdict(False, f"lane: the {workers} Python workers did not start (see {name}.log)")
            warm = post(PORT, "/", {"seed": 1})
            check.verdict(warm[0] == 200 and REFERENCE.matches(1, warm[1].get("result")),
                          f"{name}: the answer for seed 1 matches the float64 reference: {warm[1]}")
            clients = min(connections, int(os.environ.get("LANE_CLIENTS", 8)))  # client processes
            killer = LeaderKiller(sup) if on and os.environ.get("LANE_KILL") == "1" else None
            result = drive(PORT, ARGS.duration, connections, processes=clients)
            kills = killer.stop() if killer else []
            (stats,) = sup.status().get("lanes") or [{}]
            row = dict(lane=on, workers=workers, connections=connections, rps=result["rps"], p50_ms=result["p50_ms"],
                       p99_ms=result["p99_ms"],
                       failed=result["failed"], wrong=result["wrong"], mean_batch=round(stats.get("mean_batch", 0), 2),
                       workers_per_pass=round(stats.get("mean_workers_per_pass", 0), 2),
                       mean_pass_us=round(stats.get("mean_pass_us", 0)))
            if killer:
                # Only the killed processes' own connections may fail (HTTP 500 would be a
                # request failed in the lane; the client sees a killed worker as a broken
                # connection, once per connection at most).
                in_lane = result["http_failed"]
                row.update(leader_kills=len(kills), recoveries=stats.get("recoveries"),
                           requeued=stats.get("requeued"))
                check.verdict(len(kills) >= 2 and not in_lane and result["failed"] <= len(kills) * connections
                              and result["wrong"] == 0,
                              f"{name}: {len(kills)} SIGKILLs of the worker running the passes, "
                              f"{result['failed']} broken connections (at most {len(kills)} x {connections}), "
                              f"{in_lane} failed in the lane, {result['wrong']} wrong")
            rows.append(row)
            check.say(f"{'lane' if on else 'no lane'}, {workers} Python workers, {connections} connections: {row}")
            if result["failures"] or result["wrong_examples"]:
                check.say(f"  failures: {result['failures']}; wrong: {result['wrong_examples']}")
            if not killer:
                check.verdict(result["failed"] == 0 and result["wrong"] == 0 and result["requests"] > 0,
                              f"{name}: {result['requests']} answers, 0 failed, 0 wrong")
        finally:
            sup.stop()
    RESULTS["lane"] = rows
    # docs/bench/python-lane-h200.json's rows, as this run measured them.
    (OUT / "python-lane.json").write_text(json.dumps(rows, indent=1) + "\n")


def profile(load):
    """Where the time goes: the serving processes' CPU (Python, Flask, WSGI, launching kernels)
    against the GPU's utilisation."""
    cpu = list(load["worker_cpu_pct"].values())
    busy = statistics.mean(cpu) if cpu else 0
    gpu = load.get("gpu_util_pct")
    context = RESULTS.get("context", {}).get("forkless", {})
    lines = [f"profile: each serving process is busy {busy:.0f} % of a core (one request at a time, sync worker)"]
    if gpu is not None:
        lines.append(f"GPU utilisation {gpu:.0f} %")
    if context:
        lines.append(f"in one process a request costs {context.get('forward_ms')} ms of forward (GPU + torch) and "
                     f"{context.get('flask_ms')} ms through Flask; at the client p50 {load['p50_ms']} ms")
    if gpu is not None and gpu >= 85:
        verdict = "limit: the GPU (4 processes time-slice it; batching across processes is issue 13)"
    elif busy >= 85:
        verdict = "limit: Python/Flask/WSGI in the serving processes (each at a full core); the GPU waits"
    else:
        verdict = "limit: neither saturated: latency-bound (16 connections over 4 one-at-a-time workers)"
    return "; ".join(lines) + f"\n{verdict}"


def section_coldstart(check):
    """Supervisor start to "all 4 workers ready", weights in the page cache (target <= 4 s)."""
    times = []
    for attempt in range(ARGS.coldstart_runs):
        settle_gpu()
        subprocess.run(["cat", str(MODEL)], stdout=subprocess.DEVNULL, check=False)
        sup = Supervisor(f"coldstart-{attempt}", python_config("coldstart"))
        try:
            ready = sup.ready(timeout=120)
            seen = (ready[0] - sup.started) if ready else None
            logged = field(ready[1], "cold_start_ms") if ready else None
            stages = [line.strip() for _, line in sup.lines
                      if re.search(r"attached generation|app app:app loaded|app: \w+ engine|ready \d|published|"
                                   r"onto GPU", line)]
            check.say(f"run {attempt}: all 4 ready {fmt_s(seen)} after launch (supervisor: {logged} ms)")
            for line in stages[:20]:
                message = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', line)
                check.say(f"    {message.group(1) if message else line[:200]}")
            times.append(seen)
        finally:
            sup.stop()
    ok = [t for t in times if t is not None]
    RESULTS["coldstart_s"] = times
    check.verdict(len(ok) == len(times) and ok and max(ok) <= 4.0,
                  f"cold start, 4 Python workers, launch to all ready: {[round(t, 2) for t in ok]} s (target <= 4 s)")


def section_ownerkill(check):
    """The owner SIGKILLed under load: 0 failed requests; a worker started afterwards attaches."""
    settle_gpu()
    sup = Supervisor("ownerkill", python_config("ownerkill"))
    try:
        if sup.ready(timeout=180) is None:
            return check.verdict(False, "ownerkill: workers did not start")
        (owner,) = sup.pids("owner")
        mark = sup.mark()
        killer = threading.Timer(ARGS.duration / 3, os.kill, args=(owner, signal.SIGKILL))
        killer.start()
        load = drive(PORT, ARGS.duration, ARGS.connections)
        killer.join()
        adopted = sup.wait_for("adopted|re-adopted|is back", timeout=30, start=mark)
        check.say(f"owner {owner} SIGKILLed at {ARGS.duration / 3:.0f} s of {ARGS.duration} s: {load['requests']} "
                  f"answers, {load['failed']} failed, {load['wrong']} wrong; p99 {load['p99_ms']} ms; restarted owner: "
                  f"{'re-adopted the escrow' if adopted else 'no re-adoption logged'}")
        check.verdict(load["failed"] == 0 and load["wrong"] == 0 and load["requests"] > 0 and adopted is not None,
                      "owner SIGKILL under load: 0 failed requests on Python workers, the owner re-adopted")
        # A worker started after the owner's death attaches from the escrow.
        victim = sup.serving_pids()[0]
        mark = sup.mark()
        os.kill(victim, signal.SIGKILL)
        back = sup.wait_for(r"worker \d+ ready", timeout=120, start=mark)
        answers = [post(PORT, "/", {"seed": s})[1] for s in SEEDS[:8]]
        good = all(REFERENCE.matches(s, a.get("result")) for s, a in zip(SEEDS, answers))
        check.verdict(back is not None and good,
                      f"a Python worker started after the owner's death attached and answers correctly "
                      f"({'ready' if back else 'not ready'})")
        RESULTS["ownerkill"] = dict(load=load, replaced=back is not None)
    finally:
        sup.stop()


# The wheels the GPU machine gets (it has torch and numpy, no network): Flask and gunicorn with
# every dependency they have on CPython 3.12 (MarkupSafe is the only one with a C extension).
WHEELS_FOR_GPU = ["flask==3.1.3", "werkzeug==3.1.9", "jinja2==3.1.6", "markupsafe==3.0.3", "itsdangerous==2.2.0",
                  "click==8.5.1", "blinker==1.9.0", "gunicorn==27.0.1"]


def prepare(target, python_version="3.12"):
    """On a machine like CI (cargo, maturin, network): fills `target` (.whl/) for the GPU run."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("forkless-*.whl"):
        old.unlink()
    maturin = shutil.which("maturin") or shutil.which("maturin", path=str(Path(sys.executable).parent))
    command = [maturin] if maturin else [sys.executable, "-m", "maturin"]
    subprocess.run([*command, "build", "--release", "--compatibility", "linux", "--out", str(target)],
                   cwd=ROOT / "python", check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", "-d", str(target), *WHEELS_FOR_GPU], check=True)
    total = 0
    for wheel in sorted(target.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 1024:9.0f} KiB  {wheel.name}")
    print(f"{total / 1024:9.0f} KiB  in {target}")


SECTIONS = {
    "setup": section_setup,
    "context": section_context,
    "readonly": section_readonly,
    "baseline": section_baseline,
    "forkless": section_forkless,
    "lane": section_lane,
    "coldstart": section_coldstart,
    "ownerkill": section_ownerkill,
}


def main():
    global ARGS, BIN, OUT, PYLIB, WHEELS, MODEL, BASELINE_MIB, CONTEXT_MIB, REFERENCE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", default=["all"], help=f"all, or some of {', '.join(SECTIONS)}")
    parser.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--bin", type=Path, default=Path(os.environ.get("FORKLESS_BIN", ROOT / ".gpu-bin")))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/forkless-gpu-python")))
    parser.add_argument("--model-in", type=int, default=None, help="default 10000 (cuda), 2048 (host)")
    parser.add_argument("--model-out", type=int, default=None, help="default 50000 (cuda), 8192 (host)")
    parser.add_argument("--stack", type=int, default=64, help="[cuda] stack_limit_bytes")
    parser.add_argument("--cublas-env", default="", help="CUBLAS_WORKSPACE_CONFIG for workers and baseline")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn options for the forkless workers")
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--coldstart-runs", type=int, default=2)
    parser.add_argument("--prepare", action="store_true",
                        help="on the build machine: build the forkless wheel and download the others into --wheels")
    ARGS = parser.parse_args()
    if ARGS.prepare:
        prepare(ARGS.wheels.resolve())
        return 0
    if ARGS.model_in is None:
        ARGS.model_in = 10000 if ARGS.backend == "cuda" else 2048
    if ARGS.model_out is None:
        ARGS.model_out = 50000 if ARGS.backend == "cuda" else 8192
    BIN, OUT = ARGS.bin.resolve(), ARGS.out.resolve()
    WHEELS = ARGS.wheels.resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "configs").mkdir(exist_ok=True)
    (OUT / "run").mkdir(exist_ok=True)
    PYLIB = OUT / "pylib"
    MODEL = ROOT / "examples" / "linear" / (
        "weights-seed.safetensors" if (ARGS.model_in, ARGS.model_out) == (10000, 50000)
        else f"weights-{ARGS.model_in}x{ARGS.model_out}.safetensors")
    CONTEXT_MIB, REFERENCE = None, None
    check = Check(OUT)
    names = list(SECTIONS) if ARGS.sections == ["all"] else ["setup", *[s for s in ARGS.sections if s != "setup"]]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}: pick from {', '.join(SECTIONS)}")
    check.say(f"== forkless Python workers check {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(names)} "
              f"(backend {ARGS.backend}, model {ARGS.model_out}x{ARGS.model_in}, python {sys.version.split()[0]})")
    if ARGS.backend == "cuda":
        check.say(sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader",
                     "-i", ARGS.device).stdout.strip())
    BASELINE_MIB = gpu_used_mib()
    started = time.time()
    for name in names:
        check.say(f"\n== {name}: {SECTIONS[name].__doc__.strip()}")
        t0 = time.time()
        try:
            SECTIONS[name](check)
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            import traceback

            check.verdict(False, f"{name} raised {e!r}")
            check.say(traceback.format_exc()[-3000:])
            if name == "setup":
                break
        check.say(f"({name}: {time.time() - t0:.0f} s)")
    RESULTS["failed"] = check.failed
    RESULTS["seconds"] = round(time.time() - started)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    check.say(f"\n== {'ALL PASS' if check.failed == 0 else f'{check.failed} FAILED'} in {RESULTS['seconds']} s; "
              f"results in {OUT}")
    return 0 if check.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
