"""The Euler flow-ODE sampler of a bidirectional teacher: the teacher's samples (`sample`) and the trajectory
states ODE init regresses from (`ode_trajectory`). With the true flow it lands exactly on x0 (tested)."""

from __future__ import annotations

import torch

from core.algo.scheduler import FlowMatchScheduler


def ode_grid(sched: FlowMatchScheduler, steps: int) -> torch.Tensor:
    """float64 sigmas of an Euler solve in `steps` steps: every (n / steps)-th entry of the shifted table, then 0."""
    index = torch.arange(steps) * sched.num_train_timesteps // steps
    return torch.cat([sched.sigmas[index], torch.zeros(1)]).double()


@torch.no_grad()
def ode_trajectory(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor, uncond: torch.Tensor | None,
                   shape: tuple[int, ...], steps: int = 20, guidance: float = 3.0, rng: torch.Generator | None = None,
                   keep: tuple[float, ...] = ()) -> list[torch.Tensor]:
    """Euler integration of the teacher's flow ODE from noise (sigma 1) to x0 (sigma 0) on `ode_grid`.

    dx/dsigma is the predicted flow (noise - x0); with `uncond` it is classifier-free guided,
    v_u + guidance * (v_c - v_u). Returns the states [B, F, C, H, W] at the timesteps `keep` (each must
    lie on the grid, as the few-step student timesteps do when `steps` is a multiple of their count),
    followed by x0.
    """
    b, f = shape[:2]
    sigmas = ode_grid(sched, steps)
    grid_t = (sigmas[:-1] * sched.num_train_timesteps).float()
    keep_at = []
    for t in keep:
        match = (grid_t - t).abs() < 1e-3
        if not match.any():
            raise ValueError(f"timestep {t:.3f} is not on the {steps}-step ODE grid; use a number of ODE steps that "
                             f"is a multiple of the student's denoising steps")
        keep_at.append(int(match.nonzero()[0]))
    x = torch.randn(shape, generator=rng).double()
    dtype = next(model.parameters()).dtype
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


def sample(model: torch.nn.Module, sched: FlowMatchScheduler, context: torch.Tensor, uncond: torch.Tensor | None,
           shape: tuple[int, ...], steps: int = 20, guidance: float = 3.0,
           rng: torch.Generator | None = None) -> torch.Tensor:
    """Teacher samples x0 [B, F, C, H, W]: the end of `ode_trajectory`."""
    return ode_trajectory(model, sched, context, uncond, shape, steps, guidance, rng)[-1]
