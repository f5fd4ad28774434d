#!/usr/bin/env bash
# Issue 17's GPU checks on one H100/H200, one run under 8 minutes (benchmarks/gpu_checks.py says what each is):
# bf16 learner steps at the paper's shapes with random weights (1.3B student and critic, 14B teacher) and their
# peak memory against `launch.py plan`, the EMA from fp32 masters, replay-vs-rollout parity in bf16, and the
# weight broadcast against a plain one. Needs the project installed with DeepSpeed; WHEELS=<folder> installs
# missing packages from local wheels first (a GPU node without network).
#   bash benchmarks/gpu_checks.sh [key=value overrides]      -> prints a table, writes ${OUT:-.}/gpu_checks.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
python -c "import deepspeed" 2>/dev/null || { echo "error: DeepSpeed is not installed (pip install -e . or WHEELS=...)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 470 python benchmarks/gpu_checks.py --config configs/reward_forcing_1.3b.yaml --device cuda \
    --out "${OUT:-.}/gpu_checks.json" "$@"
