"""`launch.py train` end to end: real Serve reward service, 2 rollout actors, 2 DeepSpeed learner workers on
Ray Train; then a resumed run from its checkpoint. The CLI runs as its own process and joins this session's Ray.

The chaos and signal tests decide their moments by the job's own state, never by the machine's speed: a process
is frozen (SIGSTOP) before the test reads what it must not change, and the pool's counters (the test finds the
job's pool by name on the shared Ray) say when a score has failed."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

import launch
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


@pytest.mark.job
@pytest.mark.timeout(1200)
def test_train_job_runs_checkpoints_and_resumes(serve_instance, ray_instance, tmp_path, capsys):
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

    # at max_steps already: said, nothing started (in this process: it returns before joining Ray)
    assert launch.main(["train", "--address", address, *JOB, f"learner.output_dir={tmp_path}", "learner.max_steps=4"]) == 0
    again = capsys.readouterr().out
    assert "already holds a run at step 4" in again and "start-up" not in again
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


def test_a_following_stream_is_cut_by_its_own_deadline_not_by_the_shared_proxy(capsys):
    """Serve's one HTTP proxy bounds every request, WebSockets too: with --serve it waits for the stream's own
    deadline (the app closes the stream with its reason), else it keeps the reward service's bound."""
    cfg = load_world_config()
    assert _proxy_timeout_s(cfg, serve_stream=False) == cfg.reward_service.request_timeout_s == 60
    assert _proxy_timeout_s(cfg, serve_stream=True) == cfg.serve.stream_timeout_s + STREAM_CLOSE_S

    # refused before Ray starts (so in this process)
    assert launch.main(["train", "learner.teacher.kind=wan", "learner.teacher.checkpoint=/nonexistent/wan14b"]) == 2
    assert "learner.teacher.checkpoint: /nonexistent/wan14b" in capsys.readouterr().err
    assert launch.main(["train", "learner.max_stepz=3"]) == 2
    assert "learner.max_stepz: unknown key" in capsys.readouterr().err


@pytest.mark.job
@pytest.mark.timeout(900)
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


