"""``python -m forkless.gunicorn [gunicorn options] APP_MODULE``: a WSGI app as a forkless worker.

The supervisor exec's this process (the gunicorn *master*); it forks exactly one gunicorn worker,
which attaches and serves. So "N forkless workers" replaces "gunicorn -w N", with one copy of
the weights instead of N. The process tree and what keeps it sound:

    supervisor
     └─ python -m forkless.gunicorn (gunicorn master: no CUDA, no weights, no attach)
         └─ gunicorn worker (forked): forkless.attach() (bus, CUDA context), imports the app, serves

- The master arms PR_SET_PDEATHSIG and checks that its parent is the supervisor before anything
  else, and tells its worker its pid (``FORKLESS_LAUNCHER_PID``); the worker ties itself to the
  master the same way. A dead supervisor takes both down.
- CUDA and the attach happen only in the forked worker (never ``--preload``: the master must not
  touch CUDA, which cannot cross fork()). The attach starts right after the fork, on a background
  thread, so the CUDA context is being created while the worker imports the app (and torch).
- The master forks its worker once and hands it the bus socket (it closes its own copy). If
  the worker dies, the master exits with the worker's status (128 + signal for a killed one)
  instead of forking another onto the same bus; the supervisor then restarts the whole process
  and the new worker attaches from the escrow. gunicorn's own recycling (``max_requests``),
  ``--reload``, HUP, TTIN/TTOU and USR2 are off: the supervisor does all of that.
- The listening sockets are the supervisor's (``LISTEN_FDS``: ``--bind fd://3`` ...), so every
  worker accepts on the same port and a restart drops no queued connection.
- The app is wrapped in ``forkless.wsgi.Middleware`` (one generation per request, request
  counting for ``max_requests`` and status), and the worker reports ready after the app is loaded
  (after the app's own ``post_worker_init`` hook, if it has one).
- Signals: gunicorn's. TERM drains (the master stops its worker gracefully, then exits 0);
  ``max_requests`` makes the forkless link send TERM to the worker, which drains and exits 0,
  and the master exits 0 with it: a planned recycle.

Any other gunicorn option works as usual (``--worker-class gthread --threads 4``, ``--timeout``,
``-c gunicorn.conf.py`` ...).
"""

import os
import stat
import sys

ENFORCED = {
    "workers": 1,
    "preload_app": False,
    "reuse_port": False,
    "max_requests": 0,
    "reload": False,
    "daemon": False,
    # gunicorn >= 25: one control socket per host by default (~/.gunicorn/gunicorn.ctl), which the
    # masters of N worker slots would fight over; the supervisor is the control point.
    "control_socket_disable": True,
}


def _listen_fds():
    count = os.environ.get("LISTEN_FDS")
    if not count:
        return []
    return list(range(3, 3 + int(count)))


def _say(message):
    sys.stderr.write(f"forkless.gunicorn: {message}\n")
    sys.stderr.flush()


def _close_bus_copy():
    """The master's copy of the bus socket: the worker has its own; the supervisor should see the
    bus close as soon as the worker is gone."""
    fd = os.environ.get("FORKLESS_BUS_FD")
    if not fd or not fd.isdigit():
        return
    try:
        if stat.S_ISSOCK(os.fstat(int(fd)).st_mode):
            os.close(int(fd))
    except OSError:
        pass


def main():
    from . import _native

    try:
        _native.die_with_supervisor()
    except _native.AttachFailed as e:
        message, code = e.args
        _say(f"{message}")
        return code
    os.environ[_native.ENV_LAUNCHER_PID] = str(os.getpid())

    import gunicorn.app.base
    from gunicorn.app.wsgiapp import WSGIApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.errors import HaltServer

    class ForklessArbiter(Arbiter):
        """One worker, forked once; its end is the master's end."""

        forkless_spawned = False
        forkless_stopping = False

        def spawn_worker(self):
            if self.forkless_spawned:
                raise HaltServer("forkless: the worker is gone; the supervisor starts a new process", 1)
            self.forkless_spawned = True
            pid = super().spawn_worker()  # returns in the master only
            _close_bus_copy()
            return pid

        def reap_workers(self):
            # Peek at how the worker ended (WNOWAIT leaves it to gunicorn's own reaping).
            ended = {}
            for pid in list(self.WORKERS):
                try:
                    found = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    continue
                if found is not None:
                    ended[pid] = found
            super().reap_workers()
            if self.forkless_stopping:
                return
            for pid, found in ended.items():
                if pid in self.WORKERS:
                    continue
                if found.si_code == os.CLD_EXITED:
                    status, how = found.si_status, f"exited with status {found.si_status}"
                else:
                    status, how = 128 + found.si_status, f"was killed by signal {found.si_status}"
                raise HaltServer(f"forkless: worker {pid} {how}; the master exits with it", status)

        def stop(self, graceful=True):
            self.forkless_stopping = True
            super().stop(graceful)

        def _forkless_ignore(self):
            self.log.info("forkless: the supervisor manages workers; signal ignored")

        handle_hup = handle_ttin = handle_ttou = handle_usr2 = _forkless_ignore

    class ForklessApplication(WSGIApplication):
        def load_config(self):
            super().load_config()
            for key, value in ENFORCED.items():
                if key not in self.cfg.settings:  # an older gunicorn
                    continue
                if self.cfg.settings[key].get() != value and key != "control_socket_disable":
                    _say(f"{key} = {self.cfg.settings[key].get()!r} ignored: forkless runs one worker per process "
                         f"and recycles it itself")
                self.cfg.set(key, value)
            fds = _listen_fds()
            if fds:
                if self.cfg.settings["bind"].get() != self.cfg.settings["bind"].default:
                    _say(f"--bind {self.cfg.settings['bind'].get()} replaced by the supervisor's sockets")
                self.cfg.set("bind", [f"fd://{fd}" for fd in fds])
            user_post_fork = self.cfg.post_fork
            user_post_worker_init = self.cfg.post_worker_init

            def post_fork(server, worker):
                import forkless

                forkless.attach(wait=False)  # the CUDA context overlaps the app's imports
                user_post_fork(server, worker)

            def post_worker_init(worker):
                import forkless

                user_post_worker_init(worker)
                forkless.attach()
                forkless.ready()

            self.cfg.set("post_fork", post_fork)
            self.cfg.set("post_worker_init", post_worker_init)

        def load(self):
            import time

            from forkless.wsgi import wrap

            started = time.monotonic()
            app = wrap(super().load())
            _say(f"app {self.app_uri} loaded in {(time.monotonic() - started) * 1e3:.0f} ms")
            return app

    # Application.run() ends in BaseApplication.run(), which starts `Arbiter` by its global name.
    gunicorn.app.base.Arbiter = ForklessArbiter
    ForklessApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="python -m forkless.gunicorn").run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
