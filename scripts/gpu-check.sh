#!/usr/bin/env bash
# GPU check for forkless-gpu: runs gpu-probe on a machine with an NVIDIA GPU and prints a
# PASS/FAIL table (VMM arena export/import by POSIX fd, read-only refusal, survival of the
# exporter's SIGKILL with an fd-only holder, context memory per stack limit, import time).
#
# Build here (no CUDA needed to build):
#   cargo build --release -p forkless-gpu --bin gpu-probe
# then either run this script where target/release/gpu-probe exists, or copy the binary next
# to this script (e.g. into .gpu-bin/) and run it there. GPU_PROBE=path overrides.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
probe="${GPU_PROBE:-}"
if [[ -z "$probe" ]]; then
  for candidate in "$here/gpu-probe" "$here/../target/release/gpu-probe"; do
    [[ -x "$candidate" ]] && probe="$candidate" && break
  done
fi
if [[ -z "$probe" ]]; then
  echo "gpu-probe not found: build it with 'cargo build --release -p forkless-gpu --bin gpu-probe'" >&2
  exit 2
fi

echo "== machine"
uname -r
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,compute_mode --format=csv || echo "nvidia-smi failed"
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcublas\.so' || echo "(no CUDA libraries in the ldconfig cache)"
echo "== gpu-probe ${*:-}"
timeout 280 "$probe" "$@"
rc=$?
echo "== gpu-probe exit status $rc"
echo "== nvidia-smi after"
nvidia-smi --query-gpu=memory.used --format=csv
dmesg 2>/dev/null | grep -i xid | tail -5 || true
exit $rc
