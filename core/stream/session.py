"""One interactive stream: blocks on demand, prompt switches mid-stream, memory bounded by the window.

`StreamSession.next_chunk()` denoises the next block (few-step, self-forced), decodes it through
the streaming VAE decoder and returns its uint8 frames; the KV cache keeps only the window, and
the session keeps only the clean latents of the frames that window can hold, so a session runs
forever at constant memory.

`switch_prompt` (and `switch_weights`, for a newer weight version) follows LongLive's KV re-cache: the cross-attention K/V switch to the new prompt,
and the self-attention cache is rebuilt by re-running the recent clean latents (the frames still
in the window, whole blocks) at t = context_noise under the new prompt, so the next block sees
the past as if it had been made under the new prompt and the motion continues without a cut.
The re-cached window starts at the oldest recent block, which becomes the sink; the old EMA sink,
accumulated under the previous prompt, is dropped with it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from core.codecs.video import to_uint8_frames
from core.stream.pipeline import VideoPipeline


@dataclass
class VideoChunk:
    block: int
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    denoise_s: float
    decode_s: float
    first_frame: int = 0  # index of frames[0] in the stream


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
        self.noise = pipe.noise(1, torch.Generator(device="cpu").manual_seed(seed), self.latent_hw)
        self.blocks = self.frames = 0
        self.prompt = prompt
        self.context = self._encode(prompt)

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.pipe.encode([prompt])

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
        self._recache()
        return self._sync() - t0

    @torch.no_grad()
    def switch_weights(self, pipe: VideoPipeline) -> float:
        """Continue the stream with `pipe`'s generator (other weights, the same text encoder and codec): the window
        is re-cached under them as on a prompt switch, so the next block sees the past as the new weights would
        have written it; seconds spent."""
        t0 = self._sync()
        self.pipe = pipe
        self._recache()
        return self._sync() - t0

    def _recache(self) -> None:
        """Rewrite the window's self-attention K/V from the recent clean latents under the current prompt and
        generator; the oldest recent block becomes the sink."""
        first = self.cache.frames - self.fpb * len(self.recent)
        self.cache.restart_at(first)
        for i, latents in enumerate(self.recent):
            self.pipe.rollout.write_cache(latents, self.context, self.cache, first + i * self.fpb)

    def chunks(self, latent_frames: int | None = None) -> Iterator[VideoChunk]:
        """Decoded chunks block by block until `latent_frames` latent frames (forever when None)."""
        if latent_frames is not None and latent_frames % self.fpb:
            raise ValueError(f"latent_frames ({latent_frames}) must be a multiple of num_frame_per_block ({self.fpb})")
        while latent_frames is None or self.blocks < latent_frames // self.fpb:
            yield self.next_chunk()

    def memory_bytes(self) -> int:
        """KV cache plus the kept clean latents: constant once the window is full."""
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in self.recent)
