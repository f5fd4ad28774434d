"""The learner's iteration loop on one Ray Train worker: critic and generator updates, EMA, publish, checkpoint.

Per iteration each worker takes `batch_size` samples (its own, from the pool or a Parquet file).
On every `dfake_gen_update_ratio`-th iteration, starting with the first (Self Forcing's order),
the generator replays the samples' exit steps with grad and takes one Re-DMD update; the new
weights go into the fp32 EMA (from `ema_start_step`) and are published as the next version.
Then the critic takes one flow-matching update on the detached samples. The math is in
`core.algo.distill`; this module only sequences it, averages the metrics over workers and keeps
the loop state that a checkpoint must restore.

A learner loads no text encoder: each sample carries its prompt's context rows as the actor encoded them
(`Sample.text_context`), padded back here exactly as `TextEncoder.encode` pads (`pad_context`), and the
negative prompt's rows come with the worker's config, encoded once for the whole job (`learner.trainer`).

When Ray Train restarts the worker group after a failure (`learner.max_failures`), the new group resumes
from the last checkpoint. The pool may already hold versions the lost group published past it: the restored
weights are then republished under a new, higher version (`RolloutPool.learner_started`), the samples of the
lost versions are dropped, and the metrics count the restart and the steps it redoes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
import torch.distributed as dist

from core.algo.distill import DIAGNOSTICS, ReDMD
from core.algo.ema import EMA
from core.algo.losses import reward_weights
from core.codecs.text_encoder import pad_context
from core.config import Config
from core.records.sample import Sample
from core.runtime import resolve_dtype
from learner import checkpointing
from learner.engines import Models, build_models, full_weights
from learner.samples import ParquetSamples, PoolSamples
from weight_sync import WeightPublisher, lineage_staleness

# Averaged over workers each iteration; the last entry carries rank 0's stop request to every rank.
_REDUCED = ("generator_loss", "critic_loss", "reward", "reward_weight", "staleness", "dmd_grad_norm", *DIAGNOSTICS,
            "stop")


class Learner:
    def __init__(self, cfg: Config, device: torch.device, negative_context: torch.Tensor, pool=None, control=None,
                 on_step: Callable[[dict], None] | None = None):
        """`negative_context`: the negative prompt's valid rows [tokens, text_dim] (`TextEncoder.encode_valid`),
        encoded once by the job."""
        self.cfg, self.learner = cfg, cfg.learner
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.pool, self.control, self.on_step = pool, control, on_step
        if self.learner.deterministic:
            torch.use_deterministic_algorithms(True)
        seed = cfg.runtime.seed
        torch.manual_seed(seed)
        start = time.perf_counter()
        self.models: Models = build_models(cfg, device)
        self.build_s = time.perf_counter() - start
        self.distill = ReDMD(cfg)
        self.negative_context = self._padded(negative_context)
        self.rng = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        self.samples = (ParquetSamples(self.learner.samples_parquet, self.rank, self.world_size)
                        if self.learner.samples_parquet else PoolSamples(pool, self.learner.sample_timeout_s))
        self.publisher = self._publisher(pool) if pool is not None and self.rank == 0 else None
        self.step, self.version, self.ema = 0, 0, None
        self.restarts: list[tuple[int, int]] = []  # the pool's (restored, republished as) versions
        self.counters = {"samples": 0, "generator_updates": 0, "publish_s": 0.0, "restarts": 0, "steps_redone": 0}
        self.root = checkpointing.checkpoint_dir(self.learner.output_dir)
        self.last_saved: int | None = None
        self.resume_changes: list[str] = []  # optimizer settings the config changed on resume

    def _publisher(self, pool) -> WeightPublisher:
        gpus = self.device.type == "cuda" and self.cfg.actors.num_gpus > 0
        return WeightPublisher(pool, resolve_dtype(self.cfg.runtime.dtype), self.learner.publish_backend == "broadcast",
                               "nccl" if gpus else "gloo", self.learner.broadcast_timeout_s)

    # -------------------------------------------------------------------------------- state

    def _rng_state(self) -> dict:
        return {"learner": self.rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()}

    def _loop_state(self) -> dict:
        return {"step": self.step, "version": self.version, "ema": self.ema.state_dict() if self.ema else None,
                "counters": dict(self.counters), "world_size": self.world_size, "config": self.cfg.model_dump()}

    def _cursor(self) -> dict:
        """Where the run stands, for the driver: the step and the pool's prompt cursor (None without a pool)."""
        return {"step": self.step, "version": self.version,
                "prompt_state": ray.get(self.pool.state.remote()) if self.pool is not None else None}

    def save(self) -> Path:
        engines = {"generator": self.models.generator, "critic": self.models.critic}
        state, cursor = (self._loop_state(), self._cursor()) if self.rank == 0 else (None, None)
        path = checkpointing.save(self.root, self.step, engines, state, cursor, self._rng_state(), self.learner.keep_last)
        self.last_saved = self.step
        return path

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Restore the latest complete checkpoint (or `path`); returns what was loaded."""
        path = Path(path) if path else checkpointing.latest_checkpoint(self.root)
        if path is None:
            return None
        engines = {"generator": self.models.generator, "critic": self.models.critic}
        state, rng = checkpointing.load(path, engines)
        self.resume_changes = self._apply_optimizer_settings(engines)
        self.step, self.version = state["step"], state["version"]
        self.counters |= state["counters"]
        self.ema = EMA.from_state_dict(state["ema"]) if state["ema"] else None
        if rng is not None and state["world_size"] == self.world_size:
            self.rng.set_state(rng["learner"])
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        self.last_saved = self.step
        return path

    def _apply_optimizer_settings(self, engines: dict) -> list[str]:
        """The config's learning rate, betas and weight decay on the restored optimizers (a checkpoint's own would
        otherwise silently win over the resumed run's config); returns what changed, to be printed."""
        learner = self.learner
        wanted = {"generator": learner.generator_lr, "critic": learner.critic_lr}
        changes = []
        for tag, engine in engines.items():
            settings = {"lr": wanted[tag], "betas": tuple(learner.betas), "weight_decay": learner.weight_decay}
            for key, value in settings.items():
                old = {tuple(g[key]) if key == "betas" else g[key] for g in engine.optimizer.param_groups}
                if old != {value}:
                    changes.append(f"{tag} {key} {', '.join(map(str, sorted(old)))} -> {value}")
                for group in engine.optimizer.param_groups:
                    group[key] = value
        return changes

    # -------------------------------------------------------------------------------- updates

    def _padded(self, rows: torch.Tensor) -> torch.Tensor:
        """[1, text_len, text_dim] in the learner's device and dtype from a prompt's valid context rows."""
        if rows.dim() != 2 or rows.shape[1] != self.cfg.model.text_dim:
            raise ValueError(f"a text context of shape {tuple(rows.shape)} does not fit model.text_dim "
                             f"{self.cfg.model.text_dim}: the samples were made with another text encoder")
        return pad_context([rows], self.cfg.model.text_len).to(self.device, self.models.dtype)

    def _context(self, sample: Sample) -> torch.Tensor:
        return self._padded(sample.text_context)

    def _record(self, sample: Sample):
        record = sample.to_rollout_record(self.device)
        for b in record.blocks:
            b.noisy, b.clean = b.noisy.to(self.models.dtype), b.clean.to(self.models.dtype)
            if b.context_input is not None:
                b.context_input = b.context_input.to(self.models.dtype)
        return record

    def generator_update(self, samples: list[Sample]) -> dict[str, float]:
        rewards = torch.tensor([s.rewards_normalized[self.learner.reward_axis] for s in samples], dtype=torch.float64)
        weights = reward_weights(rewards, self.learner.beta, self.learner.reward_weight_clip,
                                 self.learner.reward_weight_normalize)
        engine, m = self.models.generator, self.models
        measured: list[dict[str, float]] = []
        for i, sample in enumerate(samples):  # micro batches of one video; DeepSpeed accumulates and steps once
            context = self._context(sample)
            record = self._record(sample)
            x = self.distill.replay(m.generator_module, record, context)
            loss, stats = self.distill.generator_loss(x, m.critic_module, m.teacher, context, self.negative_context,
                                                      weights[i:i + 1], self.rng, [sample.prompt])
            if hasattr(m.teacher, "true_samples"):  # before the critic learns these samples in this iteration
                stats.update(self.distill.critic_fit(m.critic_module, m.teacher, record.clean_latents(), context,
                                                     [sample.prompt], self.rng))
            engine.backward(loss)
            engine.step()
            measured.append({"generator_loss": loss.item(), **stats})
        self.version += 1
        self.counters["generator_updates"] += 1
        self._after_generator_update()
        means = {k: float(np.mean([s[k] for s in measured if k in s])) for k in {k for s in measured for k in s}}
        return {**means, "reward_weight": float(weights.mean())}

    def _after_generator_update(self) -> None:
        """EMA (from ema_start_step, fp32) and publication of the new version, both from rank 0."""
        weights = full_weights(self.models.generator, self.learner.zero_stage)  # collective under ZeRO-3
        if self.rank != 0:
            return
        if self.step >= self.learner.ema_start_step:
            if self.ema is None:
                self.ema = EMA(weights, self.learner.ema_decay)
            else:
                self.ema.update(weights)
        self._publish(weights, self.step + 1)  # made by the step now running (steps count from 1 in the metrics)

    def _publish(self, weights: dict[str, torch.Tensor] | None, step: int) -> None:
        if self.publisher is None or self.rank != 0:
            return
        published = self.ema.shadow if self.learner.publish_weights == "ema" and self.ema else weights
        self.counters["publish_s"] += self.publisher.publish(self.version, published, step)

    def critic_update(self, samples: list[Sample]) -> dict[str, float]:
        engine, losses = self.models.critic, []
        for sample in samples:
            clean = sample.clean.to(self.device, self.models.dtype)
            loss, _ = self.distill.critic_loss(self.models.critic_module, clean, self._context(sample), self.rng)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return {"critic_loss": float(np.mean(losses))}

    # -------------------------------------------------------------------------------- loop

    def _stop_requested(self) -> bool:
        if self.control is None or self.rank != 0:
            return False
        return bool(ray.get(self.control.stop_requested.remote()))

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over workers of each reduced metric (the stop flag becomes 'any rank stops')."""
        t = torch.tensor([values.get(k, float("nan")) for k in _REDUCED], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return dict(zip(_REDUCED, t.tolist()))

    def iteration(self) -> dict[str, float]:
        start = time.perf_counter()
        samples = self.samples.next(self.step, self.learner.batch_size)
        wait_s = time.perf_counter() - start
        self.counters["samples"] += len(samples)
        values = {"reward": float(np.mean([s.rewards_normalized[self.learner.reward_axis] for s in samples])),
                  "staleness": float(np.mean([lineage_staleness(self.version, s.weight_version, self.restarts)
                                              for s in samples]))}
        generator_step = self.step % self.learner.dfake_gen_update_ratio == 0
        if generator_step:
            values.update(self.generator_update(samples))
        values.update(self.critic_update(samples))
        values["stop"] = float(self._stop_requested())
        metrics = {k: v for k, v in self._reduce(values).items() if v == v}  # NaN: not measured this iteration
        self.step += 1
        metrics.update(step=self.step, version=self.version, generator_step=generator_step,
                       sample_wait_s=wait_s, iteration_s=time.perf_counter() - start, **self.counters)
        return metrics

    def _start(self, resumed: Path | None) -> None:
        """Join the pool's line of weight versions (republishing the restored weights when the actors lack them)
        and tell the driver this learner is ready; then the pool's actors start."""
        start = [None]
        if self.rank == 0:
            line = ray.get(self.pool.learner_started.remote(self.version)) if self.pool is not None else None
            restart = {"restart": False, "steps_redone": 0}
            if self.control is not None:
                restart = ray.get(self.control.ready.remote({
                    "step": self.step, "version": line["version"] if line else self.version, "workers": self.world_size,
                    "resumed_from": str(resumed) if resumed else None, "resume_changes": self.resume_changes,
                    "build_s": round(self.build_s, 2),
                    "restarts": self.counters["restarts"]}))
            start = [(line, restart)]
        if self.world_size > 1:
            dist.broadcast_object_list(start, src=0)
        line, restart = start[0]
        if restart["restart"]:  # this worker group replaces a lost one
            self.counters["restarts"] += 1
            self.counters["steps_redone"] += restart["steps_redone"]
        if line is not None:
            self.version, self.restarts = line["version"], [tuple(r) for r in line["restarts"]]
            if line["publish"]:  # a resumed run's weights (or a restart's, under its new version)
                self._publish(full_weights(self.models.generator, self.learner.zero_stage), self.step)
            if self.rank == 0:
                ray.get(self.pool.start.remote())

    def run(self) -> dict:
        """Train to learner.max_steps (or until a stop is requested), checkpointing on the way and at the end."""
        resumed = self.resume() if self.learner.resume else None
        self._start(resumed)
        metrics: dict = {}
        while self.step < self.learner.max_steps:
            metrics = self.iteration()
            if self.on_step is not None and self.rank == 0:
                self.on_step(metrics)
            if metrics["stop"] > 0:  # a clean stop: checkpoint below and return
                break
            if self.step % self.learner.checkpoint_every == 0:
                self.save()
        if self.last_saved != self.step:
            self.save()
        export = None
        if self.rank == 0:
            export = checkpointing.export_weights(checkpointing.latest_checkpoint(self.root),
                                                  Path(self.learner.output_dir) / "export")
        return {"step": self.step, "version": self.version, "resumed_from": str(resumed) if resumed else None,
                "stopped_early": self.step < self.learner.max_steps, "export": export, "last_metrics": metrics}
