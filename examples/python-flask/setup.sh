#!/usr/bin/env bash
# Sets up the Python workers example: the supervisor (release build), and a venv here (.venv)
# with the forkless wheel (built with maturin) and the app's dependencies (requirements.txt).
# torch is optional on the host path (numpy computes the same answers): WITH_TORCH=1 adds it.
# Needs a Rust toolchain and Python >= 3.9 ($PYTHON, default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"

echo "== supervisor and linear-worker (cargo build --release)"
(cd "$root" && cargo build --release --bins)

echo "== venv: $here/.venv"
"$python" -m venv "$here/.venv"
pip=("$here/.venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install "maturin>=1.9.4,<2" -r "$here/requirements.txt"
if [ "${WITH_TORCH:-0}" = 1 ]; then
  "${pip[@]}" install torch
fi

echo "== forkless wheel (maturin build --release)"
wheels="$here/.venv/wheels"
rm -rf "$wheels"
(cd "$root/python" && "$here/.venv/bin/maturin" build --release --quiet -i "$here/.venv/bin/python" --out "$wheels")
"${pip[@]}" install --force-reinstall --no-deps "$wheels"/forkless-*.whl

echo "== ready: $root/target/release/supervisor run examples/python-flask/config.toml"
