"""End to end on the host path: the real supervisor runs the Flask example
(examples/python-flask/app.py, numpy engine) as Python workers under `python -m forkless.gunicorn`.
"""

import os
import shutil
import signal
import sys
import threading

import numpy as np
import pytest

from conftest import (APPS, IN, OUT, PATIENCE, Load, Reference, alive, children_of, close, eventually, get, post,
                      python_config, rust_config)

SEEDS = list(range(24))
# numpy (no torch) on CI; the torch engine is the GPU script's.
os.environ.setdefault("FORKLESS_EXAMPLE_ENGINE", "numpy")


def gunicorn_workers(sup):
    """{master pid: the gunicorn worker it forked} for every worker slot."""
    return {master: children_of(master) for master in sup.pids("worker")}


def test_python_workers_answer_like_the_rust_worker(supervisors, bins, weights, tmp_path):
    reference = Reference(weights[42])
    rust = supervisors(rust_config(tmp_path / "rust", weights[42], bins))
    py = supervisors(python_config(tmp_path / "py", weights[42], workers=4))
    rust_addr, py_addr = rust.wait_ready(), py.wait_ready()

    status = py.status()
    workers = [p for p in status["processes"] if p["role"] == "worker"]
    assert len(workers) == 4 and all(p["state"] == "ready" for p in workers), status
    # Each slot is a gunicorn master with exactly one gunicorn worker, which serves.
    assert all(len(kids) == 1 for kids in gunicorn_workers(py).values()), gunicorn_workers(py)

    served_by = set()
    for seed in SEEDS:
        status_r, want = post(rust_addr, "/infer", {"seed": seed})
        status_p, got = post(py_addr, "/", {"seed": seed})
        status_i, got_infer = post(py_addr, "/infer", {"seed": seed})
        assert (status_r, status_p, status_i) == (200, 200, 200), (want, got, got_infer)
        exact = reference.y_sum(seed)
        assert close(got["result"], want["y_sum"]), (seed, got, want)
        assert close(got["result"], exact) and close(want["y_sum"], exact), (seed, got, want, exact)
        assert got["generation"] == want["generation"] == 1
        assert np.allclose(got_infer["y_head"], want["y_head"], rtol=1e-5, atol=1e-6), (got_infer, want)
        assert np.allclose(got_infer["y_head"], reference.y(seed)[:8], rtol=1e-5, atol=1e-6)
        served_by.add(got["worker"])
    assert served_by <= {pid for kids in gunicorn_workers(py).values() for pid in kids}

    # x given explicitly: the same answer as its seed.
    x = [float(v) for v in reference_input(7)]
    assert close(post(py_addr, "/", {"x": x})[1]["result"], reference.y_sum(7))
    assert post(py_addr, "/", {"x": [1.0, 2.0]})[0] == 400
    assert post(py_addr, "/", {"nothing": 1})[0] == 400
    code, health = get(py_addr, "/healthz")
    assert code == 200 and health["model"] == {"in": IN, "out": OUT}
    assert health["engine"] == os.environ["FORKLESS_EXAMPLE_ENGINE"]

    # Every request above was counted once (status, heartbeats, max_requests): 2 per seed, the
    # explicit x, two bad requests and the health check.
    eventually("heartbeats carry the request counts", lambda: counted_now(py) == 2 * len(SEEDS) + 4)


def descendants(pid):
    found = set()
    for child in children_of(pid):
        found |= {child} | descendants(child)
    return found


def counted_now(sup):
    return sum(p["requests"] for p in sup.status()["processes"] if p["role"] == "worker")


def reference_input(seed):
    from conftest import splitmix_inputs

    return splitmix_inputs(seed, IN)


def check_answers(answers, references):
    wrong = [(seed, a) for seed, a in answers if not close(a["result"], references[a["generation"]].y_sum(seed))]
    assert not wrong, wrong[:5]


def test_owner_sigkill_under_load_fails_no_request(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=4))
    addr = sup.wait_ready()
    load = Load(addr, SEEDS, threads=8)
    load.wait_answers(50)
    (owner,) = sup.pids("owner")
    mark = sup.mark()
    os.kill(owner, signal.SIGKILL)
    sup.wait_for("adopted", start=mark)
    done = load.count()
    load.wait_answers(done + 100)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, {1: Reference(weights[42])})
    (new_owner,) = sup.pids("owner")
    assert new_owner != owner


