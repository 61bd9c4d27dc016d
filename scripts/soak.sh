#!/usr/bin/env bash
# The 10-minute chaos soak on the host path (docs/CHAOS.md): the owner is killed every ~5 s
# and a worker every ~3 s (SIGKILL, ±20 % jitter, seed 1) under 8 keep-alive connections.
# Usage: scripts/soak.sh [SECONDS] [OUT_DIR]     (needs `cargo build --release` first)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-600}
out=${2:-target/soak}
mkdir -p "$out"
target/release/chaos run --config examples/linear/config-chaos.toml --duration "$duration" \
  --kill owner@5,worker@3 --connections 8 --seed 1 \
  --json "$out/soak.json" --html "$out/soak.html" | tee "$out/soak.txt"
