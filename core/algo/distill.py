"""One Re-DMD iteration's math: the generator's replayed loss and the critic's flow loss.

The learner holds three models: the causal generator (trainable), the critic / fake score
(bidirectional, trainable) and the teacher / real score (bidirectional, frozen). A rollout
sample (core.records.sample) carries each block's exit-step input; `ReDMD.replay` recomputes the
exit-step predictions with grad, which is Self Forcing's generator output and gradient
(docs/architecture.md). The generator loss compares critic and teacher (CFG with the negative prompt)
at a random noise level and weights each video by exp(beta * reward); the critic learns
the flow of the detached samples. Optimisers, sharding and orchestration live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.algo.losses import critic_loss, dmd_gradient, noisy_latent, training_timesteps, weighted_dmd_loss
from core.algo.rollout import RolloutRecord, SelfForcedRollout
from core.algo.scheduler import FlowMatchScheduler
from core.config import TEACHER_KINDS, Config, ConfigError, LearnerConfig
from core.model.wan import CausalWanModel, WanModel
from core.records.checkpoint import WanBuild, materialise, reader


def predict_x0(model: torch.nn.Module, sched: FlowMatchScheduler, x_t: torch.Tensor, t: torch.Tensor,
               context: torch.Tensor | list[str]) -> torch.Tensor:
    """x0 prediction of a bidirectional Wan for x_t [B, F, C, H, W] at per-frame timesteps t [B, F]."""
    b, f = x_t.shape[:2]
    flow = model(x_t.transpose(1, 2), t, context).transpose(1, 2)
    return sched.x0_from_flow(flow.flatten(0, 1), x_t.flatten(0, 1), t.flatten()).unflatten(0, (b, f))


class ReDMD:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.learner: LearnerConfig = cfg.learner
        self.scheduler = FlowMatchScheduler.from_config(cfg.scheduler)
        self.rollout_timesteps = self.scheduler.denoising_timesteps(cfg.scheduler.denoising_step_list,
                                                                    cfg.scheduler.warp_denoising_step)
        shift = self.learner.timestep_shift
        self.draws = self.scheduler if shift is None else FlowMatchScheduler(shift, cfg.scheduler.num_train_timesteps)

    def _timesteps(self, batch: int, frames: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        t_raw = torch.randint(0, self.scheduler.num_train_timesteps, (batch, 1), generator=rng)
        return training_timesteps(self.draws, t_raw, frames, self.learner.min_timestep,
                                  self.learner.max_timestep).to(device)

    @staticmethod
    def _noise(like: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=rng, dtype=torch.float32).to(like.device, like.dtype)

    def replay(self, generator: CausalWanModel, record: RolloutRecord, context: torch.Tensor) -> torch.Tensor:
        """The sample's exit-step predictions [B, F, C, H, W], with grad w.r.t. the generator's weights."""
        rollout = SelfForcedRollout(generator, self.scheduler, self.rollout_timesteps, self.cfg.scheduler.context_noise)
        noisy = record.blocks[0].noisy
        cache = generator.init_cache(noisy.shape[0], tuple(noisy.shape[-2:]), device=noisy.device, dtype=noisy.dtype)
        return rollout.replay_exit_steps(record, context, cache)

    def generator_loss(self, x: torch.Tensor, critic: WanModel, teacher: torch.nn.Module, context: torch.Tensor,
                       negative_context: torch.Tensor, weights: torch.Tensor, rng: torch.Generator,
                       prompts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Re-DMD loss of the replayed sample x (weights = exp(beta * reward) per video); `context` embeds
        `prompts`, which a teacher reading text gets instead. With guidance_scale 0 the teacher runs once."""
        b, f = x.shape[:2]
        t = self._timesteps(b, f, rng, x.device)
        guidance = self.learner.guidance_scale
        with torch.no_grad():
            x_t = noisy_latent(self.scheduler, x.detach(), self._noise(x, rng), t)
            pred_fake = predict_x0(critic, self.scheduler, x_t, t, context)
            pred_cond = predict_x0(teacher, self.scheduler, x_t, t, teacher_context(teacher, context, prompts))
            pred_uncond = pred_cond if guidance == 0 else predict_x0(
                teacher, self.scheduler, x_t, t,
                teacher_context(teacher, negative_context, [self.learner.negative_prompt] * b))
            grad = dmd_gradient(x.detach(), pred_fake, pred_cond, pred_uncond, guidance)
        loss = weighted_dmd_loss(x, grad, weights)
        stats = {"dmd_grad_norm": float(grad.abs().mean()), "dmd_timestep": float(t[:, 0].mean())}
        if hasattr(teacher, "world_cosine"):  # a teacher that knows the true distribution can say where x should go
            stats.update(banded("dmd_world_cosine", teacher.world_cosine(x.detach(), grad, prompts), t[:, 0]))
        return loss, stats

    def critic_fit(self, critic: WanModel, teacher: torch.nn.Module, student: torch.Tensor, context: torch.Tensor,
                   prompts: list[str], rng: torch.Generator) -> dict[str, float]:
        """Does the critic model the student? The flow losses of critic and teacher on fresh student samples
        [B, F, C, H, W] and on true clips of the same prompts (from a teacher that can draw them,
        `teacher.true_samples`), all at the same noise and timesteps. The DMD gradient (critic minus teacher) points
        somewhere useful only where the critic fits the student's samples better than the teacher does; on the true
        clips the teacher's loss is the floor no model beats."""
        student = student.detach()
        b, f = student.shape[:2]
        true = teacher.true_samples(prompts, f, rng).to(student.device, student.dtype)
        t = self._timesteps(b, f, rng, student.device)
        noise = self._noise(student, rng)
        out = {}
        with torch.no_grad():
            for data, clean in (("student", student), ("true", true)):
                x_t = noisy_latent(self.scheduler, clean, noise, t)
                for name, model, ctx in (("critic", critic, context),
                                         ("teacher", teacher, teacher_context(teacher, context, prompts))):
                    pred_x0 = predict_x0(model, self.scheduler, x_t, t, ctx)
                    out[f"{name}_fit_{data}"] = float(critic_loss(self.scheduler, clean, noise, t, pred_x0))
        return out

    def critic_loss(self, critic: WanModel, clean: torch.Tensor, context: torch.Tensor,
                    rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of the critic on detached generator samples clean [B, F, C, H, W]."""
        clean = clean.detach()
        b, f = clean.shape[:2]
        t = self._timesteps(b, f, rng, clean.device)
        noise = self._noise(clean, rng)
        pred_x0 = predict_x0(critic, self.scheduler, noisy_latent(self.scheduler, clean, noise, t), t, context)
        return critic_loss(self.scheduler, clean, noise, t, pred_x0), {"critic_timestep": float(t[:, 0].mean())}


# noise bands of the DMD timestep (sigma = t / 1000) for the diagnostics: where the true posterior is nearly one
# clip (low), a blend of a few (mid), or of most of them (high)
BANDS = (("low", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("high", 2 / 3, 1.01))

# what a teacher that knows the true distribution (the toy world's) lets the learner measure, per generator update
DIAGNOSTICS = ("dmd_world_cosine", *(f"dmd_world_cosine_{band}" for band, _, _ in BANDS),
               "critic_fit_student", "critic_fit_true", "teacher_fit_student", "teacher_fit_true")


def banded(name: str, values: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """The mean of per-video `values` as `name`, and per noise band of their timesteps t [B] as `name`_<band> (only
    the bands drawn this time: an absent key is a band not measured)."""
    sigma = t.double().cpu() / 1000
    out = {name: float(values.mean())}
    for band, lo, hi in BANDS:
        inside = (sigma >= lo) & (sigma < hi)
        if inside.any():
            out[f"{name}_{band}"] = float(values[inside].mean())
    return out


TeacherBuilder = Callable[[Config], torch.nn.Module]


def _wan_teacher(cfg: Config, build: WanBuild) -> WanModel:
    checkpoint = cfg.learner.teacher.checkpoint
    teacher = build(lambda: WanModel(cfg.learner.teacher.arch or cfg.model), reader(checkpoint) if checkpoint else None)
    teacher.attention_backend = cfg.runtime.attention_backend
    return teacher


_TEACHERS: dict[str, TeacherBuilder] = {}


def register_teacher(kind: str, builder: TeacherBuilder) -> None:
    """Make `learner.teacher.kind: <kind>` build its teacher with `builder(cfg)`: a module with
    forward(x, t, context) -> flow, which sets `conditions_on = "prompts"` when it reads the prompts' text
    (then `context` is the list of prompts) rather than their embeddings."""
    TEACHER_KINDS.add(kind)
    _TEACHERS[kind] = builder


def build_teacher(cfg: Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  build: WanBuild | None = None) -> torch.nn.Module:
    """The frozen real-score model `learner.teacher` describes, in `dtype` on `device`. A Wan teacher is read
    straight into them by `build` (the 14B teacher never exists in float32 on the CPU); a registered one is
    built, then moved."""
    kind = cfg.learner.teacher.kind
    if kind == "wan":
        teacher = _wan_teacher(cfg, build or materialise(device, dtype, cfg.runtime.seed))
    else:
        teacher = _TEACHERS[kind](cfg).to(device=device, dtype=dtype)
    return teacher.eval().requires_grad_(False)


def teacher_context(teacher: torch.nn.Module, embeddings: torch.Tensor, prompts: list[str]) -> torch.Tensor | list[str]:
    """What the teacher conditions on: the prompts' embeddings, or their text for a teacher that reads it."""
    return prompts if getattr(teacher, "conditions_on", "embeddings") == "prompts" else embeddings


def build_score_models(cfg: Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       build: WanBuild | None = None) -> tuple[torch.nn.Module, WanModel]:
    """(teacher, critic) in `dtype` on `device`, each Wan made real by `build`: the teacher `learner.teacher`
    describes; the critic from learner.critic_checkpoint, or from the teacher's weights (its checkpoint read
    again, or the same seeded ones) when the teacher is a Wan of the student's architecture."""
    learner, teacher_cfg = cfg.learner, cfg.learner.teacher
    build = build or materialise(device, dtype, cfg.runtime.seed)
    if learner.critic_checkpoint:
        read = reader(learner.critic_checkpoint, role="critic")
    elif teacher_cfg.kind == "wan" and (teacher_cfg.arch or cfg.model) == cfg.model:
        read = reader(teacher_cfg.checkpoint) if teacher_cfg.checkpoint else None
    else:
        raise ConfigError("learner.critic_checkpoint is required when the teacher is not a Wan of the student's "
                          "architecture (the paper starts the critic from base Wan2.1-T2V-1.3B; the toy world from "
                          "its learned flow-matching teacher)")
    teacher = build_teacher(cfg, device, dtype, build)
    critic = build(lambda: WanModel(cfg.model), read)
    critic.attention_backend = cfg.runtime.attention_backend
    return teacher, critic.train().requires_grad_(True)