def test_killed_python_workers_are_replaced_and_attach_from_escrow(supervisors, weights, tmp_path):
    model = tmp_path / "model.safetensors"
    shutil.copy(weights[42], model)
    sup = supervisors(python_config(tmp_path, model, workers=4))
    addr = sup.wait_ready()
    before = {seed: post(addr, "/", {"seed": seed})[1]["result"] for seed in SEEDS[:4]}
    # The weights now exist only in the escrow: a worker started from here on can only attach there.
    model.unlink()
    slots = gunicorn_workers(sup)
    masters = sorted(slots)
    served = slots[masters[0]][0]  # a gunicorn worker: its master must exit with it
    mark = sup.mark()
    os.kill(served, signal.SIGKILL)
    os.kill(masters[1], signal.SIGKILL)  # a master: its worker must die with it (PR_SET_PDEATHSIG)
    sup.wait_for(r"worker \d+ ready", start=mark, count=2)
    eventually("the killed processes are gone", lambda: not alive(served) and not alive(masters[1]))
    eventually("the orphaned gunicorn worker died with its master",
               lambda: not any(alive(pid) for pid in slots[masters[1]]))
    status = sup.status()
    workers = [p for p in status["processes"] if p["role"] == "worker"]
    assert all(p["state"] == "ready" for p in workers) and len(workers) == 4, status
    assert sum(p["restarts"] for p in workers) >= 2, status
    new_slots = gunicorn_workers(sup)
    assert masters[0] not in new_slots and masters[1] not in new_slots
    assert all(len(kids) == 1 for kids in new_slots.values()), new_slots
    after = {seed: post(addr, "/", {"seed": seed})[1]["result"] for seed in SEEDS[:4] for _ in range(4)}
    assert after == before


def test_writing_to_a_shared_array_raises(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=1, app="probe:app", app_dir=APPS))
    addr = sup.wait_ready()
    code, probe = get(addr, "/write")
    assert code == 200, probe
    assert probe["writeable"] is False
    assert probe["write"].startswith("ValueError") and "read-only" in probe["write"], probe
    assert probe["set_writeable"].startswith("ValueError"), probe
    # The array is the shared mapping itself (zero-copy), and the weights are unchanged.
    assert probe["zero_copy"] is True, probe
    assert probe["first"] == float(Reference(weights[42]).w[0, 0]), probe


@pytest.mark.parametrize("server", ["sync", "threads"])
def test_hot_swap_reaches_python_workers_between_requests(supervisors, weights, tmp_path, server):
    references = {1: Reference(weights[42]), 2: Reference(weights[43])}
    # A threaded worker runs several requests at once: a switch waits for those running.
    threads = ("--worker-class", "gthread", "--threads", "4") if server == "threads" else ()
    sup = supervisors(python_config(tmp_path, weights[42], workers=4 if server == "sync" else 2, gunicorn=threads))
    addr = sup.wait_ready()
    load = Load(addr, SEEDS, threads=8)
    load.wait_answers(50)
    swap = sup.control("reload-model", str(weights[43]))
    assert swap.returncode == 0, swap.stderr
    with load.lock:
        swapped_at = len(load.answers)
    # Every worker takes generation 2 up, at its next request or while idle.
    eventually("answers from generation 2",
               lambda: any(a["generation"] == 2 for _, a in load.answers[swapped_at:]))
    load.wait_answers(load.count() + 200)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, references)  # no answer mixes generations
    assert {a["generation"] for _, a in answers} == {1, 2}
    # Generation 1 is let go by every worker, so the supervisor frees it.
    eventually("generation 1 retired", lambda: sup.status().get("retiring_generation") is None)
    # After the swap, every worker answers from generation 2 only.
    late = [post(addr, "/", {"seed": seed})[1] for seed in SEEDS]
    assert {a["generation"] for a in late} == {2}
    check_answers(list(zip(SEEDS, late)), references)


