"""Test support: the real `supervisor` and `linear-worker` (from target/debug, built by
`cargo build` / `cargo test --workspace` at the root; FORKLESS_BIN overrides), deterministic
weights, supervisors whose JSON log lines a test can wait on, a keep-alive HTTP client, and an
independent reference for every answer (SplitMix64 in plain Python integers, float64 numpy).
"""

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "python-flask"
APPS = Path(__file__).resolve().parent / "apps"
IN, OUT = 256, 1024
#: Failure guard for waits: generous, since tests assert behaviour, not speed.
PATIENCE = 90.0


def binaries():
    return Path(os.environ.get("FORKLESS_BIN", ROOT / "target" / "debug"))


@pytest.fixture(scope="session")
def bins():
    folder = binaries()
    for name in ("supervisor", "linear-worker"):
        if not (folder / name).exists():
            pytest.fail(f"{folder / name} not found: run `cargo build` at the repository root first "
                        f"(or set FORKLESS_BIN)")
    return folder


def make_weights(bins, path, seed, inputs=IN, outputs=OUT):
    subprocess.run([str(bins / "linear-worker"), "make-weights", "--in", str(inputs), "--out", str(outputs),
                    "--seed", str(seed), str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def weights(bins, tmp_path_factory):
    """{seed: path} of the test model (W [1024, 256], b [1024]) made with seeds 42 and 43."""
    folder = tmp_path_factory.mktemp("weights")
    return {seed: make_weights(bins, folder / f"w{seed}.safetensors", seed) for seed in (42, 43)}


# ---------------------------------------------------------------------------------------------
# The independent reference


def splitmix_inputs(seed, n):
    """The demo's input generator (README "Generator") in plain Python integers."""
    mask = (1 << 64) - 1
    out, state = [], seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> 40) / float(1 << 23) - 1.0)
    return out


def read_safetensors(path):
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    base = 8 + size
    return {name: np.frombuffer(raw, dtype="<f4", count=(meta["data_offsets"][1] - meta["data_offsets"][0]) // 4,
                                offset=base + meta["data_offsets"][0]).reshape(meta["shape"])
            for name, meta in header.items() if name != "__metadata__"}


class Reference:
    """Σ y (float64) for each seed, computed from the weights file in float64."""

    def __init__(self, path):
        tensors = read_safetensors(path)
        self.w = tensors["weight"].astype(np.float64)
        self.b = tensors["bias"].astype(np.float64)
        self.cache = {}

    def y(self, seed):
        if seed not in self.cache:
            x = np.array(splitmix_inputs(seed, self.w.shape[1]), dtype=np.float64)
            self.cache[seed] = self.w @ x + self.b
        return self.cache[seed]

    def y_sum(self, seed):
        return float(self.y(seed).sum())


def close(got, want, rel=1e-5):
    """Within `rel` of the answer's scale: float32 arithmetic against a float64 reference."""
    return abs(got - want) <= rel * max(1.0, abs(want))


# ---------------------------------------------------------------------------------------------
# Supervisors


def python_config(folder, model, workers=4, app="app:app", app_dir=EXAMPLE, extra_workers="", extra="",
                  gunicorn=()):
    """A config running `app` under `python -m forkless.gunicorn` with this Python."""
    command = [sys.executable, "-m", "forkless.gunicorn", "--chdir", str(app_dir), "--log-level", "warning",
               *gunicorn, app]
    return write_config(folder, model, command, workers, extra_workers, extra)


def rust_config(folder, model, bins, workers=2):
    return write_config(folder, model, [str(bins / "linear-worker")], workers, name="rust.toml")


_runtime_parent = None


def runtime_parent():
    """A short private folder for the supervisors' runtime folders (`forkless-<hash>/`, which
    hold the control and bus sockets): a socket path must fit in 107 bytes, which pytest's
    tmp_path does not leave room for. Removed when the tests end."""
    global _runtime_parent
    if _runtime_parent is None:
        _runtime_parent = Path(tempfile.mkdtemp(prefix="fl-"))
        atexit.register(shutil.rmtree, _runtime_parent, ignore_errors=True)
    return _runtime_parent


