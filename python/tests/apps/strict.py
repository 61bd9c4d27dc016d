"""A worker the supervisor execs itself (no launcher, no HTTP): its acceptance check is given to
the first ``forkless.attach()`` call, so it runs in the link's hook from the start: at attach and
on every hot swap's offer. ``argv[1]``: the input size it serves (``weight`` is [out, in])."""

import sys
import threading

import forkless

IN = int(sys.argv[1])


def takes_inputs(g):
    shape = g.info("weight").shape if "weight" in g else None
    if shape is None or len(shape) != 2 or shape[1] != IN:
        return f"this worker takes {IN} inputs, the weights are {list(shape) if shape else 'missing'}"
    return None


forkless.attach(accept=takes_inputs)
forkless.ready()
threading.Event().wait()  # SIGTERM (the default action) ends it