def test_a_hot_swap_the_app_refuses_is_aborted_and_the_old_generation_keeps_serving(supervisors, bins, weights,
                                                                                   tmp_path):
    from conftest import make_weights

    # A valid Linear layer of another input size: the Flask example's check refuses it.
    refused = make_weights(bins, tmp_path / "other-input-size.safetensors", 43, inputs=2 * IN)
    sup = supervisors(python_config(tmp_path, weights[42], workers=4))
    addr = sup.wait_ready()
    processes = descendants(sup.proc.pid)  # the owner, 4 gunicorn masters and their workers
    load = Load(addr, SEEDS, threads=8)
    load.wait_answers(50)
    mark = sup.mark()
    swap = sup.control("reload-model", str(refused))
    during = load.count()
    load.wait_answers(during + 100)  # answers keep coming after the refusal
    answers, failures = load.stop()

    assert swap.returncode != 0, (swap.stdout, swap.stderr)
    reason = f"'weight' has shape [{OUT}, {2 * IN}], the service needs [{OUT}, {IN}]"
    assert reason in swap.stderr and "not taken" in swap.stderr, swap.stderr
    assert not failures, failures[:5]
    assert {a["generation"] for _, a in answers} == {1}
    check_answers(answers, {1: Reference(weights[42])})
    status = sup.status()
    assert status["generation"] == 1 and status["offered_generation"] is None, status
    # Refusing is no fault: every worker (and the owner) is the process it was.
    assert descendants(sup.proc.pid) == processes, (processes, sup.log_text())
    with sup.cond:
        exits = [line for line in sup.lines[mark:] if "exited" in str(line.get("message"))]
    assert not exits, sup.log_text()
    eventually("the refused generation is freed", lambda: sup.status().get("retiring_generation") is None)
    # A file the app accepts still swaps in afterwards.
    swap = sup.control("reload-model", str(weights[43]))
    assert swap.returncode == 0, swap.stderr
    live = sup.status()["generation"]
    assert live > 1
    eventually("every worker answers from the new generation",
               lambda: all(post(addr, "/", {"seed": seed})[1]["generation"] == live for seed in SEEDS[:8]))
    late = [post(addr, "/", {"seed": seed})[1] for seed in SEEDS[:8]]
    check_answers(list(zip(SEEDS, late)), {live: Reference(weights[43])})


def strict_config(tmp_path, model, inputs, workers=2):
    from conftest import write_config

    return write_config(tmp_path, model, [sys.executable, str(APPS / "strict.py"), str(inputs)], workers)


def test_a_check_given_to_the_first_attach_refuses_at_attach_with_status_78(supervisors, weights, tmp_path):
    sup = supervisors(strict_config(tmp_path, weights[42], inputs=2 * IN, workers=1))
    code = sup.proc.wait(90)
    assert code == 1, sup.log_text()
    log = sup.log_text()
    assert f"this worker takes {2 * IN} inputs, the weights are [{OUT}, {IN}]" in log, log
    assert "cannot use the weights of generation 1" in log and "78" in log, log


def test_a_check_given_to_the_first_attach_decides_on_hot_swap_offers(supervisors, bins, weights, tmp_path):
    from conftest import make_weights

    sup = supervisors(strict_config(tmp_path, weights[42], inputs=IN))
    sup.wait_ready()
    refused = make_weights(bins, tmp_path / "other-input-size.safetensors", 43, inputs=2 * IN)
    swap = sup.control("reload-model", str(refused))
    assert swap.returncode != 0, swap.stdout
    assert f"this worker takes {IN} inputs, the weights are [{OUT}, {2 * IN}]" in swap.stderr, swap.stderr
    assert sup.status()["generation"] == 1
    swap = sup.control("reload-model", str(weights[43]))
    assert swap.returncode == 0, swap.stderr
    assert sup.status()["generation"] > 1


def test_idle_workers_let_go_of_the_old_generation(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=2))
    sup.wait_ready()
    swap = sup.control("reload-model", str(weights[43]))
    assert swap.returncode == 0, swap.stderr
    # No request at all: the watcher takes generation 2 up and generation 1 is freed.
    eventually("generation 1 retired without any request",
               lambda: sup.status().get("retiring_generation") is None and sup.status()["generation"] == 2)
    sup.wait_for("switched to generation 2")


def test_max_requests_recycles_a_python_worker_without_failures(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=1, extra_workers="max_requests = 30"))
    addr = sup.wait_ready()
    (first,) = sup.pids("worker")
    mark = sup.mark()
    load = Load(addr, SEEDS, threads=2)
    sup.wait_for(r"worker 0 ready", start=mark)  # its successor
    load.wait_answers(load.count() + 40)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, {1: Reference(weights[42])})
    (second,) = sup.pids("worker")
    assert second != first
    # A planned recycle, not a crash.
    assert [p["restarts"] for p in sup.status()["processes"] if p["role"] == "worker"] == [0]


