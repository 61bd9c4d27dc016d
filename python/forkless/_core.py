"""Attaching, generations, acceptance and switching between requests.

One process attaches once. The Rust link (``forkless._native``, a background thread) holds the
bus to the supervisor; a committed hot swap makes the new generation current there at once.
Python serves the generation it has *taken up*: requests start on it and keep it to their end
(``generation()`` inside a request is pinned), and a new generation is taken up between
requests, when no request of this process is running:

- at the start of the next request (``begin_request``, called by the WSGI/ASGI middleware), or
- by a watcher thread while the worker is idle, so an idle worker lets go of the old
  generation too (it is unmapped, and the supervisor frees it, once nothing refers to it).

Acceptance checks (``attach(accept=...)``) run before that, where a Rust worker's checks run:
in the worker crate's hook on the link thread, at attach and on every hot swap's *offer*, so the
supervisor commits a swap only when every worker accepted it, and ``supervisor reload-model``
fails with the refusing check's reason. A check sees a ``Candidate``: the generation's number,
source, backend and device, and each tensor's name, dtype and shape, but not its values (the
same at attach and at a swap). Taking an accepted generation up runs the ``on_generation``
callbacks (rebinding modules, recapturing CUDA graphs), never while a request of this process
runs.
"""

import collections
import contextvars
import os
import sys
import threading
import time
import traceback

from . import _native

#: (name, dtype, shape) of one tensor of a generation; dtype is numpy's/torch's name
#: ("float32", "bfloat16", ...), shape a tuple.
TensorInfo = collections.namedtuple("TensorInfo", "name dtype shape")


