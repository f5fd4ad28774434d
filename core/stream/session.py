"""One interactive stream: blocks on demand, prompt switches mid-stream, memory bounded by the window.

`StreamSession.next_chunk()` denoises the next block (few-step, self-forced), decodes it through
the streaming VAE decoder and returns its uint8 frames; the KV cache keeps only the window, and
the session keeps only the clean latents of the frames that window can hold, so a session runs
forever at constant memory.

`switch_prompt` follows LongLive's KV re-cache: the cross-attention K/V switch to the new prompt,
and the self-attention cache is rebuilt by re-running the recent clean latents (the frames still
in the window, whole blocks) at t = context_noise under the new prompt, so the next block sees
the past as if it had been made under the new prompt and the motion continues without a cut.
The re-cached window starts at the oldest recent block, which becomes the sink; the old EMA sink,
accumulated under the previous prompt, is dropped with it.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from core.pipeline import VideoChunk, VideoPipeline
from core.rollout import _bcfhw, gaussian_noise
from core.vae import to_uint8_frames


class StreamSession:
    def __init__(self, pipe: VideoPipeline, prompt: str, seed: int, height: int | None = None, width: int | None = None):
        cfg = pipe.cfg
        self.pipe, self.seed = pipe, seed
        self.height, self.width = height or cfg.video.height, width or cfg.video.width
        sh, sw = cfg.video.vae_stride[1:]
        _, ph, pw = cfg.model.patch_size
        if self.height % (sh * ph) or self.width % (sw * pw):
            raise ValueError(f"{self.width}x{self.height} is not a multiple of {sw * pw}x{sh * ph} "
                             "(VAE stride x patch size)")
        self.latent_hw = (self.height // sh, self.width // sw)
        self.fpb = cfg.stream.num_frame_per_block
        window = cfg.stream.local_attn_size if cfg.stream.local_attn_size != -1 else cfg.stream.cache_frames
        self.recent: deque[torch.Tensor] = deque(maxlen=max(1, window // self.fpb))  # clean blocks the window holds
        self.cache = pipe.generator.init_cache(1, self.latent_hw)
        self.decoder = pipe.vae.stream_decoder()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.noise = gaussian_noise((1, self.fpb, cfg.model.in_dim, *self.latent_hw), gen, pipe.dtype, pipe.device)
        self.blocks = self.frames = 0
        self.prompt = prompt
        self.context = self._encode(prompt)

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.pipe.text_encoder.encode([prompt]).to(self.pipe.device, self.pipe.dtype)

    def _sync(self) -> float:
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.no_grad()
    def next_chunk(self) -> VideoChunk:
        """The next block's decoded frames: with Wan's VAE 1 + 4 per later latent for the first block and 4 per
        latent after, with the patch codec one per latent."""
        t0 = self._sync()
        # exhausting the one-block stream also runs the context re-run that writes the block's clean K/V
        (block,) = list(self.pipe.rollout.stream(self.context, self.cache, self.noise, num_blocks=1))
        t1 = self._sync()
        frames = to_uint8_frames(self.decoder.decode(block.latents.transpose(1, 2)))
        t2 = self._sync()
        self.recent.append(block.latents)
        chunk = VideoChunk(self.blocks, frames, t1 - t0, t2 - t1, first_frame=self.frames)
        self.blocks += 1
        self.frames += len(frames)
        return chunk

    @torch.no_grad()
    def switch_prompt(self, prompt: str) -> float:
        """Continue the stream under `prompt` (KV re-cache of the recent clean latents); seconds spent."""
        t0 = self._sync()
        self.prompt, self.context = prompt, self._encode(prompt)
        first = self.cache.frames - self.fpb * len(self.recent)
        self.cache.restart_at(first)
        model, t_ctx = self.pipe.generator, float(self.pipe.cfg.scheduler.context_noise)
        for i, latents in enumerate(self.recent):
            t = torch.full(latents.shape[:2], t_ctx, dtype=torch.float32, device=latents.device)
            model(_bcfhw(latents), t, self.context, cache=self.cache, start_frame=first + i * self.fpb)
        return self._sync() - t0

    def memory_bytes(self) -> int:
        """KV cache plus the kept clean latents: constant once the window is full."""
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in self.recent)
