"""Text to video latents: prompt -> umT5 -> causal generator blocks, with the codec that decodes them (the Wan
VAE, or the exact patch codec with `vae.kind: patch`).

`VideoPipeline` holds one generator, text encoder and codec for every caller: the CLI and the serving
deployment stream from it (core.stream.session), rollout actors and the toy-world evaluation make their
seeded rollouts with it (`training_rollout`, `generate`), so a sample's noise and exit step follow from
its seed the same way everywhere.
"""

from __future__ import annotations

import torch

from core.algo.rollout import RolloutRecord, SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.codecs.video import Codec, build_codec
from core.config import Config
from core.model.fp8 import float8_linears
from core.model.wan import CausalWanModel
from core.records.checkpoint import Reader, WanBuild, materialise, reader
from core.runtime import resolve_device, resolve_dtype
from core.stream.block_step import BlockStep


def build_generator(cfg: Config, device: torch.device | str, dtype: torch.dtype | None = None,
                    build: WanBuild | None = None, read: Reader | None = None) -> CausalWanModel:
    """The causal generator (frozen, in runtime.dtype unless `dtype` is given), made real by `build` (default: built
    straight into that dtype on `device`) with the weights `read` reads (default: the local checkpoint in
    checkpoint.generator, or seeded random weights, the same in every process, when it is unset or "random")."""
    build = build or materialise(device, dtype or resolve_dtype(cfg.runtime.dtype), cfg.runtime.seed)
    ckpt = cfg.checkpoint
    if read is None and ckpt.generator_path:
        read = reader(ckpt.generator_path, "generator", ckpt.use_ema)
    model = build(lambda: CausalWanModel(cfg.model, cfg.stream), read)
    model.attention_backend = cfg.runtime.attention_backend
    if cfg.runtime.fp8:
        float8_linears(model)
    return model.eval().requires_grad_(False)


class VideoPipeline:
    def __init__(self, cfg: Config, generator: CausalWanModel, text_encoder: TextEncoder, vae: Codec,
                 device: torch.device):
        self.cfg = cfg
        self.generator = generator
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = device
        self.dtype = next(generator.parameters()).dtype
        sched = FlowMatchScheduler.from_config(cfg.scheduler)
        timesteps = sched.denoising_timesteps(cfg.scheduler.denoising_step_list, cfg.scheduler.warp_denoising_step)
        self.rollout = SelfForcedRollout(generator, sched, timesteps, cfg.scheduler.context_noise, cfg.stream.context_rerun)
        rt = cfg.runtime  # FP8's float8 linears stay per projection: fusing them would undo it
        self.block_step = BlockStep(self.rollout, rt.compile, rt.cuda_graphs, fuse_qkv=rt.compile and not rt.fp8)

    def with_weights(self, weights: dict[str, torch.Tensor]) -> "VideoPipeline":
        """A pipeline sharing this one's text encoder and codec, with a new generator holding `weights` (a state
        dict in any dtype and device: built on meta and filled once, in this pipeline's dtype on its device)."""
        build = materialise(self.device, self.dtype, self.cfg.runtime.seed)
        generator = build_generator(self.cfg, self.device, self.dtype, build,
                                    read=lambda device, dtype: {k: v.to(device, dtype) for k, v in weights.items()})
        return VideoPipeline(self.cfg, generator, self.text_encoder, self.vae, self.device)

    @classmethod
    def from_config(cls, cfg: Config) -> "VideoPipeline":
        cfg.check_paths("generator")
        device, dtype = resolve_device(cfg.runtime.device), resolve_dtype(cfg.runtime.dtype)
        return cls(cfg, build_generator(cfg, device), TextEncoder.from_config(cfg, device, dtype),
                   build_codec(cfg, device, dtype), device)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings in the generator's device and dtype."""
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def noise(self, batch: int, generator: torch.Generator, latent_hw: tuple[int, int] | None = None):
        """Fresh noise for one block of `batch` videos per request, drawn from `generator`."""
        shape = (batch, self.cfg.stream.num_frame_per_block, self.cfg.model.in_dim, *(latent_hw or self.cfg.video.latent_hw))
        return gaussian_noise(shape, generator, self.dtype, self.device)

    @torch.no_grad()
    def training_rollout(self, prompt: str, seed: int) -> RolloutRecord:
        """The training rollout of one prompt, as an actor records it: noise and exit step drawn from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        cache = self.generator.init_cache(1, self.cfg.video.latent_hw)
        blocks = self.cfg.video.num_latent_frames // self.cfg.stream.num_frame_per_block
        return self.rollout.training_rollout(self.encode([prompt]), cache, self.noise(1, gen), blocks, generator=gen)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, seed: int, latent_frames: int) -> torch.Tensor:
        """Few-step rollouts [B, latent_frames, C, H, W] for encoded prompts `context` [B, ...], noise from `seed`."""
        fpb = self.cfg.stream.num_frame_per_block
        cache = self.generator.init_cache(context.shape[0], self.cfg.video.latent_hw)
        noise = self.noise(context.shape[0], torch.Generator().manual_seed(seed))
        latents = self.rollout.generate(context.to(self.device, self.dtype), cache, noise, -(-latent_frames // fpb))
        return latents[:, :latent_frames]