class AttachError(RuntimeError):
    """The worker could not attach. ``exit_code`` is the status that tells the supervisor what
    to do: 78 (restarting cannot help), 75 (resources not free yet: retry later), 1 (restart)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class Refused(Exception):
    """Raised by an acceptance check to refuse a generation, with the reason."""


class BindError(ValueError):
    """A module does not fit a generation: every missing, extra or mismatched tensor is named."""


def _log(message):
    # One line on stderr: the supervisor re-emits it with this worker's role, index and pid.
    sys.stderr.write(f"forkless: {message}\n")
    sys.stderr.flush()


class _Described:
    """What is known of a generation without reading its values (``Generation`` and
    ``Candidate`` share it)."""

    __slots__ = ("_native", "number", "backend", "device", "_infos")

    def __init__(self, native):
        self._native = native
        self.number = native.number
        self.backend = native.backend
        kind, index = native.dlpack_device
        self.device = "cpu" if kind == 1 else f"cuda:{index}"
        self._infos = None

    @property
    def source(self):
        """The weights file the owner loaded."""
        return self._native.source

    def tensors(self):
        if self._infos is None:
            self._infos = [TensorInfo(name, dtype, tuple(shape)) for name, dtype, shape in self._native.tensors()]
        return list(self._infos)

    def names(self):
        return [t.name for t in self.tensors()]

    def info(self, name):
        for t in self.tensors():
            if t.name == name:
                return t
        raise KeyError(f"generation {self.number} has no tensor named {name!r}")

    def __contains__(self, name):
        return name in self._native

    def __len__(self):
        return len(self._native)

    def __iter__(self):
        return iter(self.names())

    def __repr__(self):
        return repr(self._native)


class Generation(_Described):
    """The weights of one generation, read-only, mapped for as long as this object or any array
    or tensor made from it lives.

    - ``number``: 1, 2, ... as the owner publishes them (0 for ``forkless.load``)
    - ``backend``: "host" or "cuda"; ``device``: "cpu" or "cuda:N"; ``source``: the file
    - ``tensors()``: ``[TensorInfo(name, dtype, shape)]``; ``names()``; ``info(name)``
    - ``tensor(name)``: a numpy array (host) or a torch tensor (cuda), zero-copy, read-only
    - ``numpy(name)`` / ``torch(name)`` / ``dlpack(name)`` to choose
    """

    __slots__ = ()

    def dlpack(self, name):
        """The DLPack producer of ``name`` (``__dlpack__``, ``__dlpack_device__``)."""
        return self._native.tensor(name)

    def numpy(self, name):
        """A read-only numpy array over the shared memory (host backend only)."""
        import numpy

        producer = self._native.tensor(name)
        if self.backend != "host":
            raise TypeError(f"tensor {name!r} is in GPU memory ({self.device}): use generation.torch({name!r})")
        try:
            array = numpy.from_dlpack(producer)
        except (BufferError, TypeError, RuntimeError) as e:
            raise TypeError(f"tensor {name!r} ({producer.dtype}) has no numpy equivalent here ({e}): use "
                            f"generation.torch({name!r})") from e
        # numpy >= 2.2.5 honours the read-only flag (versioned capsules) and makes legacy ones
        # read-only; older numpy does neither. The memory is mapped read-only either way.
        array.flags.writeable = False
        return array

    def torch(self, name):
        """A torch tensor over the shared memory: on the CPU (host backend) or on ``cuda:N``.

        torch has no read-only tensors: a write through it is stopped by the memory itself (the
        mapping is read-only): on the CPU the process dies of SIGSEGV (the supervisor restarts
        it); on the GPU the driver refuses the copy or faults the kernel.
        """
        import torch

        return torch.from_dlpack(self._native.tensor(name))

    def tensor(self, name):
        """``numpy(name)`` on the host backend, ``torch(name)`` on the cuda backend."""
        return self.numpy(name) if self.backend == "host" else self.torch(name)

    @property
    def has_lane(self):
        """True when the service runs a batch lane (``[lane] enabled = true``): see ``submit``."""
        return self._native.has_lane

    def submit(self, data, timeout=30.0):
        """Queues ``data`` (bytes) on this generation's batch lane and waits, without the GIL, at
        most ``timeout`` seconds for the answer (bytes). One pass of whichever worker holds the
        lane's lease answers the requests of every worker (see ``lane_pass``).

        Raises LaneError (the pass failed this request: the message says why), LaneFull (every
        slot is in use: answer 503), TimeoutError (no pass answered: is one declared?), or
        ValueError (``data`` exceeds ``[lane] input_bytes``).
        """
        return self._native.submit(data, timeout)

    async def submit_async(self, data, timeout=30.0):
        """``submit`` for asyncio (ASGI): waits on a thread of forkless's own pool, so the event
        loop goes on serving other requests, which join the same pass."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(_waiters(), self._native.submit, data, timeout)

    def same_as(self, other):
        return isinstance(other, Generation) and self._native.same_as(other._native)

    def candidate(self):
        """What an acceptance check sees of this generation."""
        return Candidate(self._native.candidate())


class Candidate(_Described):
    """A generation as an acceptance check sees it, at attach and at a hot swap's offer alike:
    ``number``, ``source``, ``backend``, ``device``, ``tensors()`` (``TensorInfo`` name, dtype,
    shape), ``names()``, ``info(name)``, ``name in candidate``, ``len()``. Not the values: an
    offer is checked before this process may use it (it may yet be withdrawn and unmapped), so
    ``tensor()``, ``numpy()``, ``torch()`` and ``dlpack()`` raise TypeError."""

    __slots__ = ()

    def _no_values(self, name):
        raise TypeError(f"an acceptance check sees generation {self.number}'s names, dtypes and shapes, not its "
                        f"values (asked for tensor {name!r}): it decides on a generation before this process may "
                        f"use it; decide on tensors(), info(name) and source")

    dlpack = numpy = torch = tensor = _no_values


def load(path):
    """A safetensors file as a private, read-only generation of this process (number 0),
    without a supervisor: for tests, tools and notebooks."""
    return Generation(_native.load(os.fspath(path)))


