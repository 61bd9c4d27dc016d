#!/usr/bin/env python3
"""The GPU check of forkless: run on a machine with an NVIDIA GPU, from the repository root,
with release binaries built elsewhere (the GPU machine needs no Rust toolchain):

    cargo build --release --bins && mkdir -p .gpu-bin && \
      cp target/release/{supervisor,linear-worker,chaos,gpu-probe} .gpu-bin/ && strip .gpu-bin/*
    python3 scripts/gpu_check.py all            # or a list of sections, see SECTIONS

Every section prints what it measured and PASS/FAIL lines against the targets of issue #3
(and the GPU halves of #5 and #6; `gemm`, `lane`, `lanesweep`, `lanekill`: issue #13;
`multigpu`: issue #14); the results also go to $OUT (default /tmp/forkless-gpu)
as gpu-check.txt plus JSON reports, logs and the chaos HTML page. Only the standard library,
nvidia-smi and the forkless binaries are used (numpy, if present, for the hot-swap reference).
"""

import argparse
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SEED_MODEL = dict(inputs=10000, outputs=50000, seed=42)
SMALL_MODEL = dict(inputs=2048, outputs=8192, seed=42)
PORT = 18080


class Check:
    def __init__(self, out):
        self.out = out
        self.failed = 0
        self.log = open(out / "gpu-check.txt", "a")

    def say(self, text=""):
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def verdict(self, ok, text):
        self.failed += 0 if ok else 1
        self.say(f"{'PASS' if ok else 'FAIL'} {text}")


def sh(*cmd, timeout=600, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=check, **kw)


def gpu_used_mib():
    out = sh("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits").stdout
    return int(out.split()[0])


