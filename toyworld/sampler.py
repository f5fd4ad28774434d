"""Samplers of a bidirectional teacher: its Euler flow ODE (the teacher's samples, `sample`) and the trajectory
states ODE init regresses from, solved for the whole clip at once (`ode_trajectory`) or block by block
(`causal_ode_trajectory`: each block's ODE conditioned on the clean blocks before it, the later ones unseen);
with the true flow it lands exactly on x0 (tested). And the student's own few-step sampler with the teacher
as its denoiser (`few_step_trajectory`), whose states and x0s a student can learn to follow."""

from __future__ import annotations

import torch

from core.algo.scheduler import FlowMatchScheduler


def ode_grid(sched: FlowMatchScheduler, steps: int) -> torch.Tensor:
    """float64 sigmas of an Euler solve in `steps` steps: every (n / steps)-th entry of the shifted table, then 0."""
    index = torch.arange(steps) * sched.num_train_timesteps // steps
    return torch.cat([sched.sigmas[index], torch.zeros(1)]).double()


def _grid(sched: FlowMatchScheduler, steps: int, keep: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The solve's sigmas, its timesteps and the grid indices of the timesteps `keep`."""
    sigmas = ode_grid(sched, steps)
    grid_t = (sigmas[:-1] * sched.num_train_timesteps).float()
    keep_at = []
    for t in keep:
        match = (grid_t - t).abs() < 1e-3
        if not match.any():
            raise ValueError(f"timestep {t:.3f} is not on the {steps}-step ODE grid; use a number of ODE steps that "
                             f"is a multiple of the student's denoising steps")
        keep_at.append(int(match.nonzero()[0]))
    return sigmas, grid_t, keep_at


@torch.no_grad()
def ode_trajectory(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
                   uncond: torch.Tensor | list[str] | None,
                   shape: tuple[int, ...], steps: int = 20, guidance: float = 3.0, rng: torch.Generator | None = None,
                   keep: tuple[float, ...] = ()) -> list[torch.Tensor]:
    """Euler integration of the teacher's flow ODE from noise (sigma 1) to x0 (sigma 0) on `ode_grid`.

    dx/dsigma is the predicted flow (noise - x0); with `uncond` it is classifier-free guided,
    v_u + guidance * (v_c - v_u). Returns the states [B, F, C, H, W] at the timesteps `keep` (each must
    lie on the grid, as the few-step student timesteps do when `steps` is a multiple of their count),
    followed by x0.
    """
    b, f = shape[:2]
    sigmas, grid_t, keep_at = _grid(sched, steps, keep)
    x = torch.randn(shape, generator=rng).double()
    dtype = next(model.parameters(), torch.zeros(())).dtype  # the exact teacher has no weights: float32 states
    states = {}
    for i in range(steps):
        states[i] = x.to(dtype)
        t = torch.full((b, f), float(grid_t[i]))
        flow = model(x.to(dtype).transpose(1, 2), t, context).transpose(1, 2).double()
        if uncond is not None:
            flow_u = model(x.to(dtype).transpose(1, 2), t, uncond).transpose(1, 2).double()
            flow = flow_u + guidance * (flow - flow_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * flow
    return [states[i] for i in keep_at] + [x.to(dtype)]


def sample(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
           uncond: torch.Tensor | list[str] | None,
           shape: tuple[int, ...], steps: int = 20, guidance: float = 3.0,
           rng: torch.Generator | None = None) -> torch.Tensor:
    """Teacher samples x0 [B, F, C, H, W]: the end of `ode_trajectory`."""
    return ode_trajectory(model, sched, context, uncond, shape, steps, guidance, rng)[-1]


def block_flow(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
               past: torch.Tensor, x: torch.Tensor, future: torch.Tensor, t: float,
               past_t: float = 0.0) -> torch.Tensor:
    """The teacher's flow for one block x [B, f, C, H, W] at timestep t, in x's dtype: the autoregressive
    conditional, with the frames before it at `past_t` (clean) and the unseen ones after it at timestep 1000."""
    frames = torch.cat([past, x, future], dim=1)
    start, stop = past.shape[1], past.shape[1] + x.shape[1]
    t_frames = torch.full(frames.shape[:2], float(sched.num_train_timesteps))
    t_frames[:, :start], t_frames[:, start:stop] = past_t, t
    dtype = next(model.parameters(), torch.zeros(())).dtype  # the exact teacher has no weights: float32
    return model(frames.to(dtype).transpose(1, 2), t_frames, context).transpose(1, 2)[:, start:stop].to(x.dtype)


def block_x0(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
             past: torch.Tensor, x: torch.Tensor, future: torch.Tensor, t: float, past_t: float = 0.0) -> torch.Tensor:
    """`block_flow` as the teacher's x0 for the block."""
    flow = block_flow(model, sched, context, past, x, future, t, past_t)
    t_block = torch.full((x.shape[0] * x.shape[1],), t)
    return sched.x0_from_flow(flow.flatten(0, 1), x.flatten(0, 1), t_block).unflatten(0, x.shape[:2])


@torch.no_grad()
def causal_ode_trajectory(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
                          shape: tuple[int, ...], frames_per_block: int, steps: int = 20,
                          rng: torch.Generator | None = None, keep: tuple[float, ...] = ()) -> list[torch.Tensor]:
    """`ode_trajectory` (unguided) block by block, the autoregressive teacher Causal Forcing asks ODE init to use:
    block b's ODE runs with the blocks before it clean (timestep 0) and the ones after it pure noise (timestep
    1000: unseen), so its end depends only on its own noise and the past, as a causal student's output does.
    Returns the states [B, F, C, H, W] at the timesteps `keep` (each block at its own solve's), then x0."""
    f = shape[1]
    sigmas, grid_t, keep_at = _grid(sched, steps, keep)
    noise = torch.randn(shape, generator=rng).double()
    dtype = next(model.parameters(), torch.zeros(())).dtype
    x0, states = noise.clone(), [noise.clone() for _ in keep_at]
    for start in range(0, f, frames_per_block):
        block = slice(start, start + frames_per_block)
        x = noise[:, block]
        for i in range(steps):
            for slot, at in enumerate(keep_at):
                if at == i:
                    states[slot][:, block] = x
            flow = block_flow(model, sched, context, x0[:, :start], x, noise[:, block.stop:], float(grid_t[i]))
            x = x + (sigmas[i + 1] - sigmas[i]) * flow
        x0[:, block] = x
    return [s.to(dtype) for s in states] + [x0.to(dtype)]


@torch.no_grad()
def few_step_trajectory(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor | list[str],
                        shape: tuple[int, ...], frames_per_block: int, timesteps: torch.Tensor,
                        rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal student's own sampler run with the teacher as its denoiser: block by block (the clean blocks
    before at timestep 0, the ones after unseen at 1000), the teacher's x0 at each of the student's `timesteps`,
    re-noised with fresh noise to the next one, as `SelfForcedRollout.stream` does.

    Returns (states, x0s, clean): the inputs at each timestep and the teacher's x0 for them [K, B, F, C, H, W],
    and the finished clip [B, F, C, H, W]. A student that learns x0s from states follows this sampler."""
    b, f = shape[:2]
    noise = torch.randn(shape, generator=rng).double()
    dtype = next(model.parameters(), torch.zeros(())).dtype
    k = len(timesteps)
    states, x0s = torch.zeros((k, *shape), dtype=torch.float64), torch.zeros((k, *shape), dtype=torch.float64)
    clean = noise.clone()
    for start in range(0, f, frames_per_block):
        block = slice(start, start + frames_per_block)
        x = noise[:, block]
        for i, t in enumerate(timesteps.tolist()):
            states[i][:, block] = x
            x0 = block_x0(model, sched, context, clean[:, :start], x, noise[:, block.stop:], t)
            x0s[i][:, block] = x0
            if i + 1 < k:
                fresh = torch.randn(x0.shape, generator=rng).double()
                t_next = torch.full((b * x.shape[1],), float(timesteps[i + 1]))
                x = sched.add_noise(x0.flatten(0, 1), fresh.flatten(0, 1), t_next).unflatten(0, x0.shape[:2])
        clean[:, block] = x0
    return states.to(dtype), x0s.to(dtype), clean.to(dtype)