# ---------------------------------------------------------------------------------------------
# Acceptance
#
# Every check given to attach(accept=...) is kept in _checks (append-only) and run by
# _run_checks, which the Rust link calls (on its own thread, with the GIL) for the generation it
# attaches and for every generation a hot swap offers: the supervisor hears the verdict before
# it commits. A check registered after the attach started (under the launchers, the app is
# imported while the link attaches) may have missed the current generation: _approved says how
# many checks accepted each generation, and attach() runs the rest on it at once.
#
# Lock order: _checks_lock is held only to read or change _checks/_approved, never while
# waiting on the link or calling a check; the link thread never takes _state.cond (a request
# thread may hold it while it waits for the attach).


def _spec_check(spec):
    """{name: shape} or {name: (dtype, shape)}; a dimension or dtype of None matches anything."""
    wanted = {}
    for name, item in dict(spec).items():
        if isinstance(item, dict):
            dtype, shape = item.get("dtype"), item.get("shape")
        elif isinstance(item, tuple) and len(item) == 2 and (item[0] is None or isinstance(item[0], str)):
            dtype, shape = item
        else:
            dtype, shape = None, item
        wanted[name] = (dtype, None if shape is None else tuple(shape))

    def check(generation):
        have = {t.name: t for t in generation.tensors()}
        problems = []
        for name, (dtype, shape) in wanted.items():
            t = have.get(name)
            if t is None:
                problems.append(f"no tensor {name!r}")
                continue
            if dtype is not None and t.dtype != dtype:
                problems.append(f"{name!r} is {t.dtype}, the service needs {dtype}")
            if shape is not None and (len(shape) != len(t.shape)
                                      or any(w is not None and w != h for w, h in zip(shape, t.shape))):
                problems.append(f"{name!r} has shape {list(t.shape)}, the service needs {list(shape)}")
        return "; ".join(problems) or None

    return check


_checks = []
_approved = {}  # generation number -> how many of _checks (the first k) accepted it
_checks_lock = threading.Lock()
_in_check = threading.local()


def _check_name(check):
    return getattr(check, "__qualname__", None) or repr(check)


def _verdicts(checks, candidate):
    """The reasons the checks refuse ``candidate`` for (empty: accepted). An exception refuses
    too, with its type and message (its traceback is logged)."""
    reasons = []
    _in_check.active = True
    try:
        for check in checks:
            try:
                reason = check(candidate)
            except Exception as e:  # noqa: BLE001 - a broken check refuses; the worker stays up
                _log(f"acceptance check {_check_name(check)} raised on generation {candidate.number}:\n"
                     f"{traceback.format_exc()}")
                reason = f"the acceptance check {_check_name(check)} raised {type(e).__name__}: {e}"
            if reason:
                reasons.append(str(reason))
    finally:
        _in_check.active = False
    return reasons


def _run_checks(native_candidate):
    """The link's acceptance hook (forkless._native.start(check=...)): None accepts, a string
    refuses with that reason. Runs on the link thread with the GIL."""
    candidate = Candidate(native_candidate)
    with _checks_lock:
        checks = list(_checks)
    reasons = _verdicts(checks, candidate)
    with _checks_lock:
        if reasons:
            _approved.pop(candidate.number, None)
        else:
            _approved[candidate.number] = len(checks)
            for old in sorted(_approved)[:-8]:  # a few recent generations are enough
                del _approved[old]
    return "; ".join(reasons) or None


def _catch_up(generation):
    """Runs the checks that ``generation`` has not passed yet (registered after it was checked);
    returns the reasons they refuse it for."""
    with _checks_lock:
        done = _approved.get(generation.number, 0)
        late = _checks[done:]
    if not late:
        return []
    reasons = _verdicts(late, generation.candidate())
    if not reasons:
        with _checks_lock:
            if _approved.get(generation.number, 0) == done:
                _approved[generation.number] = done + len(late)
    return reasons


