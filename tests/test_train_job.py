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
from pathlib import Path

import av
import psutil
import pytest
import torch
from safetensors.torch import load_file

from core.config import REPO_ROOT, ConfigError
from core.records.video_io import read_video_file
from job.train import STREAM_CLOSE_S, _proxy_timeout_s, check_resources, required_resources
from learner import checkpointing
from serve.follow import CheckpointVersions
from toyworld.config import load_world_config

JOB = ["--config", "configs/plumbing.yaml", "video.num_latent_frames=6", "actors.num_actors=2", "actors.num_cpus=0.25",
       "actors.reward_app=train_job_reward",
       "reward_service.num_cpus=0.1", "learner.num_workers=2", "learner.cpus_per_worker=0.5",
       "learner.dfake_gen_update_ratio=2", "learner.checkpoint_every=2", "learner.video_every=2"]


@pytest.fixture(scope="module", autouse=True)
def job_joins_the_sessions_proxy(serve_instance):
    """The job deploys its reward app on the session's Serve, whose one HTTP proxy listens on a free port: a job
    asking for another (reward_service.port) is refused (job.cluster.start_serve)."""
    JOB.append(f"reward_service.port={serve_instance.rsplit(':', 1)[1]}")
    yield
    JOB.pop()


def start_train(address: str, out, *overrides: str) -> tuple[subprocess.Popen, Path, Path]:
    """`launch.py train` in the background, its output to files (a pipe nobody reads would fill up and stall it)."""
    stdout, stderr = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    cmd = [sys.executable, "launch.py", "train", "--address", address, *JOB, f"learner.output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=stdout.open("w"), stderr=stderr.open("w"), text=True)
    return proc, stdout, stderr


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
    # what `launch.py serve --follow` plays: the newest checkpoint's generator (raw: the EMA starts at step 20)
    newest = CheckpointVersions(tmp_path, poll_s=0.1).next(after=0, timeout_s=5)
    assert (newest.version, newest.step) == (2, 4)
    exported = load_file(tmp_path / "export" / "generator.safetensors")
    assert newest.weights.keys() == exported.keys() and all(torch.equal(newest.weights[k], exported[k]) for k in exported)
    assert CheckpointVersions(tmp_path, poll_s=0.1).next(after=2, timeout_s=0.3) is None  # nothing newer yet

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

    made_by = json.loads(Path(videos[0]).with_suffix(".json").read_text())
    assert made_by["prompt"] in (REPO_ROOT / "prompts" / "tiny.txt").read_text() and isinstance(made_by["seed"], int)
    assert av.open(videos[0]).metadata["title"] == made_by["prompt"]  # the MP4 says what made it
    for phase in ("start-up: config checked", "start-up: Ray cluster joined", "start-up: reward service", "rollout actor(s) ready",
                  "learner ready: Ray Train started 2 worker(s)"):
        assert phase in run.stdout, run.stdout[-3000:]

    again = train(address, tmp_path, "learner.max_steps=4")  # at max_steps already: said, nothing started
    assert again.returncode == 0 and "already holds a run at step 4" in again.stdout and "start-up" not in again.stdout
    assert json.loads((tmp_path / "summary.json").read_text()) == summary

    resumed = train(address, tmp_path, "learner.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_run, summary = summary, json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000004") and summary["steps"] == "6 / 6 (2 this run)"
    assert summary["weight_version"] == 3
    assert summary["runs"] == first_run["runs"] + summary["runs"][-1:] and summary["runs"][-1]["steps"] == "4 -> 6"
    assert set(first_run["videos"]) <= set(summary["videos"])
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "metrics.csv").open())] == [1, 2, 3, 4, 5, 6]


def test_train_refuses_impossible_requests_before_starting_anything(tmp_path):
    cfg = load_world_config(None, ["actors.num_actors=8", "actors.num_gpus=1", "runtime.device=cpu"])
    assert required_resources(cfg)["GPU"] == 8
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, {"CPU": 2.0})
    message = str(err.value)
    assert "runtime.device is cpu" in message and "needs 8 GPU" in message and "needs 4.75 CPU" in message
    check_resources(load_world_config(), {"CPU": 2.0})  # the embedded default fits a 2-core laptop
    check_resources(load_world_config(), {"CPU": 2.0}, serve_stream=True)  # with a following stream too
    with pytest.raises(ConfigError, match=r"streaming app 1 x 1.0 \(serve.num_cpus\)"):
        check_resources(load_world_config(None, ["serve.num_cpus=1"]), {"CPU": 2.0}, serve_stream=True)
    gpu_job = load_world_config(None, ["runtime.device=cuda", "actors.num_gpus=1"])
    with pytest.raises(ConfigError, match="set serve.num_gpus=1"):
        check_resources(gpu_job, {"CPU": 8.0, "GPU": 8.0}, serve_stream=True)
    check_resources(gpu_job.model_copy(update={"serve": gpu_job.serve.model_copy(update={"num_gpus": 1.0})}),
                    {"CPU": 8.0, "GPU": 8.0}, serve_stream=True)