def test_a_refused_generation_stops_the_worker_with_status_78(supervisors, bins, tmp_path):
    from conftest import make_weights

    # A model this app cannot serve: a Linear layer of the wrong element type is simplest to
    # make with the real writer, so rename its tensors instead.
    other = make_weights(bins, tmp_path / "other.safetensors", 42)
    raw = other.read_bytes().replace(b'"weight"', b'"kernel"')
    other.write_bytes(raw)
    sup = supervisors(python_config(tmp_path, other, workers=1))
    code = sup.proc.wait(90)
    assert code == 1, sup.log_text()
    log = sup.log_text()
    assert "cannot use the weights of generation 1" in log and "needs tensors 'weight'" in log, log
    assert "78" in log, log


@pytest.mark.skipif(sys.version_info < (3, 9), reason="python >= 3.9")
def test_asgi_worker_under_uvicorn(supervisors, weights, tmp_path):
    pytest.importorskip("uvicorn")
    command = [sys.executable, "-m", "forkless.uvicorn", "--app-dir", str(APPS), "--log-level", "warning",
               "probe_asgi:app"]
    from conftest import write_config

    sup = supervisors(write_config(tmp_path, weights[42], command, 2))
    addr = sup.wait_ready()
    reference = Reference(weights[42])
    for seed in SEEDS[:8]:
        code, answer = post(addr, "/", {"seed": seed})
        assert code == 200 and close(answer["result"], reference.y_sum(seed)), answer
    eventually("requests counted", lambda: counted_now(sup) == 8)


# ---------------------------------------------------------------------------------------------
# The batch lane from Python (forkless.lane_pass, Generation.submit)

LANE = "\n[lane]\nenabled = true\nmax_batch = 16\nmax_wait_us = 2000\n"


def lane_status(sup):
    (lane,) = sup.status()["lanes"]
    return lane


def test_the_flask_example_on_the_lane_answers_every_request_like_the_reference(supervisors, weights, tmp_path):
    references = {1: Reference(weights[42]), 2: Reference(weights[43])}
    sup = supervisors(python_config(tmp_path, weights[42], workers=3, extra=LANE))
    addr = sup.wait_ready()
    load = Load(addr, SEEDS, threads=9)
    # One pass serves the requests of several workers (the lane's own count).
    eventually("a pass that served more than one worker", lambda: any(lane_status(sup)["workers_per_pass"][1:]))
    load.wait_answers(load.count() + 100)
    swap = sup.control("reload-model", str(weights[43]))
    assert swap.returncode == 0, swap.stderr
    eventually("answers from generation 2", lambda: any(a["generation"] == 2 for _, a in load.answers[-50:]))
    load.wait_answers(load.count() + 100)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, references)  # each answer from its own generation's pass
    lane = lane_status(sup)
    assert lane["generation"] == 2 and lane["failed"] == 0, lane
    # The pass kept no part of generation 1: every worker let go of it and it was freed.
    eventually("generation 1 retired", lambda: sup.status().get("retiring_generation") is None)
    assert post(addr, "/", {"x": [1.0, 2.0]})[0] == 400


def test_killing_the_python_worker_that_runs_the_passes_fails_no_pass_and_no_answer_is_wrong(supervisors, weights,
                                                                                              tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=3, extra=LANE))
    addr = sup.wait_ready()
    load = Load(addr, SEEDS, threads=9)
    load.wait_answers(100)
    kills = 3
    for _ in range(kills):
        leader = lane_status(sup)["leader_pid"]
        assert leader, lane_status(sup)
        os.kill(leader, signal.SIGKILL)  # SIGKILL in or between passes, the GIL held or not
        eventually("another worker runs the passes", lambda: lane_status(sup)["leader_pid"] not in (0, leader))
        load.wait_answers(load.count() + 100)
    answers, failures = load.stop()
    check_answers(answers, {1: Reference(weights[42])})
    # The requests the dead runner had taken went back to the queue: no request failed in the
    # lane (that would be an HTTP 500). What did fail is the killed process's own connections,
    # which each client thread saw at most once per kill.
    assert not [f for f in failures if "HTTP" in f[1]], failures
    assert len(failures) <= kills * 9, failures
    lane = lane_status(sup)
    assert lane["failed"] == 0, lane


def test_python_workers_on_the_lane_recycle_without_failures(supervisors, weights, tmp_path):
    # max_requests drains each worker in turn, whether or not it is running the passes.
    sup = supervisors(python_config(tmp_path, weights[42], workers=3, extra_workers="max_requests = 40", extra=LANE))
    addr = sup.wait_ready()
    mark = sup.mark()
    load = Load(addr, SEEDS, threads=6)
    sup.wait_for(r"worker \d+ ready", start=mark, count=4)  # successors, the passes' runner among them
    load.wait_answers(load.count() + 50)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, {1: Reference(weights[42])})
    lane = lane_status(sup)
    assert lane["failed"] == 0, lane
    assert all(p["restarts"] == 0 for p in sup.status()["processes"] if p["role"] == "worker")