def gpu_apps_mib():
    """{pid: MiB} of every process NVML attributes GPU memory to."""
    out = sh("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits").stdout
    apps = {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            apps[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else 0
    return apps


def settle_gpu(baseline, patience=20):
    """Waits until GPU memory is back near `baseline` (processes of a previous run gone)."""
    deadline = time.time() + patience
    while time.time() < deadline and gpu_used_mib() > baseline + 8:
        time.sleep(0.2)
    return gpu_used_mib()


# What the shipped examples/linear/config-gpu.toml uses; --stack / --workspace-kib override.
TUNING = dict(stack=64, workspace_kib=None, env={"CUBLAS_WORKSPACE_CONFIG": ":1024:1"})


def tuning_args(workspace_kib):
    return ("--cublas-workspace-kib", workspace_kib) if workspace_kib is not None else ()


def write_config(path, model, workers, sharing="shared", backend="cuda", stack=None, worker_args=(), extra="",
                 workspace_kib="tuned", env="tuned", cuda_extra=""):
    """A config for this machine; `workspace_kib` None means cuBLAS's default workspace; `extra`
    is TOML after the last table, `cuda_extra` lines inside `[cuda]`."""
    stack = TUNING["stack"] if stack is None else stack
    env = TUNING["env"] if env == "tuned" else env
    workspace_kib = TUNING["workspace_kib"] if workspace_kib == "tuned" else workspace_kib
    worker_args = (*worker_args, *tuning_args(workspace_kib))
    args = ", ".join(json.dumps(str(a)) for a in ["serve", *worker_args])
    path.write_text(
        f"""[model]
path = {json.dumps(str(model))}
sharing = "{sharing}"
backend = "{backend}"

[cuda]
device = 0
stack_limit_bytes = {stack}
{cuda_extra}

[workers]
command = [{json.dumps(str(BIN / "linear-worker"))}, {args}]
count = {workers}
listen = ["127.0.0.1:{PORT}"]
env = {{ {", ".join(f'{k} = {json.dumps(v)}' for k, v in (env or {}).items())} }}

[supervisor]
graceful_timeout_s = 10
{extra}"""
    )
    return path


def supervisor_status(config):
    """`supervisor status --json` of the service running `config` (None if none answers)."""
    out = sh(BIN / "supervisor", "status", "--json", "-c", config, check=False, timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


class Supervisor:
    """`supervisor run CONFIG --log-format json`, its log kept in memory and on disk."""

    def __init__(self, config, log_path):
        self.config = config
        self.lines = []
        self.log = open(log_path, "w")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [str(BIN / "supervisor"), "run", "--log-format", "json", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()

    def wait_for(self, pattern, timeout=180, start=0):
        """The first log line (from index `start`) matching `pattern`; None on timeout/exit."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        seen = start
        while time.time() < deadline:
            while seen < len(self.lines):
                if regex.search(self.lines[seen]):
                    return self.lines[seen]
                seen += 1
            if self.proc.poll() is not None and seen >= len(self.lines):
                return None
            time.sleep(0.01)
        return None

    def status(self):
        return supervisor_status(self.config)

    def control(self, *args):
        return sh(BIN / "supervisor", *args, "-c", self.config, check=False, timeout=60)

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def field(line, name):
    """A number logged as `"name": 1.5` (supervisor JSON) or `name=\\"1.5\\"` (a child's line)."""
    match = re.search(rf'{name}(?:"\s*:|=)\s*(?:\\?")?([0-9.]+)', line or "")
    return float(match.group(1)) if match else None


def ensure_weights(check, name, shape):
    path = ROOT / "examples" / "linear" / name
    if not path.exists():
        started = time.time()
        sh(BIN / "linear-worker", "make-weights", "--in", shape["inputs"], "--out", shape["outputs"],
           "--seed", shape["seed"], path)
        check.say(f"wrote {path.name} ({path.stat().st_size / MIB:.0f} MiB) in {time.time() - started:.1f} s")
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL)  # into the page cache
    return path


def infer(seed, timeout=30):
    body = json.dumps({"seed": seed}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}/infer", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def healthz():
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=10) as reply:
        return json.loads(reply.read())


# ---------------------------------------------------------------------------------------------
# Sections


def section_probe(check):
    """gpu-probe: VMM export/import, read-only refusal, fd-holder survival, context sizes, kernels."""
    for role in ([], ["kernels"]):
        run = sh(BIN / "gpu-probe", *role, check=False, timeout=300)
        check.say(run.stdout.strip())
        if run.stderr.strip():
            check.say(run.stderr.strip()[-2000:])
        check.verdict(run.returncode == 0, f"gpu-probe {' '.join(role) or 'check'}")


def section_correctness(check):
    """The same seeds through the host backend and the cuda backend: answers must agree."""
    model = ensure_weights(check, "weights.safetensors", SMALL_MODEL)
    answers = {}
    for backend in ("host", "cuda"):
        config = write_config(WORK / f"correct-{backend}.toml", model, 2, backend=backend)
        sup = Supervisor(config, OUT / f"correct-{backend}.log")
        ready = sup.wait_for("workers ready")
        answers[backend] = [infer(seed) for seed in range(16)] if ready else None
        if backend == "cuda" and ready:
            answers["health"] = healthz()
        sup.stop()
        check.verdict(ready is not None, f"{backend} backend started (small model)")
    if answers.get("host") and answers.get("cuda"):
        worst_sum = max(abs(h["y_sum"] - c["y_sum"]) / max(1.0, abs(h["y_sum"]))
                        for h, c in zip(answers["host"], answers["cuda"]))
        worst_head = max(abs(a - b) for h, c in zip(answers["host"], answers["cuda"])
                         for a, b in zip(h["y_head"], c["y_head"]))
        check.say(f"cuda health: {json.dumps(answers.get('health'))}")
        check.verdict(worst_sum < 1e-4 and worst_head < 1e-4,
                      f"cuda answers match host answers on 16 seeds: worst y_sum rel diff {worst_sum:.2e}, "
                      f"worst y_head abs diff {worst_head:.2e}")


def one_vram_run(check, model, workers, sharing):
    settle_gpu(BASELINE)
    before = gpu_used_mib()
    config = write_config(WORK / f"vram-{sharing}-{workers}.toml", model, workers, sharing=sharing)
    sup = Supervisor(config, OUT / f"vram-{sharing}-{workers}.log")
    ready = sup.wait_for("workers ready", timeout=300)
    time.sleep(1.0)
    used = gpu_used_mib() - before
    apps = gpu_apps_mib()
    status = sup.status() or {}
    sup.stop()
    roles = {p.get("pid"): p.get("role") for p in status.get("processes", [])}
    worker_mib = [mib for pid, mib in apps.items() if roles.get(pid) == "worker"]
    owner_mib = sum(mib for pid, mib in apps.items() if roles.get(pid) == "owner")
    # The supervisor's own account (NVML through nvml-wrapper): per process, and what no process
    # holds, which is where the escrowed arena shows.
    status_workers = sum(p.get("gpu_bytes") or 0 for p in status.get("processes", []) if p["role"] == "worker") >> 20
    unattributed = (status.get("gpu_unattributed_bytes") or 0) >> 20
    return dict(ready=ready is not None, total=used, workers=worker_mib, owner=owner_mib,
                cold_start_ms=field(ready, "cold_start_ms"), status_workers=status_workers,
                unattributed=unattributed, escrow=(status.get("escrow_bytes") or 0) >> 20)


def section_vram(check):
    """GPU memory with N = 1, 2, 4, 8 workers, shared against sharing = none, on the seed's model."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    model_mib = -(-model.stat().st_size // (2 * MIB)) * 2  # the arena, in 2 MiB granules
    check.say(f"model file {model.stat().st_size / MIB:.0f} MiB (arena ~{model_mib} MiB); baseline used {BASELINE} MiB")
    check.say("| workers | shared: total MiB | per worker MiB | owner MiB | bound MiB | none: total MiB | per worker MiB |")
    check.say("|---|---|---|---|---|---|---|")
    rows = []
    for n in (1, 2, 4, 8):
        shared = one_vram_run(check, model, n, "shared")
        none = one_vram_run(check, model, n, "none")
        context = max(shared["workers"], default=0)
        bound = (model_mib + (n + 1) * context) * 1.02
        rows.append((n, shared, none, context, bound))
        check.say(f"| {n} | {shared['total']} | {'/'.join(map(str, shared['workers']))} | {shared['owner']} | "
                  f"{bound:.0f} | {none['total']} | {'/'.join(map(str, none['workers']))} |")
    check.say("\nThe supervisor's own account (`supervisor status --json`, NVML), shared mode:")
    check.say("| workers | workers' GPU MiB | unattributed MiB (no process: the escrow) | escrow MiB (manifest) |")
    check.say("|---|---|---|---|")
    for n, shared, _, _, _ in rows:
        check.say(f"| {n} | {shared['status_workers']} | {shared['unattributed']} | {shared['escrow']} |")
    for n, shared, none, context, bound in rows:
        check.verdict(shared["ready"] and none["ready"], f"N={n}: both modes served")
        check.verdict(abs(shared["unattributed"] - shared["escrow"]) <= 64,
                      f"N={n}: status shows the escrowed arena as unattributed GPU memory "
                      f"({shared['unattributed']} vs {shared['escrow']} MiB)")
        check.verdict(shared["total"] <= bound, f"N={n}: shared total {shared['total']} MiB <= model + (N+1) x "
                      f"{context} MiB + 2 % = {bound:.0f} MiB")
        check.verdict(0 < context <= 330, f"N={n}: worker context {context} MiB <= 330 MiB")
    (OUT / "vram.json").write_text(json.dumps(rows, indent=1, default=str))


def section_contexts(check):
    """A worker's GPU memory by stack limit and cuBLAS workspace (2 workers on the seed's model)."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    check.say("| stack B | cuBLAS workspace | worker MiB (NVML) | context only MiB | + kernels, cuBLAS MiB |")
    check.say("|---|---|---|---|---|")
    small = {"CUBLAS_WORKSPACE_CONFIG": ":1024:1"}
    for stack, workspace, env in ((1024, None, None), (256, None, None), (64, None, None), (64, 1024, None),
                                  (64, None, small), (64, 1024, small), (32, None, small)):
        settle_gpu(BASELINE)
        config = write_config(WORK / "ctx.toml", model, 2, stack=stack, workspace_kib=workspace, env=env)
        sup = Supervisor(config, OUT / f"ctx-{stack}-{workspace}.log")
        ready = sup.wait_for("workers ready", timeout=120)
        time.sleep(0.5)
        status = sup.status() or {}
        apps = gpu_apps_mib()
        engine = sup.wait_for("GPU engine prepared", timeout=1)
        answer = infer(3) if ready else None
        sup.stop()
        workers = [apps.get(p["pid"]) for p in status.get("processes", []) if p["role"] == "worker"]
        check.say(f"| {stack} | {f'{workspace} KiB' if workspace else 'default'}{' + ' + str(env) if env else ''} | {workers} | "
                  f"{field(engine, 'context_mib')} | {field(engine, 'with_cublas_mib')} |")
        check.verdict(ready is not None and answer is not None, f"stack {stack} B, workspace {workspace}: served")


def section_coldstart(check):
    """4 workers, weights in the page cache: supervisor start to all ready (target <= 1.5 s)."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    times = []
    for attempt in range(3):
        settle_gpu(BASELINE)
        config = write_config(WORK / "cold.toml", model, 4)
        sup = Supervisor(config, OUT / f"cold-{attempt}.log")
        ready = sup.wait_for("workers ready", timeout=120)
        seen_ms = (time.time() - sup.started) * 1e3
        owner = sup.wait_for("onto GPU", timeout=1)
        engine = sup.wait_for("GPU engine prepared", timeout=1)
        warm = sup.wait_for("warmed up", timeout=1)
        sup.stop()
        times.append(round(seen_ms) if ready else None)
        check.say(f"run {attempt}: all 4 ready {field(ready, 'cold_start_ms')} ms after the supervisor's start, "
                  f"{seen_ms:.0f} ms after this script launched it; owner: context {field(owner, 'context_ms')} ms, "
                  f"copy {field(owner, 'copy_ms')} ms = {field(owner, 'copy_gb_per_s')} GB/s over "
                  f"{field(owner, 'lanes')} lanes (pinning {field(owner, 'pinning_ms')} ms), checksum "
                  f"{field(owner, 'checksum_ms')} ms; a worker: engine prepared in {field(engine, 'prepare_ms')} ms "
                  f"(context {field(engine, 'context_mib')} MiB, +cuBLAS {field(engine, 'with_cublas_mib')} MiB), "
                  f"warmed up at {field(warm, 'gpu_mib')} MiB")
    ok = [t for t in times if t is not None]
    check.verdict(len(ok) == 3 and max(ok) <= 1500, f"cold start, 4 workers, launch to all ready: {ok} ms (target <= 1500)")


def chaos(check, name, config, duration, kill="none", connections=16, extra=()):
    report = OUT / f"{name}.json"
    log = OUT / f"{name}.log"
    run = sh(BIN / "chaos", "run", "--config", config, "--duration", duration, "--connections", connections,
             "--kill", kill, "--json", report, "--supervisor-log", log, *extra, check=False, timeout=580)
    check.say(run.stdout.strip())
    if run.returncode != 0:
        check.say(run.stderr.strip()[-3000:])
    data = json.loads(report.read_text()) if report.exists() else {}
    return run.returncode, data, log


def batch_sizes(log):
    """Batch-size histogram over all workers, from their drain lines."""
    sizes = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        if "drained; exiting" not in line:
            continue
        match = re.search(r'"sizes":\s*(\{[^}]*\})', line.replace('\\"', '"'))
        for size, n in json.loads(match.group(1)).items() if match else []:
            sizes[int(size)] = sizes.get(int(size), 0) + n
    return dict(sorted(sizes.items()))


def section_throughput(check):
    """16 keep-alive connections, 4 workers, {"seed": n}: >= 3000 req/s with p99 <= 17 ms."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    check.say("| batching | req/s | p50 ms | p99 ms | max ms | failed | wrong | mean batch | batch sizes |")
    check.say("|---|---|---|---|---|---|---|---|---|")
    results = {}
    variants = (("max_batch 32, max_wait 500 us", ("--max-wait-us", 500), "tuned"),
                ("max_batch 32, max_wait 0", ("--max-wait-us", 0), "tuned"),
                ("max_batch 32, max_wait 1000 us", ("--max-wait-us", 1000), "tuned"),
                ("max_batch 32, max_wait 500 us, cuBLAS default workspace", ("--max-wait-us", 500), None),
                ("max_batch 1 (unbatched)", ("--max-batch", 1), "tuned"))
    for label, args, workspace in variants:
        settle_gpu(BASELINE)
        config = write_config(WORK / "bench.toml", model, 4, worker_args=args, workspace_kib=workspace)
        name = "throughput-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        rc, data, log = chaos(check, name, config, 15)
        sizes = batch_sizes(log)
        passes = sum(sizes.values())
        mean = sum(k * v for k, v in sizes.items()) / passes if passes else 0
        lat = data.get("latency_ms", {})
        results[label] = (rc, data, mean)
        check.say(f"| {label} | {data.get('throughput_rps', 0):.0f} | {lat.get('p50')} | {lat.get('p99')} | "
                  f"{lat.get('max')} | {data.get('failed')} | {data.get('wrong_answers')} | {mean:.2f} | {sizes} |")
    rc, data, _ = results["max_batch 32, max_wait 500 us"]
    lat = data.get("latency_ms", {})
    check.verdict(rc == 0 and data.get("failed") == 0 and data.get("wrong_answers") == 0,
                  "throughput run: every answer checked against the f64 reference, none failed or wrong")
    check.verdict(data.get("throughput_rps", 0) >= 3000 and lat.get("p99", 99) <= 17,
                  f"{data.get('throughput_rps', 0):.0f} req/s >= 3000 with p99 {lat.get('p99')} ms <= 17")


def sample_gpu(stop, samples):
    while not stop.is_set():
        samples.append((time.time(), gpu_used_mib()))
        time.sleep(0.25)


def section_ownerkill(check):
    """kill -9 of the owner every ~1 s for 100 s under load: no failure, owner back < 1 s, no leak."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    settle_gpu(BASELINE)
    # 100 kills in 100 s are far past the restart intensity a real deployment wants (10 in 60 s
    # makes the supervisor give up): this run asks for it on purpose.
    # The restart backoff is off so that what is timed is the owner's own recovery (a context,
    # an import, a checksum), not the policy's wait between two restarts close together.
    config = write_config(WORK / "ownerkill.toml", model, 4,
                          extra="\n[restart]\nmax_restarts = 1000\nwithin_s = 60\nbackoff_initial_ms = 0\n")
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)
    sampler.start()
    rc, data, log = chaos(check, "owner-kills", config, 100, kill="owner@1")
    stop.set()
    sampler.join()
    kills = [k for k in data.get("kills", []) if k["role"] == "owner"]
    recovered = sorted(k["recovered_s"] for k in kills if k.get("recovered_s") is not None)
    peak = max((m for _, m in samples), default=0) - BASELINE
    check.say(f"{len(kills)} owner kills; recovered {len(recovered)}; time to re-adopted: median "
              f"{statistics.median(recovered) * 1e3 if recovered else float('nan'):.0f} ms, max "
              f"{recovered[-1] * 1e3 if recovered else float('nan'):.0f} ms; GPU used peak {peak} MiB over baseline; "
              f"leaks {data.get('leaks')}")
    check.verdict(rc == 0 and data.get("failed") == 0 and data.get("wrong_answers") == 0,
                  f"owner kills under load: {data.get('requests')} requests, 0 failed, 0 wrong")
    check.verdict(len(kills) >= 90 and len(recovered) == len(kills) and recovered and recovered[-1] < 1.0,
                  "every owner re-adopted the escrow in < 1 s (CUDA context included)")


def section_worker_after_owner(check):
    """Weights file moved away, owner SIGKILLed and held down, a worker killed: it comes back attached."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    settle_gpu(BASELINE)
    config = write_config(WORK / "survive.toml", model, 2)
    sup = Supervisor(config, OUT / "survive.log")
    ok = sup.wait_for("workers ready") is not None
    moved = model.with_suffix(".moved")
    model.rename(moved)
    try:
        before = [infer(s)["y_sum"] for s in range(4)]
        status = sup.status()
        owner = next(p for p in status["processes"] if p["role"] == "owner")
        worker = next(p for p in status["processes"] if p["role"] == "worker")
        os.kill(owner["pid"], signal.SIGKILL)
        mark = len(sup.lines)
        os.kill(worker["pid"], signal.SIGKILL)
        back = sup.wait_for(r"worker \d+ ready", timeout=60, start=mark)
        adopted = sup.wait_for("adopted", timeout=60, start=mark)
        time.sleep(0.5)
        after = [infer(s)["y_sum"] for s in range(4)]
        check.verdict(ok and back is not None and adopted is not None and before == after,
                      "weights file gone, owner and a worker SIGKILLed: worker re-attached, owner re-adopted, "
                      "answers identical")
    finally:
        moved.rename(model)
        sup.stop()


def splitmix_inputs(seed, n):
    """The demo's input generator (examples/linear/seeded.rs) in Python."""
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


def reference_sums(path, seeds):
    """y_sum per seed, in f64, read straight from the safetensors file (numpy)."""
    import numpy as np

    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len

    def tensor(name):
        start, end = header[name]["data_offsets"]
        return np.frombuffer(raw, dtype="<f4", count=(end - start) // 4, offset=base + start).reshape(header[name]["shape"])

    w, b = tensor("weight"), tensor("bias")
    x = np.array([splitmix_inputs(s, w.shape[1]) for s in seeds], dtype=np.float64)
    col = w.astype(np.float64).sum(axis=0)  # Σ_o W[o][i]: y_sum = Σ_i col[i] x[i] + Σ b
    return {s: float(col @ x[k] + b.astype(np.float64).sum()) for k, s in enumerate(seeds)}


def section_hotswap(check):
    """reload-model under load: answers switch generation, none fails or mixes; VRAM back to one copy."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    other = ensure_weights(check, "weights-seed-43.safetensors", dict(SEED_MODEL, seed=43))
    seeds = list(range(8))
    refs = {1: reference_sums(model, seeds), 2: reference_sums(other, seeds)}
    settle_gpu(BASELINE)
    config = write_config(WORK / "swap.toml", model, 4)
    sup = Supervisor(config, OUT / "swap.log")
    sup.wait_for("workers ready")
    one_copy = gpu_used_mib() - BASELINE
    stop, samples, results, lock = threading.Event(), [], [], threading.Lock()
    sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)

    def load(index):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        k = index
        while not stop.is_set():
            seed = seeds[k % len(seeds)]
            k += 1
            try:
                conn.request("POST", "/infer", json.dumps({"seed": seed}), {"content-type": "application/json"})
                answer = json.loads(conn.getresponse().read())
                outcome = (seed, answer["generation"], answer["y_sum"])
            except Exception as e:  # noqa: BLE001 - every failure is counted
                outcome = (seed, None, repr(e))
                conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
    sampler.start()
    for t in threads:
        t.start()
    time.sleep(3)
    swap = sup.control("reload-model", other)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    sampler.join()
    time.sleep(2)
    after = gpu_used_mib() - BASELINE
    sup.stop()
    failed = [r for r in results if r[1] is None]
    wrong = [r for r in results if r[1] is not None and abs(r[2] - refs.get(r[1], {}).get(r[0], float("inf")))
             > 1e-4 * max(1.0, abs(r[2]))]
    generations = sorted({r[1] for r in results if r[1] is not None})
    peak = max((m for _, m in samples), default=0) - BASELINE
    check.say(f"reload-model: {swap.stdout.strip() or swap.stderr.strip()}")
    loaded = [line for line in sup.lines if "onto GPU" in line]
    if len(loaded) > 1:  # the second generation, loaded while the workers serve the first
        check.say(f"owner loaded generation 2: copy {field(loaded[-1], 'copy_ms')} ms = "
                  f"{field(loaded[-1], 'copy_gb_per_s')} GB/s over {field(loaded[-1], 'lanes')} lanes "
                  f"(pinning {field(loaded[-1], 'pinning_ms')} ms), checksum {field(loaded[-1], 'checksum_ms')} ms")
    check.say(f"{len(results)} requests, generations seen {generations}, {len(failed)} failed, {len(wrong)} wrong "
              f"or mixed; GPU used over baseline: {one_copy} MiB before, {peak} MiB peak, {after} MiB after")
    check.verdict(not failed and not wrong and generations == [1, 2],
                  "hot swap under load: old then new answers, no failure, no mixed answer")
    check.verdict(after <= one_copy + 64, f"GPU memory back to one copy after the swap ({after} vs {one_copy} MiB)")


def section_soak(check):
    """The chaos run on the GPU: owner every 5 s, a worker every 3 s, 120 s, HTML report."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    settle_gpu(BASELINE)
    # As in config-chaos.toml: an owner killed every 5 s is past the intensity that should
    # make a real deployment give up (10 restarts in 60 s).
    config = write_config(WORK / "soak.toml", model, 4, extra="\n[restart]\nmax_restarts = 1000\nwithin_s = 60\n")
    rc, data, _ = chaos(check, "chaos-gpu", config, 120, kill="owner@5,worker@3",
                        extra=("--html", OUT / "chaos-gpu.html"))
    check.verdict(rc == 0, f"GPU chaos run: {data.get('requests')} requests, {data.get('failed')} failed, "
                  f"{data.get('wrong_answers')} wrong, {len(data.get('kills', []))} kills, leaks {data.get('leaks')}")


# ---------------------------------------------------------------------------------------------
# The batch lane (issue #13) and every GPU of the node (issue #14)

def linger_us():
    # LINGER_US=1000: passes wait for their closed-loop clients to come back (docs/LANE.md).
    return int(os.environ.get("LINGER_US", 0))


def lane_toml(max_batch=32, max_wait_us=100, linger_us=0):
    # max_batch 32: on an H200, cuBLAS's fp32 pass of the seed's layer costs the same from batch
    # 8 to 32 and half again from 48 on (the gemm section); 100 us of waiting fills passes at
    # 16 connections without holding back 64 (the lanesweep section). linger_us: docs/LANE.md,
    # "Cohorts".
    return (f"\n[lane]\nenabled = true\nmax_batch = {max_batch}\nmax_wait_us = {max_wait_us}\n"
            f"linger_us = {linger_us}\n")


def lane_row(data, workers, connections):
    lat = data.get("latency_ms", {})
    lanes = data.get("lanes", [])
    passes = sum(lane.get("passes", 0) for lane in lanes)
    served = sum(lane.get("served", 0) for lane in lanes)
    return {"workers": workers, "connections": connections, "rps": round(data.get("throughput_rps", 0)),
            "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
            "mean_batch": round(served / passes, 2) if passes else None,
            "workers_per_pass": round(statistics.mean(l.get("mean_workers_per_pass", 0) for l in lanes), 2)
            if lanes else None,
            "failed": data.get("failed"), "wrong": data.get("wrong_answers")}


def section_lane(check):
    """The batch lane: 1, 2, 4, 8 workers at 16 and 64 connections, every answer checked (issue #13).
    LINGER_US sets [lane] linger_us; LANE_BASELINE=0 skips the runs without the lane."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    duration = int(os.environ.get("LANE_SECONDS", 10))
    rows, before = [], []
    check.say("| workers | connections | lane req/s | p50 ms | p99 ms | mean batch | workers per pass | "
              "without lane req/s | p99 ms |")
    check.say("|---|---|---|---|---|---|---|---|---|")
    for workers in (1, 2, 4, 8):
        for connections in (16, 64):
            settle_gpu(BASELINE)
            config = write_config(WORK / "lane.toml", model, workers, extra=lane_toml(linger_us=linger_us()))
            rc, data, _ = chaos(check, f"lane-w{workers}-c{connections}", config, duration, connections=connections)
            row = lane_row(data, workers, connections)
            row["linger_us"] = linger_us()
            row["ok"] = rc == 0 and data.get("failed") == 0 and data.get("wrong_answers") == 0
            rows.append(row)
            base = {}
            if os.environ.get("LANE_BASELINE", "1") == "1":
                # Before: every worker batching on its own (--max-batch 64, --max-wait-us 500).
                settle_gpu(BASELINE)
                config = write_config(WORK / "nolane.toml", model, workers,
                                      worker_args=("--max-batch", 64, "--max-wait-us", 500))
                _, base_data, _ = chaos(check, f"nolane-w{workers}-c{connections}", config, duration,
                                        connections=connections)
                base = lane_row(base_data, workers, connections)
                before.append(base)
            check.say(f"| {workers} | {connections} | {row['rps']} | {row['p50_ms']} | {row['p99_ms']} | "
                      f"{row['mean_batch']} | {row['workers_per_pass']} | {base.get('rps', '-')} | "
                      f"{base.get('p99_ms', '-')} |")
    suffix = f"-linger{linger_us()}" if linger_us() else ""
    (OUT / f"batching-h200{suffix}.json").write_text(json.dumps(rows, indent=1) + "\n")
    if before:
        (OUT / "batching-h200-without-lane.json").write_text(json.dumps(before, indent=1) + "\n")
    by = {(r["workers"], r["connections"]): r for r in rows}
    check.verdict(all(r["ok"] for r in rows), "every lane run: every answer checked, none failed or wrong")
    four64, four16, eight64 = by[(4, 64)], by[(4, 16)], by[(8, 64)]
    check.verdict(four64["rps"] >= 25000 and (four64["p99_ms"] or 99) <= 5,
                  f"4 workers, 64 connections: {four64['rps']} req/s >= 25000 with p99 {four64['p99_ms']} ms <= 5")
    check.verdict(four16["rps"] >= 8000, f"4 workers, 16 connections: {four16['rps']} req/s >= 8000")
    check.verdict(eight64["rps"] >= 0.9 * four64["rps"] and by[(8, 16)]["rps"] >= 0.9 * four16["rps"],
                  f"8 workers within 10 % of 4: {eight64['rps']} vs {four64['rps']} (64 connections), "
                  f"{by[(8, 16)]['rps']} vs {four16['rps']} (16)")


def section_lanekill(check):
    """The lane's pass runner SIGKILLed every second under load: 0 wrong, failures only on its own
    connections, the next pass within 10 ms (p99) of the kill (issue #13). LINGER_US as in lane."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    settle_gpu(BASELINE)
    config = write_config(WORK / "lanekill.toml", model, 4,
                          extra=lane_toml(linger_us=linger_us()) + "\n[restart]\nmax_restarts = 1000\nwithin_s = 60\n")
    rc, data, _ = chaos(check, "lane-leader-kills", config, int(os.environ.get("LANEKILL_SECONDS", 40)),
                        kill="leader@1", connections=64)
    kills = data.get("kills", [])
    gaps = sorted(k["next_pass_ms"] for k in kills if k.get("next_pass_ms") is not None)
    p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else None
    check.say(f"{len(kills)} pass-runner kills; next pass after the kill: median "
              f"{statistics.median(gaps) if gaps else None} ms, p99 {p99} ms, max {gaps[-1] if gaps else None} ms; "
              f"{data.get('requests')} requests, {data.get('failed')} failed ({data.get('unexplained_failures')} "
              f"not on a killed worker's connections), {data.get('wrong_answers')} wrong")
    (OUT / "lane-kills-h200.json").write_text(json.dumps(
        {"kills": len(kills), "next_pass_ms": gaps, "next_pass_p99_ms": p99, "requests": data.get("requests"),
         "failed": data.get("failed"), "unexplained_failures": data.get("unexplained_failures"),
         "wrong_answers": data.get("wrong_answers"), "throughput_rps": data.get("throughput_rps"),
         "linger_us": linger_us()}, indent=1) + "\n")
    check.verdict(data.get("wrong_answers") == 0 and data.get("unexplained_failures") == 0 and len(kills) >= 10,
                  "pass-runner kills: 0 wrong answers, every failure on the killed worker's own connections")
    check.verdict(p99 is not None and len(gaps) == len(kills) and p99 <= 10,
                  f"the next pass starts within 10 ms (p99) of the kill: {p99} ms")


def section_gemm(check):
    """One pass of the seed's layer per batch size (gpu-probe gemm): cuBLAS (both operand orders,
    default and 1 MiB workspace) and forkless's linear_small kernel, after gpu-probe kernels."""
    kernels = sh(BIN / "gpu-probe", "kernels", check=False)
    check.say(kernels.stdout.strip() or kernels.stderr.strip())
    check.verdict(kernels.returncode == 0, "gpu-probe kernels: every kernel against the host (linear_small included)")
    for variant in ((), ("--outputs-major",), ("--small",), ("--workspace-kib", 1024)):
        run = sh(BIN / "gpu-probe", "gemm", *variant, check=False)
        check.say(run.stdout.strip() or run.stderr.strip())


def section_lanesweep(check):
    """4 workers on the lane: max_batch x max_wait_us (LANE_SWEEP="64:0,64:100"), 16 and 64 connections."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    sweep = os.environ.get("LANE_SWEEP", "64:0,64:100,64:300,128:100,32:100")
    check.say("| max_batch | max_wait_us | cuBLAS workspace | connections | req/s | p50 ms | p99 ms | mean batch | "
              "mean pass us |")
    check.say("|---|---|---|---|---|---|---|---|---|")
    rows = []
    variants = [(*map(int, v.split(":")), "tuned") for v in sweep.split(",")] + [(64, 100, None)]
    for max_batch, max_wait, workspace in variants:
        for connections in (16, 64):
            settle_gpu(BASELINE)
            env = "tuned" if workspace else {}
            config = write_config(WORK / "sweep.toml", model, 4, extra=lane_toml(max_batch, max_wait),
                                  workspace_kib=None, env=env)
            rc, data, _ = chaos(check, f"sweep-{max_batch}-{max_wait}-{workspace}-c{connections}", config, 8,
                                connections=connections)
            row = lane_row(data, 4, connections)
            lanes = data.get("lanes", [])
            pass_us = round(statistics.mean(l.get("mean_pass_us", 0) for l in lanes)) if lanes else None
            row.update(max_batch=max_batch, max_wait_us=max_wait, mean_pass_us=pass_us,
                       workspace="1 MiB" if workspace else "default")
            rows.append(row)
            check.say(f"| {max_batch} | {max_wait} | {row['workspace']} | {connections} | {row['rps']} | "
                      f"{row['p50_ms']} | {row['p99_ms']} | {row['mean_batch']} | {pass_us} |")
    (OUT / "lane-sweep-h200.json").write_text(json.dumps(rows, indent=1) + "\n")
    check.verdict(all(r["failed"] == 0 and r["wrong"] == 0 for r in rows), "sweep: none failed or wrong")


def gpu_count():
    return len(sh("nvidia-smi", "-L").stdout.strip().splitlines())


def per_device_used_mib():
    out = sh("nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits").stdout
    return {int(i): int(m) for i, m in (line.split(",") for line in out.strip().splitlines())}


def section_multigpu(check):
    """[cuda] devices on 1, 2, 4 GPUs: cold start, req/s at 64 connections, GPU memory per device,
    owner SIGKILL with the weights file gone (issue #14). LINGER_US sets [lane] linger_us,
    WORKER_VISIBLE=own [cuda] worker_visible_devices."""
    model = ensure_weights(check, "weights-seed.safetensors", SEED_MODEL)
    model_mib = model.stat().st_size / MIB
    per_device = int(os.environ.get("WORKERS_PER_DEVICE", 4))
    linger = linger_us()
    # WORKER_VISIBLE=own: each worker sees its own GPU only ([cuda] worker_visible_devices).
    visible = os.environ.get("WORKER_VISIBLE", "all")
    rows = []
    for n in [d for d in (1, 2, 4, 8) if d <= gpu_count()]:
        devices = list(range(n))
        cuda = f"devices = {devices}\nworkers_per_device = {per_device}\nworker_visible_devices = \"{visible}\""
        idle = per_device_used_mib()
        settle_gpu(BASELINE)
        colds = []
        for attempt in range(3):
            config = write_config(WORK / f"multi{n}.toml", model, per_device, cuda_extra=cuda, extra=lane_toml(linger_us=linger))
            sup = Supervisor(config, OUT / f"multi{n}-cold{attempt}.log")
            ready = sup.wait_for("workers ready", timeout=120)
            colds.append(field(ready, "cold_start_ms"))
            if attempt == 2:
                time.sleep(1)
                used = per_device_used_mib()
                status = sup.status() or {}
                apps = gpu_apps_mib()
                workers = [p for p in status.get("processes", []) if p.get("role") == "worker"]
                context = statistics.median(apps.get(p["pid"], 0) for p in workers) if workers else 0
            sup.stop()
            settle_gpu(BASELINE)
        mib = {d: used[d] - idle.get(d, 0) for d in devices}
        bound = model_mib + per_device * context
        config = write_config(WORK / f"multi{n}.toml", model, per_device, cuda_extra=cuda, extra=lane_toml(linger_us=linger))
        rc, data, _ = chaos(check, f"multi{n}-rps64", config, 10, connections=64)
        # And with 64 connections per device: as many requests in flight per device's lane as
        # one device had (at a fixed 64, more devices mostly shorten each pass).
        if n == 1:
            rc_more, more = rc, data
        else:
            rc_more, more, _ = chaos(check, f"multi{n}-rps{64 * n}", config, 10, connections=64 * n)
        # Owner SIGKILLed every 2 s, the weights file moved away after the first kill (chaos has
        # read its reference answers from it by then): every later owner must take every
        # device's copy back from the escrow, none from disk.
        moved = model.with_suffix(".moved")
        def owner_pid():
            status = supervisor_status(config) or {}
            return next((p["pid"] for p in status.get("processes", []) if p.get("role") == "owner"), None)

        def move_when_ready():
            first = None
            for _ in range(300):
                pid = owner_pid()
                first = first or pid
                if first and pid and pid != first:
                    model.rename(moved)
                    return
                time.sleep(0.1)

        mover = threading.Thread(target=move_when_ready, daemon=True)
        mover.start()
        krc, kdata, klog = chaos(check, f"multi{n}-ownerkill", config, 12, kill="owner@2", connections=64)
        mover.join()
        weights_moved = moved.exists()
        if weights_moved:
            moved.rename(model)
        kills = [k for k in kdata.get("kills", []) if k["role"] == "owner"]
        row = {"devices": n, "linger_us": linger, "worker_visible_devices": visible, "cold_start_s": round(statistics.median(c for c in colds if c) / 1e3, 3) if any(colds)
               else None, "cold_starts_ms": colds, "rps_64": round(data.get("throughput_rps", 0)),
               "rps_64_per_device": round(more.get("throughput_rps", 0)),
               "p99_ms_64": data.get("latency_ms", {}).get("p99"),
               "gpu_mib_per_device": [mib[d] for d in devices], "model_mib": round(model_mib),
               "worker_context_mib": context, "bound_mib": round(bound * 1.02),
               "owner_kills": len(kills), "owner_kills_recovered": sum(k.get("recovered_s") is not None for k in kills),
               "owner_kill_failed": kdata.get("failed"), "weights_file_moved_after_first_kill": weights_moved, "wrong": (data.get("wrong_answers"), kdata.get("wrong_answers"))}
        rows.append(row)
        check.say(json.dumps(row))
        check.verdict(rc == 0 and rc_more == 0 and krc == 0 and kdata.get("failed") == 0 and len(kills) >= 3
                      and weights_moved
                      and row["owner_kills_recovered"] == len(kills),
                      f"{n} device(s): {len(kills)} owner kills with the weights file gone, all re-adopted, "
                      f"0 failed, 0 wrong")
        check.verdict(all(m <= bound * 1.02 for m in mib.values()),
                      f"{n} device(s): GPU memory per device {list(mib.values())} MiB <= model {model_mib:.0f} + "
                      f"{per_device} x {context} MiB + 2 %")
    (OUT / "multigpu-h200.json").write_text(json.dumps(rows, indent=1) + "\n")
    one = rows[0]
    for row in rows[1:]:
        cold_limit, rps_factor = {2: (1.25, 1.8), 4: (1.5, 3.4)}.get(row["devices"], (None, None))
        if cold_limit is None:
            continue
        check.verdict(row["cold_start_s"] <= cold_limit * one["cold_start_s"],
                      f"{row['devices']} devices: cold start {row['cold_start_s']} s <= {cold_limit} x "
                      f"{one['cold_start_s']} s")
        check.verdict(row["rps_64"] >= rps_factor * one["rps_64"],
                      f"{row['devices']} devices: {row['rps_64']} req/s >= {rps_factor} x {one['rps_64']}")


SECTIONS = {
    "probe": section_probe,
    "correctness": section_correctness,
    "contexts": section_contexts,
    "vram": section_vram,
    "coldstart": section_coldstart,
    "throughput": section_throughput,
    "survive": section_worker_after_owner,
    "ownerkill": section_ownerkill,
    "hotswap": section_hotswap,
    "soak": section_soak,
    "gemm": section_gemm,
    "lanesweep": section_lanesweep,
    "lane": section_lane,
    "lanekill": section_lanekill,
    "multigpu": section_multigpu,
}


def main():
    global BIN, OUT, WORK, BASELINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", default=["all"], help=f"all, or some of {', '.join(SECTIONS)}")
    parser.add_argument("--bin", default=os.environ.get("FORKLESS_BIN", ROOT / ".gpu-bin"), type=Path)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/forkless-gpu"), type=Path)
    parser.add_argument("--stack", type=int, default=TUNING["stack"], help="[cuda] stack_limit_bytes")
    parser.add_argument("--workspace-kib", type=int, default=TUNING["workspace_kib"], help="cuBLAS workspace")
    parser.add_argument("--cublas-env", default=TUNING["env"]["CUBLAS_WORKSPACE_CONFIG"],
                        help="CUBLAS_WORKSPACE_CONFIG for the workers ('' for none)")
    args = parser.parse_args()
    TUNING.update(stack=args.stack, workspace_kib=args.workspace_kib,
                  env={"CUBLAS_WORKSPACE_CONFIG": args.cublas_env} if args.cublas_env else {})
    BIN, OUT = args.bin.resolve(), args.out
    OUT.mkdir(parents=True, exist_ok=True)
    WORK = OUT / "configs"
    WORK.mkdir(exist_ok=True)
    check = Check(OUT)
    names = list(SECTIONS) if args.sections == ["all"] else args.sections
    check.say(f"== forkless gpu check {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(names)}")
    check.say(sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader").stdout.strip())
    BASELINE = gpu_used_mib()
    for name in names:
        check.say(f"\n== {name}: {SECTIONS[name].__doc__.strip()}")
        started = time.time()
        try:
            SECTIONS[name](check)
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            check.verdict(False, f"{name} raised {e!r}")
        check.say(f"({name}: {time.time() - started:.0f} s)")
    check.say(f"\n== {'ALL PASS' if check.failed == 0 else f'{check.failed} FAILED'}")
    pack(OUT)
    return 0 if check.failed == 0 else 1


def pack(out):
    """Logs, configs and JSON reports into one archive beside gpu-check.txt and the HTML page."""
    keep = {"gpu-check.txt", "chaos-gpu.html", "chaos-gpu.json", "results.tar.gz", "batching-h200.json",
            "batching-h200-without-lane.json", "lane-kills-h200.json", "multigpu-h200.json",
            "lane-sweep-h200.json"}
    loose = [p for p in out.rglob("*") if p.is_file() and p.name not in keep
             and not (p.parent == out and p.name.startswith("batching-h200-linger"))]
    if loose:
        subprocess.run(["tar", "czf", str(out / "results.tar.gz"), "-C", str(out),
                        *[str(p.relative_to(out)) for p in loose]], check=False)
        for p in loose:
            p.unlink()


if __name__ == "__main__":
    sys.exit(main())
