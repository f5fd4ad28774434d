"""The video codec a config names (`vae.kind`), frame counting through it, and uint8 frame conversions.

Both codecs have `from_config`, `encode`, `decode`, `stream_decoder` and `temporal_stride` (latent frame
n > 0 decodes to `temporal_stride` video frames, the first to one): the Wan2.1 VAE (`wan`, core/codecs/wan_vae.py)
and the exact pixel-space patch codec (`patch`, core/codecs/patch.py). Decoded videos are in [-1, 1];
frames leave the pipeline as uint8 [T, H, W, 3].
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.codecs.patch import PatchCodec
from core.codecs.wan_vae import WanVAE
from core.config import Config

Codec = WanVAE | PatchCodec
CODECS: dict[str, type[WanVAE] | type[PatchCodec]] = {"wan": WanVAE, "patch": PatchCodec}


def codec_class(cfg: Config) -> type[WanVAE] | type[PatchCodec]:
    """The codec class `vae.kind` names (its `temporal_stride` is known before anything is built)."""
    return CODECS[cfg.vae.kind]


def build_codec(cfg: Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Codec:
    """The video codec `vae.kind` asks for: the Wan2.1 VAE (`wan`) or the exact patch codec (`patch`)."""
    return codec_class(cfg).from_config(cfg, device, dtype)


def from_uint8_frames(frames: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (numpy or torch) -> one video [1, 3, T, H, W] in [-1, 1] (pixel / 127.5 - 1),
    the inverse of `to_uint8_frames`."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return (frames.permute(3, 0, 1, 2)[None].double() / 127.5 - 1).to(dtype)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """One decoded video [1, 3, T, H, W] or [3, T, H, W], clamped to [-1, 1] -> uint8 [T, H, W, 3] on the CPU."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"to_uint8_frames takes one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got {tuple(video.shape)}")
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()



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
