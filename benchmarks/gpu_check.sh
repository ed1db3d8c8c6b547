#!/usr/bin/env bash
# The GPU check of issue 19 in one command, for a session that has a GPU (see
# benchmarks/README.md, "GPU check"): the chapter's workload in fp32 and bf16, bench.py on the
# GPU and a torchrun NCCL smoke, within 7.5 minutes. Flags are passed on to gpu_check.py.
# Where $OUT is set (the device machine's folder whose files come back), the results go there.
set -u
cd "$(dirname "$0")/.."
PYTHON=python
command -v python >/dev/null 2>&1 || PYTHON=python3  # (GPU images often have python3 alone)
if [ -n "${OUT:-}" ]; then
    exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