def write_config(folder, model, command, workers, extra_workers="", extra="", name="config.toml"):
    folder.mkdir(parents=True, exist_ok=True)
    runtime = runtime_parent()
    path = folder / name
    path.write_text(f"""[model]
path = {json.dumps(str(model))}

[workers]
command = {json.dumps([str(c) for c in command])}
count = {workers}
listen = ["127.0.0.1:0"]
start_timeout_s = 60
# heartbeats (which carry request counts) every 2 s
timeout_s = 8
{extra_workers}

[supervisor]
runtime_dir = {json.dumps(str(runtime))}
graceful_timeout_s = 10

[restart]
backoff_initial_ms = 50
{extra}""")
    return path


class Supervisor:
    """`supervisor run CONFIG --log-format json`, with its log lines kept for waiting on."""

    def __init__(self, bins, config):
        self.bins, self.config = bins, config
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([str(bins / "supervisor"), "run", "--log-format", "json", str(config)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.addr = None

    def _read(self):
        for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"message": raw.rstrip()}
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def log_text(self):
        with self.cond:
            return "\n".join(json.dumps(line) for line in self.lines[-200:])

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait_for(self, pattern, start=0, timeout=PATIENCE, count=1):
        """The `count`-th log line from index `start` whose message matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        seen, found = start, 0
        with self.cond:
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if regex.search(str(line.get("message", ""))):
                        found += 1
                        if found == count:
                            return line
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError(f"no log line {pattern!r} in time; log:\n{self.log_text()}")
                if self.proc.poll() is not None and not self.reader.is_alive() and seen >= len(self.lines):
                    raise AssertionError(f"supervisor exited ({self.proc.returncode}) before logging {pattern!r}; "
                                         f"log:\n{self.log_text()}")
                self.cond.wait(min(left, 0.2))

    def wait_ready(self):
        listening = self.wait_for("listening on")
        self.addr = listening["addrs"].split(",")[0]
        self.wait_for("workers ready")
        return self.addr

    def control(self, *args):
        return subprocess.run([str(self.bins / "supervisor"), *args, "-c", str(self.config)], capture_output=True,
                              text=True, timeout=PATIENCE)

    def status(self):
        run = self.control("status", "--json")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def pids(self, role):
        return [p["pid"] for p in self.status()["processes"] if p["role"] == role and p.get("pid")]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def supervisors(bins):
    """Starts supervisors for a test and stops (or kills) every one of them afterwards."""
    started = []

    def start(config):
        sup = Supervisor(bins, config)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGTERM)
            try:
                sup.proc.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()


# ---------------------------------------------------------------------------------------------
# HTTP


def post(addr, path, body, conn=None, timeout=30):
    """POST `body` as JSON (bytes: as they are); returns (status, parsed body). Reuses `conn`
    (keep-alive) when given."""
    host, port = addr.rsplit(":", 1)
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body)
        conn.request("POST", path, data, {"content-type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, (json.loads(data) if data else None)
    finally:
        if own:
            conn.close()


def get(addr, path, timeout=30):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


class Load:
    """`threads` clients posting {"seed": n} to `path` until stopped; every answer kept."""

    def __init__(self, addr, seeds, threads=8, path="/"):
        self.addr, self.seeds, self.path = addr, list(seeds), path
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answers = []  # (seed, answer dict)
        self.failures = []  # (seed, repr)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, index):
        host, port = self.addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        k = index
        while not self.stop_event.is_set():
            seed = self.seeds[k % len(self.seeds)]
            k += 1
            try:
                status, answer = post(self.addr, self.path, {"seed": seed}, conn=conn)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {answer}")
                with self.lock:
                    self.answers.append((seed, answer))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with self.lock:
                    self.failures.append((seed, repr(e)))
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def count(self):
        with self.lock:
            return len(self.answers)

    def wait_answers(self, n, timeout=PATIENCE):
        deadline = time.time() + timeout
        while self.count() < n:
            assert time.time() < deadline, f"only {self.count()} answers; failures {self.failures[:5]}"
            time.sleep(0.02)

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(PATIENCE)
        return self.answers, self.failures


def children_of(pid):
    """Direct children of `pid` (from /proc/PID/task/*/children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(out)


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(") ", 1)[1].startswith("Z")


def eventually(what, cond, timeout=PATIENCE):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)
