#!/usr/bin/env bash
# Issue 20's GPU comparison on one H100/H200, one run under 8 minutes, random weights at the 1.3B architecture:
#   1. benchmarks/stream_session.py --arch wan-1.3b: eager, CUDA graphs (+ compiled layers), graphs + overlapped
#      decode, compiled, graphs + FP8, graphs + overlap + FP8, side by side with ratios to eager (its docstring states
#      the FPS method). The far latency point is block 40, not 1000, to fit the budget: past the window's fill (3
#      blocks) every block replays the same graph on the same shapes (the CPU run in BENCHMARKS.md goes to 1000).
#      Configurations not started within 270 s are listed as skipped; each finished one is in the JSON at once;
#   2. benchmarks/stream_levers_quality.py --device cuda: the shipped toy-world student in float32, bfloat16, without
#      the context re-run and with FP8, measured exactly (fidelity, adherence) against float32.
# FP8 needs torchao; without it (or on a GPU below compute capability 8.9) those rows say so and the rest runs.
# WHEELS=<folder> installs local wheels first (e.g. torchao, a GPU node without network).
#   bash benchmarks/gpu_stream.sh        -> prints both tables, writes ${OUT:-.}/stream_1.3b.json, stream_levers.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
python -c "import torchao" 2>/dev/null || echo "note: torchao is not installed: the FP8 rows will be skipped" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 70 python benchmarks/stream_levers_quality.py --device cuda --prompts 24 --seeds 2 \
    --json "${OUT:-.}/stream_levers.json" || echo "stream_levers_quality.py failed or timed out (exit $?)" >&2
timeout 390 python benchmarks/stream_session.py --arch wan-1.3b --device cuda \
    --configs eager,graphs,graphs+fp8,compiled,graphs+overlap,graphs+overlap+fp8 \
    --near-block 10 --far-block 40 --samples 10 --fps-blocks 20 --deadline-s 270 \
    --json "${OUT:-.}/stream_1.3b.json"
