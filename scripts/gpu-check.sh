#!/usr/bin/env bash
# The whole GPU check of forkless (issue #3, and the GPU halves of #5 and #6), on a machine with
# an NVIDIA GPU (driver 580+, CUDA 13 libraries), run from the repository root. No Rust toolchain
# is needed there: build the release binaries on any x86_64 Linux machine first,
#
#   cargo build --release --bins
#   mkdir -p .gpu-bin && cp target/release/{supervisor,linear-worker,chaos,gpu-probe} .gpu-bin/
#   strip .gpu-bin/*                     # 16 MB instead of 160 (the release profile keeps line tables)
#
# then, on the GPU machine:
#
#   scripts/gpu-check.sh                 # every section (~15 min; writes a 1.9 GB model once)
#   scripts/gpu-check.sh probe vram      # some sections: probe correctness vram coldstart
#                                        #   throughput survive ownerkill hotswap soak, and
#                                        #   gemm lanesweep lane lanekill (the batch lane, issue 13),
#                                        #   multigpu (every GPU of the node, issue 14)
#   scripts/gpu-check.sh python          # the Python workers (issue 12): scripts/gpu_python.py;
#                                        #   needs .whl/ (python3 scripts/gpu_python.py --prepare)
#
# Results: stdout, and $OUT (default /tmp/forkless-gpu): gpu-check.txt, JSON reports, logs,
# chaos-gpu.html. FORKLESS_BIN=dir overrides .gpu-bin.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== machine: $(uname -r)"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,compute_mode --format=csv || true
if [ "${1:-}" = python ]; then shift; exec python3 scripts/gpu_python.py "$@"; fi
exec python3 scripts/gpu_check.py "$@"
