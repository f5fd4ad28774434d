"""The prepared GPU check's dry run: the same code as the GPU run, at tiny sizes on the CPU, so it cannot rot unseen.

It runs as the GPU machine runs it, a plain script in its own process; the GPU machine has no Ray, DeepSpeed or
PyAV, so the check must never import them."""

from __future__ import annotations

import json
import subprocess
import sys

from core.config import REPO_ROOT


def test_the_dry_run_measures_every_section_without_ray_deepspeed_or_pyav(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["imported"] == [] and "not imported: ray, deepspeed, av" in proc.stdout
    sections = report["sections"]
    assert set(sections) == {"attention", "train", "precision", "stream"}
    assert not [name for name, s in sections.items() if "failed" in s], sections
    # every backend ran on every shape, with the kernel it ran named
    assert all("kernel" in row and row["tflops"] > 0 for row in sections["attention"]["rows"]), sections["attention"]
    # two whole iterations, each with a finite update of both models, and the plan of the same config
    train = sections["train"]
    assert len(train["iterations"]) == 2 and train["plan"]["total_bytes"] > 0
    assert all(0 < it["generator_grad_norm"] < float("inf") and 0 < it["critic_grad_norm"] < float("inf")
               for it in train["iterations"])
    # bf16 follows float32, and its EMA sink moves as float32's does (the reference's in-cache EMA moves about
    # half as much: most of its updates round away)
    precision = sections["precision"]
    assert precision["block_flow_rel_error"] < 0.05
    sink = precision["ema_sink"]
    assert abs(sink["bfloat16"]["relative_change"] / sink["float32"]["relative_change"] - 1) < 0.2, sink
    assert sink["bfloat16, in-cache EMA (reference)"]["relative_change"] < 0.7 * sink["float32"]["relative_change"]
    # the stream's method ran; what cannot run on a CPU says why and the rest stands
    stream = sections["stream"]["results"]
    assert stream["eager"]["fps_end_to_end"] > 0 and stream["eager+overlap"]["same_video"]["max_levels"] == 0
    assert "compute capability" in stream["graphs+overlap+fp8"]["skipped"]
    assert "## stream" in (tmp_path / "gpu_check.md").read_text()
