"""The learner as a Ray Train `TorchTrainer`: one `Learner` per worker, gloo on CPU, NCCL on GPU.

`build_trainer` turns the `learner` config section into Ray Train's scaling, run and failure
configs. The loop state lives in our own checkpoints (learner.checkpointing), so a worker group
that Ray Train restarts after a failure (`learner.max_failures`) resumes from the last one.
Rank 0 reports to an optional `control` actor handle (the job's `job.control.LearnerControl`):
`report(metrics)` every step, `stop_requested()` for a clean stop, `finish(summary)` at the end.
Workers load no text encoder: the negative prompt is encoded once here (`negative_context`) and travels with
the loop config; every sample carries its own prompt's context.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from core.codecs.text_encoder import TextEncoder
from core.config import Config
from core.runtime import resolve_dtype
from learner.loop import Learner


def train_loop_per_worker(loop_config: dict) -> None:
    cfg: Config = loop_config["config"]
    torch.set_num_threads(max(1, int(cfg.learner.cpus_per_worker)))
    device = get_device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    control = loop_config.get("control")
    on_step = (lambda m: control.report.remote(m)) if control is not None else None
    learner = Learner(cfg, device, loop_config["negative_context"], loop_config.get("pool"), control, on_step)
    result = learner.run()
    if control is not None and learner.rank == 0:
        ray.get(control.finish.remote(result | {"export": {k: str(v) for k, v in (result["export"] or {}).items()}}))


def negative_context(cfg: Config, pool: ray.actor.ActorHandle | None = None) -> torch.Tensor:
    """The negative prompt's valid context rows [tokens, text_dim] in the rollout dtype, encoded once for every
    learner worker: by a rollout actor (its text encoder is loaded already, and its samples' contexts come from
    the same encoder), or, training on recorded samples without a pool, here on the CPU."""
    if pool is not None:
        return ray.get(pool.encode.remote([cfg.learner.negative_prompt]))[0]
    encoder = TextEncoder.from_config(cfg, "cpu", resolve_dtype(cfg.runtime.dtype))
    return encoder.encode_valid([cfg.learner.negative_prompt])[0]


def build_trainer(cfg: Config, pool: ray.actor.ActorHandle | None = None,
                  control: ray.actor.ActorHandle | None = None) -> TorchTrainer:
    """A TorchTrainer running the learner; `pool` is the RolloutPool (None with learner.samples_parquet);
    `control` an actor with report / stop_requested / finish (job.control.LearnerControl), or None."""
    learner = cfg.learner
    if pool is None and not learner.samples_parquet:
        raise ValueError("the learner needs a RolloutPool, or learner.samples_parquet to train on recorded samples")
    output_dir = Path(learner.output_dir).resolve()
    resources = {"CPU": learner.cpus_per_worker} | ({"GPU": 1} if learner.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        # the config's paths are absolute (resolved when it was loaded): workers run in their own working directories
        train_loop_config={"config": cfg, "pool": pool, "control": control,
                           "negative_context": negative_context(cfg, pool)},
        scaling_config=ScalingConfig(num_workers=learner.num_workers, use_gpu=learner.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if learner.use_gpu else "gloo"),
        run_config=RunConfig(name="learner", storage_path=str(output_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=learner.max_failures)),
    )