def _reward_replica(app: str, other_than: int | None = None) -> psutil.Process | None:
    """The live replica process of `app`; a killed one keeps its command line until it is reaped, so skip it."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == other_than or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if f"ServeReplica:{app}:" in " ".join(proc.info["cmdline"] or []):
            return proc
    return None


def _job_pool(known: set[str]) -> ray.actor.ActorHandle | None:
    """The rollout pool of the job just started: the named actor `rollout-<time>` on this Ray not in `known`
    (the job's driver has a namespace of its own)."""
    new = [a for a in ray.util.list_named_actors(all_namespaces=True)
           if re.fullmatch(r"rollout-\d+", a["name"]) and f"{a['namespace']}/{a['name']}" not in known]
    return ray.get_actor(new[0]["name"], namespace=new[0]["namespace"]) if new else None


def _named_actors() -> set[str]:
    return {f"{a['namespace']}/{a['name']}" for a in ray.util.list_named_actors(all_namespaces=True)}


def _wait(condition, proc: subprocess.Popen, stderr: Path, what: str, timeout_s: float = 300, poll_s: float = 0.2):
    """Poll `condition()` until it is true; fail if the job exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert proc.poll() is None, f"the job exited while waiting for {what}: {stderr.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(poll_s)
    return value


def _steps_logged(out_dir: Path) -> int:
    metrics = out_dir / "metrics.csv"
    return max(len(metrics.read_text().splitlines()) - 1, 0) if metrics.exists() else 0


@pytest.mark.job
@pytest.mark.timeout(1200)
def test_chaos_a_lost_reward_replica_and_a_learner_worker_lost_mid_checkpoint(serve_instance, ray_instance, tmp_path):
    """Chaos, in one run. (1) The reward service's replica stops answering (frozen) until a rollout's score has
    failed and been counted by the pool; then it is killed, and Serve starts another. (2) The learner worker is
    killed while it writes a checkpoint (frozen once the save of step 5 or later has begun, so the complete
    checkpoints read then are the ones it leaves). Ray Train restarts the group (learner.max_failures 1), which
    resumes from the last complete checkpoint; versions the lost worker published past it are republished under
    a higher version. The run finishes every step, and every dropped sample is counted with its reason."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir, checkpoints, known = tmp_path / "run", tmp_path / "run" / "checkpoints", _named_actors()
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=10",
                                       "learner.checkpoint_every=1", "learner.max_failures=1", "learner.keep_last=10",
                                       "actors.score_retries=0", "actors.score_timeout_s=10")
    try:
        _wait(lambda: _steps_logged(out_dir) >= 2, proc, stderr, "second step")
        pool = _job_pool(known)
        replica = _reward_replica("train_job_reward")
        assert pool is not None and replica is not None
        replica.suspend()  # every score sent from now on waits, then times out
        _wait(lambda: any(k.startswith("score_") for k in ray.get(pool.metrics.remote())["drops"]), proc, stderr,
              "failed score counted by the pool")
        with contextlib.suppress(psutil.NoSuchProcess):  # Serve's own health check may have replaced it first
            replica.kill()
        _wait(lambda: _reward_replica("train_job_reward", other_than=replica.pid), proc, stderr, "new replica")

        def saving_at_5_or_later() -> bool:
            return any(int(p.name.rsplit("_", 1)[1]) >= 5 for p in checkpoints.glob("*step_*"))
        worker = _learner_worker()
        _wait(saving_at_5_or_later, proc, stderr, "checkpoint of step 5", poll_s=0.002)
        worker.suspend()  # wherever it is in the save, it writes nothing more
        complete = checkpointing.latest_checkpoint(checkpoints)
        resumed_at = checkpointing.read_cursor(complete)
        before = [int(r["version"]) for r in csv.DictReader((out_dir / "metrics.csv").open())]
        worker.kill()  # SIGKILL: SIGTERM would let Ray's worker finish the save on its training thread
        proc.wait(timeout=600)
    finally:
        proc.kill()
    out, err = stdout.read_text(), stderr.read_text()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"].startswith("10 / 10") and summary["runs"][-1]["learner_restarts"] == 1
    # the failed scores are counted drops (never a made-up reward); nothing else but staleness and the lost
    # versions' samples drops one
    drops = summary["drops"]
    assert drops.get("score_timeout", 0) + drops.get("score_unavailable", 0) >= 1, drops
    assert all(r in ("stale", "lost_weights") or r.startswith("score_") for r in drops), drops
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    restarted = [r for r in rows if r["restarts"] == "1"]
    # resumed from the last checkpoint complete at the kill, and did every later step
    step = resumed_at["step"]
    assert [int(r["step"]) for r in restarted] == list(range(step + 1, 11)), [(r["step"], r["version"]) for r in rows]
    # versions published past that checkpoint were lost with the worker: the restored weights came back above them
    if max(before) > resumed_at["version"]:
        assert int(restarted[0]["version"]) > max(before)
    assert "the learner's worker group was restarted" in out
    assert (checkpoints / "step_00000010").is_dir() and (out_dir / "export" / "generator.safetensors").is_file()


@pytest.mark.job
@pytest.mark.timeout(900)
def test_a_second_sigterm_during_the_stop_abandons_and_the_last_complete_checkpoint_resumes(
        serve_instance, ray_instance, tmp_path):
    """SIGTERM, then another while the learner is still finishing the stop (it is frozen, so the stop cannot
    complete in between): the run is abandoned (exit 130, no stack dump), and the next run resumes from the last
    checkpoint complete when the learner was frozen; a save it cut short is never read."""
    address = ray_instance.get_runtime_context().gcs_address
    out_dir = tmp_path / "run"
    proc, stdout, stderr = start_train(address, out_dir, "learner.num_workers=1", "learner.max_steps=1000",
                                       "learner.checkpoint_every=1")
    checkpoints = out_dir / "checkpoints"
    worker = None
    try:
        _wait(lambda: len(list(checkpoints.glob("step_*"))) >= 2, proc, stderr, "two checkpoints", poll_s=0.1)
        worker = _learner_worker()
        worker.suspend()
        latest = checkpointing.latest_checkpoint(checkpoints)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: "SIGTERM: the learner checkpoints" in stderr.read_text(), proc, stderr, "the first SIGTERM's word")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
        if worker is not None and worker.is_running():
            worker.kill()
    err = stderr.read_text()
    assert proc.returncode == 130 and "abandoned" in err and "Traceback" not in err, err[-3000:]
    assert checkpointing.latest_checkpoint(checkpoints) == latest
    step = checkpointing.read_cursor(latest)["step"]
    resumed = train(address, out_dir, "learner.num_workers=1", f"learner.max_steps={step + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(latest) and summary["steps"] == f"{step + 1} / {step + 1} (1 this run)"
