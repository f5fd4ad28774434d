#!/usr/bin/env bash
# One GPU check on one bare H100/H200, under 8 minutes: attention kernels, one real-width training iteration
# against `launch.py plan`, bf16 against float32, and the 1.3B stream's speed (benchmarks/gpu_check.py says
# what each section measures). Needs python3 with torch and the wheels `make gpu-wheels` puts in .whl/ (what
# benchmarks/gpu_requirements.txt pins); no Ray, DeepSpeed or PyAV. Writes gpu_check.json and gpu_check.md
# into $OUT, or outputs/gpu_check when OUT is unset.
#   bash benchmarks/gpu_check.sh              # the GPU run
#   bash benchmarks/gpu_check.sh --dry-run    # the same code at tiny sizes on the CPU (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_check}"
if [[ "${1:-}" == "--dry-run" ]]; then
    exec python3 benchmarks/gpu_check.py --dry-run --out "$out"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import pydantic, diffusers" 2>/dev/null || {
    echo "error: pydantic and diffusers are missing: run 'make gpu-wheels' on a machine with network, and bring .whl/" >&2
    exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1
timeout 450 python3 benchmarks/gpu_check.py --out "$out" "$@"
