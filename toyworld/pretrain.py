"""Flow-matching pretraining of a bidirectional Wan teacher on the toy world (core/toyworld.py).

The teacher is what Reward Forcing distils from; on the embedded default it is a small WanModel
trained here, on CPU, on exact patch-codec latents of world clips with their prompts. The loss is
the flow-matching objective the Wan models were trained with: at a timestep drawn from a shifted
table (the recipe's shift), predict the flow (noise - x0) of x_t = (1 - sigma) x0 + sigma noise. A fraction of
prompts is replaced by the empty prompt so the teacher also learns the unconditional flow that
classifier-free guidance needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from core.ema import EMA
from core.scheduler import FlowMatchScheduler
from core.toyworld import Scene, render


def world_latents(codec, scenes: list[Scene], frames: int, height: int, width: int) -> torch.Tensor:
    """Patch-codec latents [B, F, C, h, w] of the scenes' clips."""
    from core.vae import from_uint8_frames

    videos = torch.cat([from_uint8_frames(render(s, frames, height, width)) for s in scenes])
    return codec.encode(videos).transpose(1, 2)


def flow_matching_loss(model: torch.nn.Module, sched: FlowMatchScheduler, x0: torch.Tensor, context: torch.Tensor,
                       rng: torch.Generator) -> torch.Tensor:
    """mse(model(x_t, t) - (noise - x0)) at one table timestep per clip, for x0 [B, F, C, H, W]."""
    b, f = x0.shape[:2]
    index = torch.randint(0, sched.num_train_timesteps, (b,), generator=rng)
    t = sched.timesteps[index].to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0)
    x_t = sched.add_noise(x0, noise, t)
    flow = model(x_t.transpose(1, 2), t[:, None].expand(b, f), context).transpose(1, 2)
    return F.mse_loss(flow.float(), (noise - x0).float())


class RecipeOptimizer:
    """AdamW with a linear warmup then a cosine down to a tenth of `lr`, and gradient-norm clipping: the
    optimiser of the toy-world recipes (teacher pretraining, ODE init)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 grad_clip: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
            * (0.55 + 0.45 * math.cos(math.pi * step / total_steps)))
        self.grad_clip = grad_clip

    def step(self, loss: torch.Tensor) -> float:
        """One update on `loss`; returns its value."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.schedule.step()
        return loss.item()


def scene_batch(rng: np.random.Generator, num_clips: int, seed: int, batch: int) -> list[Scene]:
    return [Scene.from_seed(seed + int(i)) for i in rng.integers(0, num_clips, batch)]


def pretrain_teacher(cfg, on_step=None) -> tuple[torch.nn.Module, list[float]]:
    """Train `cfg.model` as a bidirectional teacher on the toy world per `cfg.pretrain`; returns (model, losses),
    the model being the exponential moving average of the weights (`ema_decay`; 0: the last weights).

    `on_step(step, loss)` is called after every optimizer step (progress bars, logs)."""
    from core.text_encoder import TextEncoder
    from core.vae import build_codec
    from core.wan.model import WanModel

    p, video = cfg.pretrain, cfg.video
    torch.manual_seed(cfg.runtime.seed)
    model = WanModel(cfg.model)
    model.init_weights()
    model.attention_backend = cfg.runtime.attention_backend
    model.train()
    ema = EMA(dict(model.named_parameters()), p.ema_decay) if p.ema_decay else None
    codec = build_codec(cfg)
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    sched = FlowMatchScheduler(p.shift, cfg.scheduler.num_train_timesteps)
    opt = RecipeOptimizer(model, p.lr, p.weight_decay, p.warmup_steps, p.steps, p.grad_clip)
    scenes_rng, noise_rng = np.random.default_rng(p.seed), torch.Generator().manual_seed(p.seed)
    losses = []
    for step in range(p.steps):
        scenes = scene_batch(scenes_rng, p.num_clips, p.seed, p.batch_size)
        prompts = ["" if scenes_rng.random() < p.cfg_dropout else s.prompt for s in scenes]
        with torch.no_grad():
            x0 = world_latents(codec, scenes, video.num_latent_frames, video.height, video.width)
            context = encoder.encode(prompts)
        losses.append(opt.step(flow_matching_loss(model, sched, x0, context, noise_rng)))
        if ema is not None:
            ema.update(dict(model.named_parameters()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    if ema is not None:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                weight.copy_(ema.shadow[name])
    return model.eval(), losses


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


def evaluate_teacher(cfg, model: torch.nn.Module, num_clips: int = 24, steps: int = 20, guidance: float = 3.0,
                     seed: int = 1_000_000) -> dict[str, float]:
    """Prompt adherence of teacher samples on held-out world scenes (seeds from `seed`): the fraction whose
    colour and whose direction the exact world classifiers read back, against chance (1/6 and 1/5)."""
    from core.text_encoder import TextEncoder
    from core.toyworld import COLOURS, DIRECTIONS, prompt_adherence
    from core.evaluate import decode_videos
    from core.vae import build_codec

    scenes = [Scene.from_seed(seed + i) for i in range(num_clips)]
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    context, uncond = encoder.encode([s.prompt for s in scenes]), encoder.encode([""] * num_clips)
    lh, lw = cfg.video.latent_hw
    x0 = sample(model, FlowMatchScheduler.from_config(cfg.scheduler), context, uncond,
                (num_clips, cfg.video.num_latent_frames, cfg.model.in_dim, lh, lw), steps, guidance,
                torch.Generator().manual_seed(seed))
    videos = decode_videos(build_codec(cfg), x0)
    hits = [prompt_adherence(v, s) for v, s in zip(videos, scenes)]
    return {"colour": float(np.mean([h["colour"] for h in hits])),
            "direction": float(np.mean([h["direction"] for h in hits])),
            "colour_chance": 1 / len(COLOURS), "direction_chance": 1 / len(DIRECTIONS)}
