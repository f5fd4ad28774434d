"""The distillation job (`launch.py train`): reward service + rollout actors + learner, start to clean stop.

Order: validate the config against the cluster's resources, deploy the reward service on Ray
Serve, create the actor pool (from the latest checkpoint's prompt cursor when resuming), run the
learner under Ray Train in a background thread and follow it from here: every step's metrics
go to `metrics.csv`, TensorBoard and a live progress bar, and every `video_every` steps one
rollout's video is written. Each start-up phase is printed with its duration as it ends. Ctrl-C
or SIGTERM asks the learner for a clean stop (it checkpoints at the end of the current
iteration and exports); a second one abandons the run. Everything started here is shut down at
the end, and a summary says where everything was written; summary.json keeps every run made
in the folder. A folder whose run already reached learner.max_steps is reported, not rerun
(`finished_run`). With `serve_stream` (`launch.py train --serve`), the streaming app is deployed beside the
reward service, following the pool's weight versions (serve/follow.py), and its URL is printed.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from ray import serve
from tensorboardX import SummaryWriter
from tqdm import tqdm

from actors.pool import RolloutPool
from core.algo.distill import DIAGNOSTICS
from core.config import Config, ConfigError
from job.cluster import start_ray, start_serve
from job.control import LearnerControl
from job.signals import StopSignal
from learner import checkpointing
from learner.trainer import build_trainer
from reward_service.app import build_app
from serve.app import build_app as build_stream_app
from serve.follow import PoolVersions

COLUMNS = ("step", "version", "generator_step", "generator_loss", "critic_loss", "reward", "reward_weight", "staleness",
           "dmd_grad_norm", "samples", "sample_wait_s", "iteration_s", "publish_s", "queue_depth", "in_flight",
           "delivered", "dropped", "restarts", "steps_redone", "wall_s", *DIAGNOSTICS)


def required_resources(cfg: Config, serve_stream: bool = False) -> dict[str, float]:
    """CPUs and GPUs the job asks Ray for at its start (with the following streaming app when `serve_stream`)."""
    svc, a, learner, stream = cfg.reward_service, cfg.actors, cfg.learner, cfg.serve
    cpus = svc.num_cpus * svc.min_replicas + a.num_cpus * a.num_actors + learner.cpus_per_worker * learner.num_workers
    gpus = svc.num_gpus * svc.min_replicas + a.num_gpus * a.num_actors + (learner.num_workers if learner.use_gpu else 0)
    if serve_stream:
        cpus, gpus = cpus + stream.num_cpus * stream.min_replicas, gpus + stream.num_gpus * stream.min_replicas
    return {"CPU": cpus, "GPU": gpus}


def check_resources(cfg: Config, available: dict[str, float], serve_stream: bool = False) -> None:
    """One clear error for a job this cluster cannot place (CPU/GPU totals, GPU settings on a CPU-only run)."""
    problems = []
    if cfg.runtime.device == "cpu" and (cfg.actors.num_gpus > 0 or cfg.learner.use_gpu):
        problems.append("runtime.device is cpu but actors.num_gpus > 0 or learner.use_gpu is set: "
                        "use runtime.device=cuda (or auto), or drop the GPU requests")
    if serve_stream and cfg.actors.num_gpus > 0 and cfg.serve.num_gpus == 0:
        problems.append("--serve beside rollout actors on GPUs, but serve.num_gpus is 0: the streaming replica would "
                        "run the generator on a CPU; set serve.num_gpus=1 (and serve.presets to sizes the model serves)")
    need = required_resources(cfg, serve_stream)
    for kind, amount in need.items():
        have = available.get(kind, 0.0)
        if amount > have + 1e-9:
            unit = "num_" + kind.lower() + "s"
            stream = (f", streaming app {cfg.serve.min_replicas} x {getattr(cfg.serve, unit)} (serve.{unit})"
                      if serve_stream else "")
            problems.append(f"the job needs {amount:g} {kind} (reward_service {cfg.reward_service.min_replicas} x "
                            f"{getattr(cfg.reward_service, unit)}, actors {cfg.actors.num_actors} x "
                            f"{getattr(cfg.actors, unit)}, learner {cfg.learner.num_workers} workers{stream}) "
                            f"but the Ray cluster has {have:g}: lower actors.num_actors / actors.num_{kind.lower()}s / "
                            "learner.num_workers, or add nodes (pass --wait-for-resources on an autoscaling cluster)")
    if problems:
        raise ConfigError("impossible resource request:\n  " + "\n  ".join(problems))


class MetricsLog:
    """Per-step metrics as CSV (appended as they come), TensorBoard events, and Parquet at close."""

    def __init__(self, out: Path):
        self.csv_path, self.parquet_path, self.tb_dir = out / "metrics.csv", out / "metrics.parquet", out / "tensorboard"
        new = not self.csv_path.exists()
        self.file = self.csv_path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, COLUMNS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        self.tb = SummaryWriter(str(self.tb_dir))
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        self.csv.writerow(row)
        self.file.flush()
        for key in COLUMNS[1:]:
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
                self.tb.add_scalar(key, row[key], row["step"])
        self.rows.append({k: row.get(k) for k in COLUMNS})

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.rows:
            pq.write_table(pa.Table.from_pylist([{k: (float(v) if v is not None else None) for k, v in r.items()}
                                                 for r in self.rows]), self.parquet_path)


def _resume_cursor(cfg: Config) -> dict | None:
    """The latest checkpoint's cursor (step and prompt cursor; a few bytes), when the run resumes."""
    if not cfg.learner.resume:
        return None
    latest = checkpointing.latest_checkpoint(checkpointing.checkpoint_dir(cfg.learner.output_dir))
    return checkpointing.read_cursor(latest) if latest else None


