"""ODE-regression initialisation of the causal student from teacher trajectories (CausVid, Self Forcing).

Distribution matching starts from a student that already makes videos in a few steps: Self Forcing's
`ode_init.pt`. It is made by integrating the teacher's guided flow ODE from noise and keeping the
states at the student's few-step timesteps; the student (initialised from the teacher's weights) then
learns to map each of those states straight to the ODE's end point. Here the student is trained through
the same path the learner uses: a trajectory becomes a `RolloutRecord` whose exit step is one of the
student's timesteps, with the ODE's clean end as the cached context, and `replay_exit_steps` gives the
predictions with grad. No Ray; `launch.py ode-init` drives it.

`ode_init.pairs` also offers the pairs of the student's own few-step sampler run with the teacher as its
denoiser (the teacher's x0 at each state, not the ODE's end), and `ode_init.on_policy` DAgger steps: the
teacher's x0 at the states the student's own rollout reaches. On the toy world, where the exact teacher
makes them cheap, that is what makes a student whose shapes move as prompted (docs/toy-world.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.algo.distill import build_teacher, teacher_context
from core.algo.rollout import ReplayBlock, RolloutRecord, SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.config import ConfigError
from core.model.wan import CausalWanModel, WanModel
from core.records.checkpoint import load_into, load_wan_state_dict
from toyworld.config import WorldConfig
from toyworld.recipe import RecipeOptimizer
from toyworld.sampler import block_x0, causal_ode_trajectory, few_step_trajectory, ode_trajectory
from toyworld.world import Scene


@dataclass
class OdePairs:
    prompts: list[str]
    states: torch.Tensor  # [N, K, F, C, H, W]: the trajectory at each of the student's K timesteps
    targets: torch.Tensor  # [N, K, F, C, H, W]: what the student regresses at each (the ODE's end, or the x0s)
    clean: torch.Tensor  # [N, F, C, H, W]: where the trajectory ends: the cached context of each block


def student_timesteps(cfg: WorldConfig) -> torch.Tensor:
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    return sched.denoising_timesteps(cfg.scheduler.denoising_step_list, cfg.scheduler.warp_denoising_step)


@torch.no_grad()
def teacher_trajectories(cfg: WorldConfig, teacher: torch.nn.Module, encoder: TextEncoder, prompts: list[str],
                         seed: int, on_batch: Callable[[int], None] | None = None) -> OdePairs:
    """Trajectories of `teacher` for `prompts` of the kind ode_init.pairs names, `ode_init.batch_size` at a time,
    seeded per batch."""
    o, lh_lw = cfg.ode_init, cfg.video.latent_hw
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    timesteps = student_timesteps(cfg)
    keep = tuple(timesteps.tolist())
    states, targets, clean = [], [], []
    for start in range(0, len(prompts), o.batch_size):
        chunk = prompts[start:start + o.batch_size]
        context = teacher_context(teacher, encoder.encode(chunk), chunk)
        shape = (len(chunk), cfg.video.num_latent_frames, cfg.model.in_dim, *lh_lw)
        rng = torch.Generator().manual_seed(seed + start)
        if o.pairs == "few_step":
            at_steps, x0s, x0 = few_step_trajectory(teacher, sched, context, shape, cfg.stream.num_frame_per_block,
                                                    timesteps, rng)
            states.append(at_steps.transpose(0, 1))
            targets.append(x0s.transpose(0, 1))
        else:
            if o.pairs == "causal_ode":
                *at_steps, x0 = causal_ode_trajectory(teacher, sched, context, shape, cfg.stream.num_frame_per_block,
                                                      o.ode_steps, rng, keep)
            else:
                uncond = None if o.guidance == 1 else teacher_context(teacher, encoder.encode([""] * len(chunk)),
                                                                      [""] * len(chunk))
                *at_steps, x0 = ode_trajectory(teacher, sched, context, uncond, shape, o.ode_steps, o.guidance, rng,
                                               keep)
            states.append(torch.stack(at_steps, dim=1))
        clean.append(x0)
        if on_batch is not None:
            on_batch(len(chunk))
    clean = torch.cat(clean)
    # an ODE's every state regresses its end: a view of `clean`, not K copies of it
    targets = torch.cat(targets) if targets else clean[:, None].expand(-1, len(keep), *clean.shape[1:])
    return OdePairs(prompts, torch.cat(states), targets, clean)


def regression_record(states: torch.Tensor, clean: torch.Tensor, exit_index: int, exit_timestep: float,
                      frames_per_block: int, context_timestep: float = 0.0) -> RolloutRecord:
    """A batch of trajectories as a rollout that exits at `exit_index`, with the ODE's end as each block's context.

    `states` [B, K, F, C, H, W], `clean` [B, F, C, H, W]."""
    record = RolloutRecord(exit_index, exit_timestep, context_timestep)
    for start in range(0, clean.shape[1], frames_per_block):
        end = start + frames_per_block
        record.blocks.append(ReplayBlock(start, states[:, exit_index, start:end], clean[:, start:end]))
    return record


def block_weighted_mse(pred: torch.Tensor, target: torch.Tensor, frames_per_block: int,
                       first_block_weight: float = 1.0) -> torch.Tensor:
    """mse over videos [B, F, ...] with the first block's frames weighted `first_block_weight` against the rest's 1,
    normalised so the loss keeps mse's scale (weight 1 is plain mse)."""
    weights = torch.ones(pred.shape[1], dtype=pred.dtype, device=pred.device)
    weights[:frames_per_block] = first_block_weight
    per_frame = (pred - target).square().flatten(2).mean(dim=(0, 2))
    return (weights * per_frame).sum() / weights.sum()


