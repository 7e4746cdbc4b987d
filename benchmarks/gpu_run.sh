#!/usr/bin/env bash
# Issue 20's accelerator run, as one prepared command for a machine with an NVIDIA GPU whose
# python3 already holds PyTorch with CUDA (no install step; nothing is downloaded):
#
#     bash benchmarks/gpu_run.sh            # writes benchmarks/results/training_memory_cuda.*
#     DEVICE=cpu bash benchmarks/gpu_run.sh # the same flow on the CPU (a dry run of the script)
#
# It prints the versions, runs the tests that take the accelerator path when one is present
# (the timer's synchronization on a real device), then the Table 6 memory/time run of
# `training_speed.py --memory` on that device; with $OUT set (the device tool's output
# folder) the result files are copied there. About a minute on a GPU, 2-3 on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
"$PY" -m pytest -q -p no:cacheprovider tests/test_execution.py tests/test_algebra.py
"$PY" benchmarks/training_speed.py --memory --device "$DEVICE"
suffix=$([ "$DEVICE" = cpu ] && echo "" || echo "_$DEVICE")
if [ -n "${OUT:-}" ]; then
    cp "benchmarks/results/training_memory$suffix.md" "benchmarks/results/training_memory$suffix.json" "$OUT/"
fi