def finished_run(cfg: Config) -> str | None:
    """What to tell a user whose learner.output_dir already holds a run at or past learner.max_steps (there is
    nothing to do), else None. Reads a few bytes; starts nothing."""
    resume = _resume_cursor(cfg)
    if resume is None or resume["step"] < cfg.learner.max_steps:
        return None
    out = cfg.learner.output_dir
    return (f"{out} already holds a run at step {resume['step']} (learner.max_steps={cfg.learner.max_steps}): nothing "
            f"to do. Its results: {Path(out) / 'summary.json'}. To train further, raise learner.max_steps (the run "
            f"resumes from step {resume['step']}); to start again, pass --fresh (sets {out} aside) or another "
            "learner.output_dir.")


def set_aside(out: str | Path) -> Path | None:
    """Rename an existing output folder to `<name>.<time>` so a fresh run starts empty; the new name, or None."""
    out = Path(out)
    if not out.exists():
        return None
    aside = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    return aside


STREAM_CLOSE_S = 10.0  # a stream's own deadline closes it this long before the shared proxy would cut it


def _proxy_timeout_s(cfg: Config, serve_stream: bool) -> float:
    """Serve's HTTP proxy bounds every request with one timeout (WebSockets too): reward_service.request_timeout_s,
    or with the streaming app beside it, long enough for a stream to reach its own deadline (serve.stream_timeout_s)
    and be closed by the app, with its reason. The actors score through a handle (actors.score_timeout_s), which
    the proxy's timeout does not bound."""
    timeout = cfg.reward_service.request_timeout_s
    return max(timeout, cfg.serve.stream_timeout_s + STREAM_CLOSE_S) if serve_stream else timeout


def _deploy_reward_service(cfg: Config, serve_stream: bool) -> str:
    svc, name = cfg.reward_service, cfg.actors.reward_app
    start_serve(svc.host, svc.port, _proxy_timeout_s(cfg, serve_stream), section="reward_service")
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    return name


TREND = 10  # steps in the progress line's running mean of the reward


def _progress_line(row: dict, pool_metrics: dict, elapsed: float, rewards: list[float]) -> dict:
    """What the bar shows; `reward~10` is the mean reward of the last TREND steps, the trend a single sample hides."""
    recent = rewards[-TREND:]
    post = {"v": row["version"], f"reward~{TREND}": f"{sum(recent) / len(recent):.3f}",
            "critic": f"{row['critic_loss']:.4f}",
            "samples/s": f"{pool_metrics.get('delivered', 0) / max(elapsed, 1e-9):.2f}", "stale": f"{row['staleness']:.1f}",
            "queue": pool_metrics.get("queue_depth", 0), "drops": sum(pool_metrics.get("drops", {}).values())}
    if "generator_loss" in row:
        post["gen"] = f"{row['generator_loss']:.4g}"
    return post