def ode_regression_loss(generator: CausalWanModel, sched: FlowMatchScheduler, timesteps: torch.Tensor,
                        states: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor, context: torch.Tensor,
                        exit_index: int, context_noise: int = 0, first_block_weight: float = 1.0) -> torch.Tensor:
    """mse(student's x0 from the trajectory state at timestep `exit_index`, its target there), over every block,
    each attending to the clean blocks before it (`block_weighted_mse`)."""
    rollout = SelfForcedRollout(generator, sched, timesteps, context_noise)
    record = regression_record(states, clean, exit_index, float(timesteps[exit_index]),
                               generator.stream.num_frame_per_block, float(context_noise))
    cache = generator.init_cache(clean.shape[0], tuple(clean.shape[-2:]), device=clean.device, dtype=clean.dtype)
    return block_weighted_mse(rollout.replay_exit_steps(record, context, cache), targets[:, exit_index],
                              generator.stream.num_frame_per_block, first_block_weight)


@torch.no_grad()
def teacher_x0_at_exit(teacher: torch.nn.Module, sched: FlowMatchScheduler, record: RolloutRecord,
                       context: torch.Tensor | list[str], rng: torch.Generator) -> torch.Tensor:
    """The teacher's x0 for each block's exit-step input of a rollout, given the rollout's blocks before it as its
    clean past (at the context timestep) and no future (noise at timestep 1000): [B, F, C, H, W]."""
    inputs = [blk.clean if blk.context_input is None else blk.context_input for blk in record.blocks]
    f = sum(blk.noisy.shape[1] for blk in record.blocks)
    past, out = record.blocks[0].noisy[:, :0], []
    for blk, done in zip(record.blocks, inputs):
        stop = blk.start_frame + blk.noisy.shape[1]
        future = torch.randn((blk.noisy.shape[0], f - stop, *blk.noisy.shape[2:]), generator=rng, dtype=blk.noisy.dtype)
        out.append(block_x0(teacher, sched, context, past, blk.noisy, future, record.exit_timestep,
                            record.context_timestep))
        past = torch.cat([past, done], dim=1)
    return torch.cat(out, dim=1)


