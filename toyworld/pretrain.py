"""Flow-matching pretraining of a bidirectional Wan teacher on the toy world (toyworld/world.py).

The teacher is what Reward Forcing distils from; on the embedded default it is a small WanModel
trained here, on CPU, on exact patch-codec latents of world clips with their prompts. The loss is
the flow-matching objective the Wan models were trained with: at a timestep drawn from a shifted
table (the recipe's shift), predict the flow (noise - x0) of x_t = (1 - sigma) x0 + sigma noise. A fraction of
prompts is replaced by the empty prompt so the teacher also learns the unconditional flow that
classifier-free guidance needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.algo.ema import EMA
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.codecs.video import build_codec
from core.model.wan import WanModel
from toyworld.config import WorldConfig
from toyworld.recipe import RecipeOptimizer, flow_matching_loss, scene_batch, world_latents


def pretrain_teacher(cfg: WorldConfig, on_step: Callable[[int, float], None] | None = None) -> tuple[WanModel, list[float]]:
    """Train `cfg.model` as a bidirectional teacher on the toy world per `cfg.pretrain`; returns (model, losses),
    the model being the exponential moving average of the weights (`ema_decay`; 0: the last weights).

    `on_step(step, loss)` is called after every optimizer step (progress bars, logs)."""
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
