"""`launch.py train` end to end: real Serve reward service, 2 rollout actors, 2 DeepSpeed learner workers on
Ray Train; then a resumed run from its checkpoint. The CLI runs as its own process and joins this session's Ray."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time

import pytest

from core.config import REPO_ROOT, ConfigError
from core.records.video_io import read_video_file
from job.train import check_resources, required_resources
from toyworld.config import load_world_config

JOB = ["--config", "configs/plumbing.yaml", "video.num_latent_frames=6", "actors.num_actors=2", "actors.num_cpus=0.25",
       "actors.reward_app=train_job_reward",
       "reward_service.num_cpus=0.1", "learner.num_workers=2", "learner.cpus_per_worker=0.5",
       "learner.dfake_gen_update_ratio=2", "learner.checkpoint_every=2", "learner.video_every=2"]


def train(address: str, out, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "train", "--address", address, *JOB, f"learner.output_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


def test_train_job_runs_checkpoints_and_resumes(serve_instance, ray_instance, tmp_path):
    address = ray_instance.get_runtime_context().gcs_address
    run = train(address, tmp_path, "learner.max_steps=4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run summary" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weight_version"] == 2 and summary["steps"].startswith("4 / 4")
    assert summary["samples_delivered"] >= 8  # 2 learner workers x 4 steps x batch 1
    assert (tmp_path / "checkpoints" / "step_00000004" / "loop_state.pt").is_file()
    cursor = json.loads((tmp_path / "checkpoints" / "step_00000004" / "cursor.json").read_text())
    assert cursor["step"] == 4 and cursor["version"] == 2  # what a resuming driver reads: a few bytes
    assert cursor["prompt_state"]["epoch"] == 0 and cursor["prompt_state"]["next_index"] >= 8
    assert (tmp_path / "export" / "generator.safetensors").is_file()

    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows)
    assert all(math.isfinite(float(r["generator_loss"])) for r in rows if r["generator_step"] == "True")
    # strictly on-policy (max_staleness 0): samples consumed after an update were made with the published weights
    made_with = [int(r["version"]) - (r["generator_step"] == "True") - float(r["staleness"]) for r in rows]
    assert max(made_with) >= 1 and all(float(r["staleness"]) == 0 for r in rows)
    assert (tmp_path / "metrics.parquet").is_file() and list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    videos = [p for p in summary["videos"]]
    assert videos and read_video_file(videos[0]).frames.shape[1:] == (64, 64, 3)

    resumed = train(address, tmp_path, "learner.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000004") and summary["steps"] == "6 / 6 (2 this run)"
    assert summary["weight_version"] == 3
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "metrics.csv").open())] == [1, 2, 3, 4, 5, 6]


def test_train_refuses_impossible_requests_before_starting_anything(tmp_path):
    cfg = load_world_config(None, ["actors.num_actors=8", "actors.num_gpus=1", "runtime.device=cpu"])
    assert required_resources(cfg)["GPU"] == 8
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, {"CPU": 2.0})
    message = str(err.value)
    assert "runtime.device is cpu" in message and "needs 8 GPU" in message and "needs 4.75 CPU" in message
    check_resources(load_world_config(), {"CPU": 2.0})  # the embedded default fits a 2-core laptop

    missing = subprocess.run([sys.executable, "launch.py", "train", "learner.teacher.kind=wan",
                              "learner.teacher.checkpoint=/nonexistent/wan14b"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "learner.teacher.checkpoint: /nonexistent/wan14b" in missing.stderr
    unknown = subprocess.run([sys.executable, "launch.py", "train", "learner.max_stepz=3"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "learner.max_stepz: unknown key" in unknown.stderr


def test_ctrl_c_checkpoints_and_exits(serve_instance, ray_instance, tmp_path):
    address = ray_instance.get_runtime_context().gcs_address
    cmd = [sys.executable, "launch.py", "train", "--address", address, *JOB, "learner.num_workers=1",
           "learner.max_steps=1000", "learner.checkpoint_every=1000", f"learner.output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "metrics.csv"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "Ctrl-C (checkpointed)"
    step = int(summary["steps"].split(" / ")[0])
    assert 2 <= step < 1000 and (tmp_path / "checkpoints" / f"step_{step:08d}").is_dir()