class StartUp:
    """Prints each start-up phase as it ends, with its duration: where the first minute goes."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"start-up: {what} ({now - self.last:.1f} s)", flush=True)
        self.last = now

    def total_s(self) -> float:
        return time.monotonic() - self.t0


def _learner_ready(info: dict, workers: int) -> str:
    resumed = f", resumed from step {info['step']}" if info["resumed_from"] else ""
    if info.get("resume_changes"):
        resumed += f"; the config's optimizer settings replace the checkpoint's: {'; '.join(info['resume_changes'])}"
    return (f"learner ready: Ray Train started {workers} worker(s), which built the models and DeepSpeed engines in "
            f"{info['build_s']:.1f} s (torch AdamW: no DeepSpeed op is compiled){resumed}")


def _deploy_stream(cfg: Config, pool: ray.actor.ActorHandle, pool_name: str) -> str:
    """The streaming app on the job's Serve, following `pool`'s weight versions; its URL (reward service's proxy)."""
    serve.run(build_stream_app(cfg, follow=PoolVersions(pool, pool_name)), name=cfg.serve.app_name,
              route_prefix=cfg.serve.route_prefix)
    svc = cfg.reward_service
    return f"http://{svc.host}:{svc.port}{cfg.serve.route_prefix.rstrip('/')}/"


def run(cfg: Config, address: str | None = None, wait_for_resources: bool = False,
        config_path: str | None = None, serve_stream: bool = False) -> dict | None:
    """Run the whole job; returns the end-of-run summary (None when stopped before the learner started). With
    `serve_stream`, a streaming app follows the weight versions as they are published."""
    phases = StartUp()
    cfg.check_paths()
    out = Path(cfg.learner.output_dir).resolve()
    cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"output_dir": str(out)})})
    resume = _resume_cursor(cfg)
    start_step = resume["step"] if resume else 0
    phases.done(f"config checked, {'resuming from step ' + str(start_step) if resume else 'a new run'} in {out}")
    connected_here = start_ray(address, log_to_driver=False)
    stop = StopSignal("the learner checkpoints at the end of this iteration and stops").install()
    joined = (address or os.environ.get("RAY_ADDRESS")) not in (None, "local") or not connected_here
    phases.done("Ray cluster joined" if joined else "Ray started")
    app = stream_app = pool = control = bar = metrics_log = None
    fit: dict = {}
    done = threading.Event()  # not Thread.join: a join interrupted by a signal can mark a live thread as stopped
    t0, stop_sent, pool_metrics, rewards, summary = time.monotonic(), False, {}, [], None
    abandoned = False  # a second signal: leave now, without the clean stop's waits
    try:
        if not wait_for_resources:
            check_resources(cfg, ray.cluster_resources(), serve_stream)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), allow_unicode=True, sort_keys=False))
        app = _deploy_reward_service(cfg, serve_stream)
        phases.done(f"reward service ({cfg.reward.backend}) deployed on Ray Serve")
        if stop.requested.is_set():
            return None
        pool_name = f"rollout-{int(time.time())}"
        pool = RolloutPool.options(name=pool_name).remote(cfg, pool_name, resume["prompt_state"] if resume else None)
        ready = pool.ready.remote()
        while not ray.wait([ready], timeout=1.0)[0]:  # actors may wait for resources: a signal still stops it
            if stop.requested.is_set():
                return None
        ray.get(ready)
        phases.done(f"{cfg.actors.num_actors} rollout actor(s) ready (generator, text encoder, codec loaded)")
        if stop.requested.is_set():
            return None
        if serve_stream:
            stream_app = cfg.serve.app_name
            url = _deploy_stream(cfg, pool, pool_name)
            phases.done(f"streaming app following the training: open {url}")
            if stop.requested.is_set():
                return None
        control = LearnerControl.remote()

        def learn() -> None:
            try:
                fit["result"] = build_trainer(cfg, pool, control).fit()
            except Exception as e:  # noqa: BLE001 - reported below with the learner's own message
                fit["error"] = e
            finally:
                done.set()

        thread = threading.Thread(target=learn, daemon=True)
        metrics_log = MetricsLog(out)
        (out / "videos").mkdir(exist_ok=True)
        thread.start()
        restarts = 0  # the learner's restart count so far (a resumed run brings its earlier ones)
        while not done.is_set():
            if stop.wait(1.0) and not stop_sent:
                ray.get(control.request_stop.remote())
                stop_sent = True
            if bar is None:
                info = ray.get(control.readiness.remote())
                if info is None:
                    continue
                phases.done(_learner_ready(info, cfg.learner.num_workers))
                restarts = info["restarts"]
                print(f"start-up took {phases.total_s():.1f} s; training (the rate and ETA below count training "
                      "only)", flush=True)
                t0 = time.monotonic()
                bar = tqdm(total=cfg.learner.max_steps, initial=info["step"], unit="step", desc="train",
                           dynamic_ncols=True)
            rows = ray.get(control.drain.remote())
            if not rows:
                continue
            pool_metrics = ray.get(pool.metrics.remote())
            for row in rows:
                row |= {"queue_depth": pool_metrics["queue_depth"], "in_flight": pool_metrics["in_flight"],
                        "delivered": pool_metrics["delivered"], "dropped": sum(pool_metrics["drops"].values()),
                        "wall_s": time.monotonic() - t0}
                metrics_log.write(row)
                if row["restarts"] > restarts:
                    restarts = row["restarts"]
                    bar.write(f"the learner's worker group was restarted: it resumed from its last checkpoint, "
                              f"redoing {row['steps_redone']} step(s) so far; samples of the lost weights dropped: "
                              f"{pool_metrics['drops'].get('lost_weights', 0)}")
                if cfg.learner.video_every and row["step"] % cfg.learner.video_every == 0:
                    pool.request_video.remote(str(out / "videos" / f"step_{row['step']:06d}_v{row['version']}.mp4"))
                bar.update(row["step"] - bar.n)
                rewards.append(row["reward"])
                bar.set_postfix(_progress_line(row, pool_metrics, time.monotonic() - t0, rewards))
        for row in ray.get(control.drain.remote()):  # the last steps, reported while the thread ended
            metrics_log.write(row | {"wall_s": time.monotonic() - t0})
        if bar is not None:
            bar.close()
        pool_metrics = ray.get(pool.metrics.remote())
        summary = ray.get(control.summary.remote())
        if summary is None:
            error = fit.get("error") or getattr(fit.get("result"), "error", None)
            raise RuntimeError(f"the learner failed: {error}") from error
    except KeyboardInterrupt:
        abandoned = True
        raise
    finally:
        if bar is not None:
            bar.close()
        if metrics_log is not None:
            metrics_log.close()
        if stream_app is not None:  # before the pool: its follower would see the pool vanish
            serve.delete(stream_app)
        if pool is not None:
            if not abandoned:  # an abandoned run does not wait for the actors' in-flight work
                ray.get(pool.stop.remote())
            ray.kill(pool)
        if app is not None:  # a Serve app outlives this driver on a joined cluster
            serve.delete(app)
        # a local Ray started here stops; a joined cluster only loses this driver. Not when abandoned: the learner
        # thread is still inside a Ray call, and Ray ends the whole process (exit 1) when a call meets a shut-down
        # worker; the caller exits right after
        if connected_here and not abandoned:
            ray.shutdown()
    return _summary(cfg, out, summary, pool_metrics, metrics_log, time.monotonic() - t0, start_step,
                    stop.name if stop_sent else None, config_path)


