#!/usr/bin/env bash
# The GPU build's device check (issue 23), one command on a machine with an NVIDIA GPU and network access:
#
#   bash bench/gpu_check.sh
#
# 1. a fresh virtual environment with the gpu extra (the pinned vLLM range) and the test tools, made by the same
#    scripts/install.sh as CI and the GPU image (GPU_CHECK_VENV, default build/gpu-check-venv; removed first);
# 2. the default model prepared, and the guided-decoding correctness test through the real server
#    (tests/test_guided_decoding.py, integration tests included: a mixed guided batch checked token for token
#    against the transformers reference, with preemption, and the fail-closed paths);
# 3. python -m bench.gpu_check: plain vs guided tokens/s at concurrency 16 on the default model, and
#    reports/gpu_check.json (test outcome, tokens/s, the model runner and adapter the server picked, versions).
#
# Exits non-zero if there is no GPU, the test fails, or the benchmark's guided server did not guide.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${GPU_CHECK_VENV:-build/gpu-check-venv}"
WORK=build/gpu_check
JUNIT="$WORK/correctness.xml"

if ! nvidia-smi --query-gpu=name --format=csv,noheader; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)" >&2
  exit 2
fi

rm -rf "$VENV" "$WORK"
mkdir -p "$WORK"
PROSOCIAL_VENV="$VENV" bash scripts/install.sh --gpu --dev
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
"$VENV/bin/prosocial" model prepare

TEST=(-m pytest -q -rs -p no:cacheprovider tests/test_guided_decoding.py --junitxml "$JUNIT")
status=0
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" "${TEST[@]}" 2>&1 | tee "$WORK/correctness.log" || status=$?

bench_status=0
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -m bench.gpu_check --junit "$JUNIT" \
  --test-command "python ${TEST[*]}" || bench_status=$?

echo "gpu_check: correctness exit $status, benchmark exit $bench_status; report in reports/gpu_check.json"
if [[ "$status" != 0 || "$bench_status" != 0 ]]; then
  exit 1
fi
