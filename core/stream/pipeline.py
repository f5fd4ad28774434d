"""Text to streamed video frames: prompt -> umT5 -> causal generator blocks -> streaming decode
(the Wan VAE, or the exact patch codec with `vae.kind: patch`).

`VideoPipeline.stream` yields each block's decoded frames as soon as they exist,
with the time spent denoising and decoding it, so callers (the CLI, the serving
deployment, rollout actors) can write, send or score video while it is generated.
With a window set, memory stays bounded however long the stream runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from core.config import Config, ConfigError
from core.rollout import SelfForcedRollout
from core.scheduler import FlowMatchScheduler
from core.text_encoder import TextEncoder
from core.vae import Codec, build_codec, codec_class
from core.wan.model import CausalWanModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is visible: set runtime.device=cpu or auto")
    return torch.device(name)


def video_frames_for(latent_frames: int, cfg: Config) -> int:
    """Video frames that `latent_frames` latent frames decode to with the codec `vae.kind` names:
    the first latent gives one frame, every later one the codec's temporal stride (Wan's VAE:
    1 + 4(n - 1), 81 for 21 latents; the patch codec: n)."""
    if latent_frames < 1:
        raise ValueError(f"the number of latent frames must be >= 1, got {latent_frames}")
    return 1 + codec_class(cfg).temporal_stride * (latent_frames - 1)


def latent_frames_for(video_frames: int, cfg: Config) -> int:
    """Latent frames, in whole blocks of stream.num_frame_per_block, that decode to at least
    `video_frames` frames with the codec `vae.kind` names (the inverse of video_frames_for, rounded up)."""
    if video_frames < 1:
        raise ValueError(f"the number of video frames must be >= 1, got {video_frames}")
    latents = 1 + math.ceil((video_frames - 1) / codec_class(cfg).temporal_stride)
    fpb = cfg.stream.num_frame_per_block
    return math.ceil(latents / fpb) * fpb


@dataclass
class VideoChunk:
    block: int
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    denoise_s: float
    decode_s: float
    first_frame: int = 0  # index of frames[0] in the stream


def build_generator(cfg: Config, device: torch.device, dtype: torch.dtype | None = None) -> CausalWanModel:
    """The causal generator (frozen, in runtime.dtype unless `dtype` is given): seeded random weights,
    or the local checkpoint in checkpoint.generator."""
    from core.checkpoint import load_into, load_wan_state_dict

    torch.manual_seed(cfg.runtime.seed)
    model = CausalWanModel(cfg.model, cfg.stream)
    if cfg.checkpoint.generator:
        load_into(model, load_wan_state_dict(cfg.checkpoint.generator, role="generator", use_ema=cfg.checkpoint.use_ema))
    model.attention_backend = cfg.runtime.attention_backend
    return model.to(device=device, dtype=dtype or DTYPES[cfg.runtime.dtype]).eval().requires_grad_(False)


class VideoPipeline:
    def __init__(self, cfg: Config, generator: CausalWanModel, text_encoder: TextEncoder, vae: Codec,
                 device: torch.device):
        self.cfg = cfg
        self.generator = generator
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = device
        self.dtype = DTYPES[cfg.runtime.dtype]
        sched = FlowMatchScheduler.from_config(cfg.scheduler)
        timesteps = sched.denoising_timesteps(cfg.scheduler.denoising_step_list, cfg.scheduler.warp_denoising_step)
        self.rollout = SelfForcedRollout(generator, sched, timesteps, cfg.scheduler.context_noise)

    @classmethod
    def from_config(cls, cfg: Config) -> "VideoPipeline":
        cfg.check_paths()
        device = resolve_device(cfg.runtime.device)
        dtype = DTYPES[cfg.runtime.dtype]
        return cls(cfg, build_generator(cfg, device), TextEncoder.from_config(cfg, device, dtype),
                   build_codec(cfg, device, dtype), device)

    def stream(self, prompt: str, seed: int, latent_frames: int | None = None) -> Iterator[VideoChunk]:
        """Decoded frames block by block; forever when `latent_frames` is None."""
        from core.streaming import StreamSession

        fpb = self.cfg.stream.num_frame_per_block
        if latent_frames is not None and latent_frames % fpb:
            raise ValueError(f"latent_frames ({latent_frames}) must be a multiple of num_frame_per_block ({fpb})")
        session = StreamSession(self, prompt, seed)
        while latent_frames is None or session.blocks < latent_frames // fpb:
            yield session.next_chunk()