def _summary(cfg: Config, out: Path, learner: dict, pool: dict, log: MetricsLog, wall_s: float, start_step: int,
             stopped_by: str | None, config_path: str | None) -> dict:
    """The run summary, also written to summary.json. A resumed run adds itself to the folder's earlier runs
    (`runs`); the latest reward and critic loss (`final`) are those of the last run that trained."""
    path = out / "summary.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    last = learner.get("last_metrics") or {}
    steps_run = learner["step"] - start_step
    final = {k: round(last[k], 5) for k in ("reward", "critic_loss") if k in last}
    this_run = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stopped": f"{stopped_by} (checkpointed)" if stopped_by else ("early" if learner["stopped_early"] else "max_steps"),
        "steps": f"{start_step} -> {learner['step']}",
        "training_s": round(wall_s, 1),
        "steps_per_s": round(steps_run / max(wall_s, 1e-9), 3),
        "samples_delivered": pool.get("delivered"),
        "drops": pool.get("drops"),
        "learner_restarts": last.get("restarts", 0),
        "final": final,
    }
    summary = {
        "config": config_path or "configs/tiny.yaml (embedded default)",
        "stopped": this_run["stopped"],
        "steps": f"{learner['step']} / {cfg.learner.max_steps} ({steps_run} this run)",
        "resumed_from": learner["resumed_from"],
        "weight_version": learner["version"],
        "training_s": this_run["training_s"],
        "steps_per_s": this_run["steps_per_s"],
        "samples_delivered": pool.get("delivered"),
        "drops": pool.get("drops"),
        "final": final or earlier.get("final", {}),
        "checkpoints": str(checkpointing.checkpoint_dir(out)),
        "export": learner["export"],
        "metrics": {"csv": str(log.csv_path), "parquet": str(log.parquet_path), "tensorboard": str(log.tb_dir)},
        "videos": earlier.get("videos", []) + pool.get("videos", []),
        "runs": earlier.get("runs", []) + [this_run],
    }
    path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("\n" + "=" * 78 + "\nrun summary\n" + "-" * 78)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif key == "runs":
            value = f"{len(value)} in this folder (summary.json lists each)"
        elif isinstance(value, list):
            value = f"{len(value)} files" + (f", last {value[-1]}" if value else "")
        print(f"{key:<{width}}  {value}")
    print("=" * 78)
