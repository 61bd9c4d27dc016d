#!/bin/sh
# The worker command of config.toml: gunicorn with one worker on the supervisor's socket, from
# the venv setup.sh made here ($FORKLESS_PYTHON: another Python with forkless, flask, gunicorn
# and numpy installed). `exec` keeps this process the one the supervisor started.
cd "$(dirname "$0")" || exit 78
python="${FORKLESS_PYTHON:-.venv/bin/python}"
if ! [ -x "$python" ]; then
  echo "$python not found: run examples/python-flask/setup.sh first" >&2
  exit 78
fi
exec "$python" -m forkless.gunicorn --log-level warning app:app