def _make_check(accept):
    """An acceptance check: a callable(Generation) returning None/True (accept) or False/a
    reason (refuse), or raising Refused; an nn.Module (its tensors must bind); or a spec."""
    if hasattr(accept, "state_dict") and hasattr(accept, "named_parameters"):
        from ._bind import bind_problems

        module = accept
        return lambda generation: "; ".join(bind_problems(module, generation)) or None
    if isinstance(accept, dict):
        return _spec_check(accept)
    if isinstance(accept, (list, tuple)):
        checks = [_make_check(a) for a in accept]
        return lambda generation: "; ".join(r for r in (c(generation) for c in checks) if r) or None
    if callable(accept):
        def check(generation):
            try:
                verdict = accept(generation)
            except Refused as e:
                return str(e) or "refused"
            if verdict is None or verdict is True:
                return None
            if verdict is False:
                return "refused by the service's check"
            return str(verdict)

        return check
    raise TypeError(f"accept must be a callable, an nn.Module, a {{name: shape}} dict or a list of those, "
                    f"not {type(accept).__name__}")


# ---------------------------------------------------------------------------------------------
# The process's state


class _State:
    def __init__(self):
        self.cond = threading.Condition(threading.RLock())
        self.current = None  # the accepted Generation this process serves
        self.seen = None  # the last generation number taken up or refused
        self.callbacks = []
        self.active = 0  # requests running in this process
        self.watcher = None
        self.pid = None


_state = _State()
_request_generation = contextvars.ContextVar("forkless_generation", default=None)


def _native_failure(error):
    message, code = error.args if len(error.args) == 2 else (str(error), 1)
    return AttachError(message, code)


def attach(accept=None, *, wait=True, timeout=None, exit_on_error=True, on_shutdown="sigterm", parent="auto"):
    """Attaches this process as a forkless worker (once; later calls add checks and wait).

    On a background thread, exactly like a Rust worker: ties the process to the supervisor (or
    to the launcher that forked it), receives the generation, maps it read-only (on the GPU:
    opens the primary context with the configured stack limit, before torch uses CUDA), then
    keeps heartbeats, hot swaps and releases going. No signal handler is installed: the server
    owns SIGTERM. When the worker decides to stop (``max_requests`` reached, supervisor gone),
    it sends SIGTERM to this process (``on_shutdown="sigterm"``) so the server drains, or does
    nothing (``"none"``).

    ``accept``: a check every generation must pass (see ``_make_check``), at attach and on every
    hot swap's offer. It gets a ``Candidate`` (names, dtypes, shapes, number, source; not the
    values) and runs on forkless's link thread. A refusal at attach ends the process with status
    78 and the reason; at a swap it aborts the swap for every worker: the live generation keeps
    serving and ``supervisor reload-model`` fails with the reason. Give checks to the first
    ``attach()`` call, which starts the attach; a check given later (under the launchers, the
    app is imported while the attach runs) is run at once on the generation served now, in this
    thread, then on every offer.

    Returns the current Generation (None with ``wait=False``). On failure it prints the reason
    and exits with the status the supervisor expects (``exit_on_error``), or raises AttachError.
    The first call's ``on_shutdown`` and ``parent`` hold for the process (the launchers make it).
    Must not be called from an acceptance check (RuntimeError).
    """
    if getattr(_in_check, "active", False):
        raise RuntimeError("forkless.attach() cannot be called from an acceptance check: the check gets the "
                           "generation it decides on as its argument")
    if accept is not None:
        check = _make_check(accept)
        with _checks_lock:
            _checks.append(check)
    try:
        _native.start(parent, on_shutdown, _run_checks, _lane_pass)
    except _native.AttachFailed as e:
        return _fail(_native_failure(e), exit_on_error)
    if not wait:
        return None
    try:
        if not _native.wait(timeout):
            return _fail(AttachError(f"not attached after {timeout} s"), exit_on_error)
    except _native.AttachFailed as e:
        return _fail(_native_failure(e), exit_on_error)
    with _state.cond:
        first = _state.current is None or _state.pid != os.getpid()
        if first:
            _state.current = Generation(_native.current())
            _state.seen = _state.current.number
            _state.pid = os.getpid()
        reasons = _catch_up(_state.current)
        if reasons:
            current = _state.current
            message = (f"this service cannot use the weights of generation {current.number} ({current.source}): "
                       f"{'; '.join(reasons)}; point [model] path at weights it accepts")
            return _fail(AttachError(message, _native.EXIT_FATAL), exit_on_error)
        if first:
            details = _native.info()
            _log(f"worker {details['index']} attached generation {_state.current.number} "
                 f"({_state.current.backend}, {len(_state.current)} tensors) in {details['attach_ms']:.0f} ms")
            _start_watcher()
        return _state.current