def test_an_asgi_worker_awaits_the_lane_and_its_requests_share_passes(supervisors, weights, tmp_path):
    pytest.importorskip("uvicorn")
    command = [sys.executable, "-m", "forkless.uvicorn", "--app-dir", str(APPS), "--log-level", "warning",
               "probe_asgi:app"]
    from conftest import write_config

    # One process: passes larger than one request can only come from requests that were in
    # flight together in it, i.e. submit_async did not block the event loop.
    sup = supervisors(write_config(tmp_path, weights[42], command, 1, extra=LANE))
    addr = sup.wait_ready()
    load = Load(addr, SEEDS, threads=8)
    eventually("a pass of more than one request",
               lambda: any(n for size, n in lane_status(sup)["batch_sizes"] if size != "1"))
    load.wait_answers(load.count() + 50)
    answers, failures = load.stop()
    assert not failures, failures[:5]
    check_answers(answers, {1: Reference(weights[42])})


def test_workers_that_declare_no_pass_only_submit(supervisors, weights, tmp_path):
    # Only worker 0 declares a pass: the other two only submit, and worker 0 answers for all.
    sup = supervisors(python_config(tmp_path, weights[42], workers=3, app="lane_echo:app", app_dir=APPS,
                                    extra_workers='env = { LANE_ECHO_PASS_IN = "0" }', extra=LANE))
    addr = sup.wait_ready()
    runners = set()
    for i in range(60):
        status, reply = lane_echo(addr, f"only-{i}".encode())
        assert status == 200 and reply["answer"].split("|")[0] == f"only-{i}"[::-1], reply
        runners.add(int(reply["answer"].split("|")[1]))
    assert len(runners) == 1, runners
    assert lane_status(sup)["leader_pid"] in runners


def test_with_no_pass_declared_anywhere_a_request_times_out_and_says_why(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=2, app="lane_echo:app", app_dir=APPS,
                                    extra_workers='env = { LANE_ECHO_PASS_IN = "none" }', extra=LANE))
    addr = sup.wait_ready()
    status, reply = lane_echo(addr, b"anyone?")
    assert status == 500 and reply["kind"] == "TimeoutError", reply
    assert "is a lane pass declared (forkless.lane_pass)" in reply["error"], reply
    assert lane_status(sup)["served"] == 0


def lane_echo(addr, body):
    return post(addr, "/", body)  # the body as it is: the app submits it to the lane


def test_a_python_pass_answers_other_workers_and_fails_only_what_it_refuses(supervisors, weights, tmp_path):
    sup = supervisors(python_config(tmp_path, weights[42], workers=2, app="lane_echo:app", app_dir=APPS,
                                    extra=LANE))
    addr = sup.wait_ready()
    served, wrong, lock = set(), [], threading.Lock()
    crossed = threading.Event()

    def client(index):
        for i in range(10_000):
            if crossed.is_set():
                return
            body = f"request-{index}-{i}"
            status, reply = lane_echo(addr, body.encode())
            with lock:
                if status != 200 or reply["answer"].split("|")[0] != body[::-1]:
                    wrong.append(reply)
                    return crossed.set()
                served.add((reply["worker"], int(reply["answer"].split("|")[1])))
                if any(worker != runner for worker, runner in served):
                    crossed.set()

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(PATIENCE)
    assert not wrong, wrong[:3]
    # Some request was answered by a pass that another worker's process ran.
    assert any(worker != runner for worker, runner in served), served
    status, reply = lane_echo(addr, b"fail-7")
    assert status == 500 and "ValueError: refused fail-7" in reply["error"], reply
    status, reply = lane_echo(addr, b"text-3")
    assert status == 500 and "answered with a str" in reply["error"], reply
    status, reply = lane_echo(addr, b"raise")
    assert status == 500 and "RuntimeError: the pass was told to raise" in reply["error"], reply
    status, reply = lane_echo(addr, b"short")
    assert status == 500 and "pass returned 0 outputs for 1 inputs" in reply["error"], reply
    status, reply = lane_echo(addr, b"big")
    assert status == 500 and "answer of 5000 bytes > [lane] output_bytes = 4096" in reply["error"], reply
    # The lane goes on serving after each of those.
    status, reply = lane_echo(addr, b"after")
    assert status == 200 and reply["answer"].startswith("retfa|"), reply
