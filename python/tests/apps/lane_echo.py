"""A WSGI app on the batch lane, for the tests: the body is submitted as-is, and the pass
answers each input by what it says.

- ``fail...``: that request alone fails (the pass returns a ValueError for it);
- ``text...``: the pass answers with a str, which is not an answer;
- ``big...``: a 5,000-byte answer, over the lane's 4 KiB;
- ``raise``: the pass raises, which fails its whole batch; ``short``: the pass returns no
  answer at all, which fails it too;
- anything else: the input reversed, then ``|`` and the pid of the process that ran the pass.

The reply is JSON: ``{"ok": bool, "answer" | "error": str, "worker": pid}``.
"""

import json
import os

import forkless

forkless.attach()
# LANE_ECHO_PASS_IN: "all" (the default) declares the pass in every worker, "none" in none, or
# a worker index: only that worker runs passes, the others only submit.
WHERE = os.environ.get("LANE_ECHO_PASS_IN", "all")
DECLARES = WHERE == "all" or (WHERE != "none" and int(WHERE) == forkless.info()["index"])


def run(generation, inputs):
    items = list(inputs)
    if inputs.joined() != b"".join(items) or inputs.sizes() != [len(d) for d in items] or inputs[-1] != items[-1]:
        raise AssertionError(f"the pass's inputs disagree with themselves: {inputs!r}")
    if b"raise" in inputs:
        raise RuntimeError("the pass was told to raise")
    if b"short" in inputs:
        return []
    answers = []
    for data in inputs:
        if data.startswith(b"fail"):
            answers.append(ValueError(f"refused {data.decode()}"))
        elif data.startswith(b"text"):
            answers.append(data.decode())
        elif data.startswith(b"big"):
            answers.append(b"x" * 5000)
        else:
            answers.append(data[::-1] + f"|{os.getpid()}|{generation.number}".encode())
    return answers


if DECLARES:
    forkless.lane_pass(run)


def app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    reply = {"worker": os.getpid()}
    try:
        reply.update(ok=True, answer=forkless.generation().submit(body, timeout=5).decode())
        status = "200 OK"
    except (forkless.LaneError, TimeoutError) as e:
        reply.update(ok=False, error=str(e), kind=type(e).__name__)
        status = "500 Internal Server Error"
    data = json.dumps(reply).encode()
    start_response(status, [("content-type", "application/json"), ("content-length", str(len(data)))])
    return [data]