def test_a_following_stream_is_cut_by_its_own_deadline_not_by_the_shared_proxy():
    """Serve's one HTTP proxy bounds every request, WebSockets too: with --serve it waits for the stream's own
    deadline (the app closes the stream with its reason), else it keeps the reward service's bound."""
    cfg = load_world_config()
    assert _proxy_timeout_s(cfg, serve_stream=False) == cfg.reward_service.request_timeout_s == 60
    assert _proxy_timeout_s(cfg, serve_stream=True) == cfg.serve.stream_timeout_s + STREAM_CLOSE_S

    missing = subprocess.run([sys.executable, "launch.py", "train", "learner.teacher.kind=wan",
                              "learner.teacher.checkpoint=/nonexistent/wan14b"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "learner.teacher.checkpoint: /nonexistent/wan14b" in missing.stderr
    unknown = subprocess.run([sys.executable, "launch.py", "train", "learner.max_stepz=3"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "learner.max_stepz: unknown key" in unknown.stderr


def test_sigterm_checkpoints_exports_and_exits_0(serve_instance, ray_instance, tmp_path):
    """What `ray job stop`, Kubernetes and systemd send: the same clean stop as Ctrl-C."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir = tmp_path / "run"
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=1000",
                                       "learner.checkpoint_every=1000")
    try:
        metrics = out_dir / "metrics.csv"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.5)
        assert proc.poll() is None, stderr.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    err = stderr.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: the learner checkpoints" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM (checkpointed)"
    step = int(summary["steps"].split(" / ")[0])
    assert 2 <= step < 1000 and (out_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    assert (out_dir / "export" / "generator.safetensors").is_file()


def _learner_worker() -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            return proc
    return None


def test_a_learner_worker_lost_mid_checkpoint_restarts_from_the_last_complete_one(serve_instance, ray_instance,
                                                                                  tmp_path):
    """Chaos: the learner worker is killed while it writes a checkpoint. Ray Train restarts the group
    (learner.max_failures 1), which resumes from the last complete checkpoint behind versions the lost worker
    published: those are republished under a higher version, and the run finishes every step."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir = tmp_path / "run"
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=8",
                                       "learner.checkpoint_every=1", "learner.max_failures=1", "learner.keep_last=8")
    saving = out_dir / "checkpoints" / ".tmp-step_00000003"  # iteration 3 published version 2 before saving
    try:
        deadline, worker = time.monotonic() + 300, None
        while worker is None and proc.poll() is None and time.monotonic() < deadline:
            worker = _learner_worker()
            time.sleep(0.2)
        while not saving.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert worker is not None and proc.poll() is None, stderr.read_text()[-3000:]
        worker.send_signal(signal.SIGKILL)  # SIGTERM lets Ray's worker finish the save on its training thread
        proc.wait(timeout=400)
    finally:
        proc.kill()
    out, err = stdout.read_text(), stderr.read_text()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"].startswith("8 / 8") and summary["runs"][-1]["learner_restarts"] == 1
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    restarted = [r for r in rows if r["restarts"] == "1"]
    # resumed from step 2, the last complete checkpoint, and did every later step
    assert [int(r["step"]) for r in restarted] == list(range(3, 9)), [(r["step"], r["version"]) for r in rows]
    before = [int(r["version"]) for r in rows if r["restarts"] == "0"]
    # the restored weights came back under a version above every one published before the loss
    assert int(restarted[0]["version"]) > max(before)
    assert "the learner's worker group was restarted" in out
    assert (out_dir / "checkpoints" / "step_00000008").is_dir() and (out_dir / "export" / "generator.safetensors").is_file()


def _reward_replica(app: str, other_than: int | None = None) -> psutil.Process | None:
    """The live replica process of `app`; a killed one keeps its command line until it is reaped, so skip it."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == other_than or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if f"ServeReplica:{app}:" in " ".join(proc.info["cmdline"] or []):
            return proc
    return None


def test_the_reward_replica_lost_mid_run_is_restarted_and_its_samples_counted(serve_instance, ray_instance, tmp_path):
    """Chaos: SIGKILL to the reward service's replica mid-run. Serve starts another; rollouts whose scoring failed
    meanwhile are counted drops (never a made-up reward; whether one was in flight at the kill is chance), and
    the run finishes every step."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir = tmp_path / "run"
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=10",
                                       "learner.checkpoint_every=10", "actors.score_retries=0")
    try:
        metrics, deadline = out_dir / "metrics.csv", time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # header + 2 steps
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.2)
        replica = _reward_replica("train_job_reward")
        assert replica is not None
        replica.kill()
        restarted = None
        while restarted is None and proc.poll() is None:  # Serve replaces the replica while the job runs
            restarted = _reward_replica("train_job_reward", other_than=replica.pid)
            time.sleep(0.2)
        proc.wait(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    assert restarted is not None and restarted.pid != replica.pid
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"].startswith("10 / 10") and summary["samples_delivered"] >= 10
    # a rollout whose score was in flight at the kill is a score_* drop; nothing else but staleness drops one
    assert all(reason == "stale" or reason.startswith("score_") for reason in summary["drops"]), summary["drops"]


def test_a_second_sigterm_during_the_stop_checkpoint_abandons_and_the_last_complete_one_resumes(
        serve_instance, ray_instance, tmp_path):
    """SIGTERM, then another while the learner writes its stop checkpoint: the run is abandoned (exit 130, no
    stack dump), a save cut short leaves only its `.tmp-` folder, and the next run resumes from the last complete
    checkpoint."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir = tmp_path / "run"
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=1000",
                                       "learner.checkpoint_every=1")
    checkpoints = out_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while len(list(checkpoints.glob("step_*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        while not list(checkpoints.glob(".tmp-step_*")) and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    err = stderr.read_text()
    assert proc.returncode == 130 and "abandoned" in err and "Traceback" not in err, err[-3000:]
    latest = checkpointing.latest_checkpoint(checkpoints)
    step = checkpointing.read_cursor(latest)["step"]
    resumed = train(address, out_dir, "learner.num_workers=1", f"learner.max_steps={step + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(latest) and summary["steps"] == f"{step + 1} / {step + 1} (1 this run)"