_waiter_pool = {"pid": None, "pool": None}
_waiter_lock = threading.Lock()


def _waiters():
    """Threads for ``submit_async``: they only wait (without the GIL), so there are enough of
    them for every request a process may have in flight, not asyncio's default few per core."""
    with _waiter_lock:
        if _waiter_pool["pid"] != os.getpid():  # a pool does not survive fork()
            import concurrent.futures

            _waiter_pool.update(pid=os.getpid(), pool=concurrent.futures.ThreadPoolExecutor(
                max_workers=256, thread_name_prefix="forkless-lane-wait"))
        return _waiter_pool["pool"]


LaneError = _native.LaneError
LaneFull = _native.LaneFull
_lane = {"run": None}


def lane_pass(run):
    """Declares this worker's pass of the batch lane (``[lane] enabled = true``, docs/LANE.md).

    ``run(generation, inputs)`` gets the lane's Generation and the inputs of the requests of
    every worker, oldest first: a sequence of bytes (``len``, ``[i]``, iteration) whose
    ``joined()`` is all of them in one bytes object (``np.frombuffer(inputs.joined(),
    np.float32).reshape(len(inputs), -1)``: the batch, no copy). It returns a list of the same
    length: for each input its answer (bytes) or an exception (that request alone fails with it). An exception
    raised by ``run`` fails the whole batch. It runs on forkless's pass-runner thread, after
    ``ready()``, in whichever worker holds the lane's lease; request handlers call
    ``generation.submit(bytes)`` and wait for their answer.

    Use only the generation it is given, and keep neither it nor an array of it past the call
    (make the views in each pass: it costs microseconds): the lane belongs to that generation,
    and a hot swap moves on to another lane. Declare it while the app is imported, before
    ``ready()``. Usable as a decorator; returns ``run``.
    """
    if not callable(run):
        raise TypeError(f"lane_pass needs a callable(generation, inputs) -> outputs, not {type(run).__name__}")
    if _native.is_ready():
        raise RuntimeError("declare the lane pass while the app is imported, before forkless.ready()")
    if _lane["run"] is not None and _lane["run"] is not run:
        raise RuntimeError(f"a lane pass is already declared ({_lane['run']!r}): one per process")
    _lane["run"] = run
    return run


def _lane_pass():
    """For the pass-runner thread of each generation with a lane: the pass, or None."""
    run = _lane["run"]
    if run is None:
        return None

    def dispatch(native, inputs):
        return run(Generation(native), inputs)

    return dispatch


def _fail(error, exit_on_error):
    if not exit_on_error:
        raise error
    _log(f"cannot attach: {error}")
    sys.exit(error.exit_code)


def is_attached():
    return _native.is_attached()


def _process_age_s():
    """Seconds since this process started (a forked worker: since its fork), from /proc."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(") ", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def ready():
    """Tells the supervisor this worker serves (once). The launchers call it after the app
    is loaded; call it yourself if you serve some other way."""
    attach()
    if not _native.is_ready():
        _native.ready()
        _log(f"ready {_process_age_s():.2f} s after this process started")


def info():
    """index, pid, backend, cuda_device, attach_ms, requests (attaches first)."""
    attach()
    return _native.info()


def cuda_stack_limit():
    """The CUDA context's per-thread stack limit in bytes (None on the host backend)."""
    attach()
    return _native.cuda_stack_limit()


def count_request():
    """Counts one finished request (status, heartbeats, ``max_requests``). The middlewares and
    launchers do it; call it if you serve without them."""
    _native.request_finished()