def on_policy_loss(generator: CausalWanModel, teacher: torch.nn.Module, sched: FlowMatchScheduler,
                   timesteps: torch.Tensor, context: torch.Tensor, teacher_ctx: torch.Tensor | list[str],
                   shape: tuple[int, ...], exit_index: int, rng: torch.Generator, context_noise: int = 0,
                   first_block_weight: float = 1.0) -> torch.Tensor:
    """DAgger for a few-step student: mse(its x0 at the states its own rollout reaches, the teacher's x0 there).
    Offline pairs teach the student the teacher's sampler on the teacher's states; its own small errors then lead
    it to states it never saw. Here it learns the teacher's answer at those."""
    rollout = SelfForcedRollout(generator, sched, timesteps, context_noise)
    b, f = shape[:2]
    fpb = generator.stream.num_frame_per_block
    noise = gaussian_noise((b, fpb, *shape[2:]), rng, torch.float32, "cpu")
    with torch.no_grad():
        cache = generator.init_cache(b, tuple(shape[-2:]), device="cpu", dtype=torch.float32)
        record = rollout.training_rollout(context, cache, noise, f // fpb, exit_index)
    targets = teacher_x0_at_exit(teacher, sched, record, teacher_ctx, rng)
    cache = generator.init_cache(b, tuple(shape[-2:]), device="cpu", dtype=torch.float32)
    return block_weighted_mse(rollout.replay_exit_steps(record, context, cache), targets, fpb, first_block_weight)


def ode_init(cfg: WorldConfig, on_stage: Callable[[str, int], None] | None = None,
             on_step: Callable[[int, float | None], None] | None = None) -> tuple[CausalWanModel, list[float]]:
    """Train the causal student on trajectories of the teacher learner.teacher describes, per `cfg.ode_init`;
    returns (student, losses). The student starts from ode_init.init, else from a Wan teacher's weights, else
    from Wan's initialisation.

    `on_stage(name, total)` announces "trajectories" (in clips) and "regression" (in steps); `on_step(n, loss)`
    reports progress within a stage (loss None while solving trajectories)."""
    o = cfg.ode_init
    if cfg.learner.teacher.kind == "wan" and cfg.learner.teacher.checkpoint is None:
        raise ConfigError("ode_init needs a trained teacher: set learner.teacher.checkpoint to its folder "
                          "(python launch.py pretrain-teacher makes one) or learner.teacher.kind=exact_world")
    teacher = build_teacher(cfg)
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    prompts = [Scene.from_seed(o.seed + i).prompt for i in range(o.num_clips)]
    if on_stage is not None:
        on_stage("trajectories", o.num_clips)
    pairs = teacher_trajectories(cfg, teacher, encoder, prompts, o.seed,
                                 None if on_step is None else lambda n: on_step(n, None))
    start = teacher.state_dict() if o.init is None and isinstance(teacher, WanModel) else None
    if not o.on_policy:
        del teacher  # only DAgger steps call it again

    torch.manual_seed(cfg.runtime.seed)
    student = CausalWanModel(cfg.model, cfg.stream)
    if o.init is not None:
        start = load_wan_state_dict(o.init)
    if start is None:
        student.init_weights()
    else:
        load_into(student, start)
    student.attention_backend = cfg.runtime.attention_backend
    student.train()
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    timesteps = student_timesteps(cfg)
    opt = RecipeOptimizer(student, o.lr, o.weight_decay, o.warmup_steps, o.steps, o.grad_clip)
    rng = np.random.default_rng(o.seed)
    noise_rng = torch.Generator().manual_seed(o.seed)
    if on_stage is not None:
        on_stage("regression", o.steps)
    losses = []
    for step in range(o.steps):
        pick = torch.as_tensor(rng.choice(o.num_clips, size=min(o.batch_size, o.num_clips), replace=False))
        exit_index = int(rng.integers(len(timesteps)))
        chosen = [pairs.prompts[i] for i in pick.tolist()]
        with torch.no_grad():
            context = encoder.encode(chosen)
        if rng.random() < o.on_policy:
            loss = on_policy_loss(student, teacher, sched, timesteps, context, teacher_context(teacher, context, chosen),
                                  (len(chosen), *pairs.clean.shape[1:]), exit_index, noise_rng,
                                  cfg.scheduler.context_noise, o.first_block_weight)
        else:
            loss = ode_regression_loss(student, sched, timesteps, pairs.states[pick], pairs.targets[pick],
                                       pairs.clean[pick], context, exit_index, cfg.scheduler.context_noise,
                                       o.first_block_weight)
        losses.append(opt.step(loss))
        if on_step is not None:
            on_step(1, losses[-1])
    return student.eval(), losses