def on_generation(callback, *, now=False):
    """Calls ``callback(generation)`` whenever this process takes up a new generation: between
    requests, never while one of its requests runs (on the serving thread at the start of the
    next request, or on forkless's watcher thread while the worker is idle). ``now=True`` also
    calls it at once with the current generation. A callback that raises keeps the worker on
    the generation it had."""
    with _state.cond:
        _state.callbacks.append(callback)
        current = _state.current
    if now:
        callback(current if current is not None else attach())
    return callback


def generation():
    """The generation to use: inside a request (through the middlewares), the one the request
    started on; elsewhere the one this process serves now. Attaches first if needed."""
    pinned = _request_generation.get()
    if pinned is not None:
        return pinned
    current = _state.current
    if current is not None and _state.pid == os.getpid():
        return current
    return attach()


def _take_up_locked():
    """Takes up the latest generation (lock held, no request running): checks, then callbacks."""
    latest = Generation(_native.current())
    _state.seen = latest.number
    previous = _state.current
    if previous is not None and latest.same_as(previous):
        return
    # The offer was accepted on the link thread. A check registered after that (a race: checks
    # are registered at start-up) runs here; its refusal keeps this process on what it had,
    # though the supervisor has committed the swap.
    reasons = _catch_up(latest)
    if reasons:
        _log(f"generation {latest.number} refused by a check registered after its offer was accepted: "
             f"{'; '.join(reasons)}; still serving generation {previous.number if previous else None}")
        return
    _state.current = latest
    for callback in list(_state.callbacks):
        try:
            callback(latest)
        except Exception:  # noqa: BLE001 - reported; the worker stays on what it had
            _log(f"on_generation callback {getattr(callback, '__name__', callback)!r} failed for generation "
                 f"{latest.number}; still serving generation {previous.number if previous else None}:\n"
                 f"{traceback.format_exc()}")
            _state.current = previous
            for undo in list(_state.callbacks):
                if undo is callback:
                    break
                try:
                    undo(previous)
                except Exception:  # noqa: BLE001
                    _log(f"restoring generation {previous.number} failed:\n{traceback.format_exc()}")
            return
    _log(f"switched to generation {latest.number} (was {previous.number if previous else None})")


def begin_request(block=True):
    """Pins the generation for one request; returns (generation, token) for ``end_request``.

    With ``block`` (threaded or one-at-a-time servers), a pending switch first waits for this
    process's running requests to finish, so that no request sees two generations. Without it
    (an asyncio server, which must not block its loop), the switch happens at once: requests
    already running keep their pinned generation, but a module rebound in place by a callback
    changes under any of them suspended at an ``await``.
    """
    cond = _state.cond
    with cond:
        if _state.current is None or _state.pid != os.getpid():
            attach()
        if _native.current_number() != _state.seen:
            if block:
                cond.wait_for(lambda: _state.active == 0)
            if _native.current_number() != _state.seen:
                _take_up_locked()
        _state.active += 1
        current = _state.current
    return current, _request_generation.set(current)


def end_request(token):
    """Ends a request begun with ``begin_request``: unpins, counts it, lets a switch proceed."""
    try:
        _request_generation.reset(token)
    except ValueError:  # ended in another context (some servers close responses elsewhere)
        _request_generation.set(None)
    with _state.cond:
        _state.active -= 1
        if _state.active == 0:
            _state.cond.notify_all()
    _native.request_finished()


def _start_watcher():
    if _state.watcher is not None and _state.watcher.is_alive():
        return
    _state.watcher = threading.Thread(target=_watch, name="forkless-generations", daemon=True)
    _state.watcher.start()


def _watch():
    """Takes up a new generation while the worker is idle (no request running)."""
    while True:
        try:
            seen = _state.seen
            latest = _native.wait_for_change(seen, 5.0)
            if latest is None:
                continue
            with _state.cond:
                _state.cond.wait_for(lambda seen=seen: _state.active == 0 or _state.seen != seen, timeout=1.0)
                if _state.active == 0 and _native.current_number() != _state.seen:
                    _take_up_locked()
        except Exception:  # noqa: BLE001 - the watcher must not die
            _log(f"generation watcher: {traceback.format_exc()}")
            time.sleep(1.0)
