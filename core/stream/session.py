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

Each block's denoising runs through the pipeline's `BlockStep` (eager, compiled or a replayed CUDA graph). With
`overlap_decode` the session denoises one block ahead, in a worker thread (on CUDA on its own stream), while the
caller decodes the block before it, so a block costs max(denoise, decode) instead of their sum; the frames are the
same, and a prompt or weight switch applies from the first block not yet denoised, one block later than without.

With `prefix` (uint8 frames [T, H, W, 3]: one image, or a video to continue) the stream starts from given frames
(core.stream.prefix): their whole latent blocks are written into the cache as clean context before the first block,
a leftover (a single image always) is held fixed inside the first generated block, and the stream's first chunks
are the given frames as the codec reproduces them, then what continues them.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from core.codecs.video import to_uint8_frames, video_frames_for
from core.stream.pipeline import VideoPipeline
from core.stream.prefix import check_room, encode_prefix


@dataclass
class VideoChunk:
    block: int
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    denoise_s: float
    decode_s: float
    first_frame: int = 0  # index of frames[0] in the stream
    wall_s: float = 0.0  # what the caller of next_chunk waited: denoise + decode, or with overlap max(both) or less
    pipe: VideoPipeline | None = None  # whose generator made it (after switch_weights, with overlap, maybe the old)
    given_frames: int = 0  # leading frames that reproduce the given prefix (the whole chunk for a given block)


@dataclass
class _Denoised:
    block: int
    latents: torch.Tensor  # clean [1, f, C, H, W]
    seconds: float
    pipe: VideoPipeline
    given: int = 0  # leading latent frames that are the given prefix's


class StreamSession:
    def __init__(self, pipe: VideoPipeline, prompt: str, seed: int, height: int | None = None, width: int | None = None,
                 overlap_decode: bool | None = None, prefix: np.ndarray | torch.Tensor | None = None):
        """A stream of `prompt` with noise from `seed`. `prefix`: uint8 frames [T, H, W, 3] of the stream's size to
        start from (T = 1: an image to animate; T > 1: a video to continue); a ValueError says what is wrong with
        one that does not fit. `given_frames` counts the frames the stream starts with, reproduced from it (the
        codec's 1 + 4k rule may drop up to 3 trailing frames of a video: `dropped_frames`)."""
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
        self.prompt = prompt
        self.context = self._encode(prompt)
        self.decoder = pipe.vae.stream_decoder()
        self.noise = pipe.noise(1, torch.Generator(device="cpu").manual_seed(seed), self.latent_hw)
        self.blocks = self.frames = 0
        given = None
        if prefix is not None:
            given = encode_prefix(prefix, pipe.vae, self.fpb, self.height, self.width, pipe.device, pipe.dtype)
            check_room(given, cfg.stream, pipe.generator.rope.shape[0])
        self._given: deque[torch.Tensor] = deque(given.blocks if given else [])  # given blocks not yet returned
        self._held = given.held if given else None  # the first generated block starts with these latents
        self.given_frames = given.used if given else 0
        self.dropped_frames = given.given - given.used if given else 0
        self.denoised = len(self._given)  # blocks denoised (or given), the one made ahead included
        self.overlap = cfg.runtime.overlap_decode if overlap_decode is None else overlap_decode
        cuda = pipe.device.type == "cuda"
        self._denoise_stream = torch.cuda.Stream(pipe.device) if cuda and self.overlap else None
        self._ahead: Future[_Denoised] | None = None
        self.cache = pipe.block_step.acquire(self.latent_hw)  # last but the worker: nothing else can leave it taken
        if self._given:
            try:
                self._write_given()
            except BaseException:
                pipe.block_step.release(self.cache)
                raise
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="denoise-ahead") if self.overlap else None

    @torch.no_grad()
    def _write_given(self) -> None:
        """Write the given whole blocks into the cache as clean context, as a finished block's context pass does
        (the window keeps the latest, the EMA sink takes the evicted ones); the window's are kept for a re-cache."""
        for i, latents in enumerate(self._given):
            self.pipe.rollout.write_cache(latents, self.context, self.cache, i * self.fpb)
            self.recent.append(latents)

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.pipe.encode([prompt])

    def _sync(self) -> float:
        """Now, once the current stream's work is done (a stream, not the device: the other stream keeps running)."""
        if self.pipe.device.type == "cuda":
            torch.cuda.current_stream(self.pipe.device).synchronize()
        return time.perf_counter()

    @torch.no_grad()
    def _denoise(self) -> _Denoised:
        """Denoise the next block (its context K/V written): the unit the worker runs ahead."""
        stream = torch.cuda.stream(self._denoise_stream) if self._denoise_stream is not None else contextlib.nullcontext()
        with stream:
            t0 = self._sync()
            held, self._held = self._held, None
            latents = self.pipe.block_step(self.cache, self.context, self.noise, self.denoised, held)
            self.recent.append(latents)
            done = _Denoised(self.denoised, latents, self._sync() - t0, self.pipe, 0 if held is None else held.shape[1])
        self.denoised += 1
        return done

    @property
    def switch_frame(self) -> int:
        """The stream frame a switch made now takes effect at: the first of the next block to be denoised (`frames`,
        or with overlapped decode one block past it)."""
        return video_frames_for(self.denoised * self.fpb, self.pipe.cfg) if self.denoised else 0

    def _settle(self) -> None:
        """Wait for the block being made ahead (the cache is the worker's until then)."""
        if self._ahead is not None:
            self._ahead.result()

    @torch.no_grad()
    def next_chunk(self, more: bool = True) -> VideoChunk:
        """The next block's decoded frames: with Wan's VAE 1 + 4 per later latent for the first block and 4 per
        latent after, with the patch codec one per latent. `more`: another block will be asked for (with overlap
        it is denoised while this one decodes)."""
        called = time.perf_counter()
        if self._given:  # the given frames first, decoded as they were encoded
            latents = self._given.popleft()
            made = _Denoised(self.blocks, latents, 0.0, self.pipe, latents.shape[1])
            if self._worker is not None and more and not self._given:
                self._ahead = self._worker.submit(self._denoise)
        elif self._worker is None:
            made = self._denoise()
        else:
            made = self._ahead.result() if self._ahead is not None else self._denoise()
            self._ahead = self._worker.submit(self._denoise) if more else None  # denoises while this one decodes
        t0 = self._sync()
        frames = to_uint8_frames(self.decoder.decode(made.latents.transpose(1, 2)))
        done = self._sync()
        given = 0
        if made.given:  # the video frames the given latents decode to (the first latent of a stream to one)
            given = video_frames_for(self.blocks * self.fpb + made.given, self.pipe.cfg) - self.frames
        chunk = VideoChunk(made.block, frames, made.seconds, done - t0, self.frames, done - called, made.pipe, given)
        self.blocks += 1
        self.frames += len(frames)
        return chunk

    @torch.no_grad()
    def switch_prompt(self, prompt: str) -> float:
        """Continue the stream under `prompt` (KV re-cache of the recent clean latents); seconds spent."""
        self._settle()
        t0 = self._sync()
        self.prompt, self.context = prompt, self._encode(prompt)
        self._recache()
        return self._sync() - t0

    @torch.no_grad()
    def switch_weights(self, pipe: VideoPipeline) -> float:
        """Continue the stream with `pipe`'s generator (other weights, the same text encoder and codec): the window
        is re-cached under them as on a prompt switch, so the next block sees the past as the new weights would
        have written it; seconds spent."""
        self._settle()
        t0 = self._sync()
        if pipe is not self.pipe:  # the cache belongs to the pipeline that runs it (its graphs are bound to it)
            cache = pipe.block_step.acquire(self.latent_hw)
            cache.restart_at(self.cache.frames)
            self.pipe.block_step.release(self.cache)
            self.pipe, self.cache = pipe, cache
        self._recache()
        return self._sync() - t0

    def close(self) -> None:
        """Stop making blocks ahead and give the cache back (a graph-bound one returns to the pipeline's pool)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.cache is not None:
            self.pipe.block_step.release(self.cache)
            self.cache = None

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recache(self) -> None:
        """Rewrite the window's self-attention K/V from the recent clean latents under the current prompt and
        generator; the oldest recent block becomes the sink."""
        first = self.cache.frames - self.fpb * len(self.recent)
        self.cache.restart_at(first)
        for i, latents in enumerate(self.recent):
            self.pipe.rollout.write_cache(latents, self.context, self.cache, first + i * self.fpb)

    def chunks(self, latent_frames: int | None = None) -> Iterator[VideoChunk]:
        """Decoded chunks block by block until `latent_frames` latent frames, the given ones included (forever
        when None)."""
        if latent_frames is not None and latent_frames % self.fpb:
            raise ValueError(f"latent_frames ({latent_frames}) must be a multiple of num_frame_per_block ({self.fpb})")
        while latent_frames is None or self.blocks < latent_frames // self.fpb:
            yield self.next_chunk(more=latent_frames is None or self.blocks + 1 < latent_frames // self.fpb)

    def memory_bytes(self) -> int:
        """KV cache plus the kept clean latents (and given blocks not yet returned): constant once the window is
        full and the given frames are out."""
        kept = [*self.recent, *self._given, *([self._held] if self._held is not None else [])]
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in kept)


def warm_up(pipe: VideoPipeline, sizes: list[tuple[int, int]] | None = None, sessions: int = 1) -> float:
    """Run every shape a stream meets once per video size (height, width), so no session compiles or captures: the
    window filling, two steady blocks, a prompt switch and the block after it. With CUDA graphs, for each of
    `sessions` pooled caches (how many sessions the pipeline may serve at once). Nothing to do on the eager path.
    Seconds spent."""
    step = pipe.block_step
    if step.mode == "eager":
        return 0.0
    t0 = time.perf_counter()
    step.prepare()
    stream = pipe.cfg.stream
    words = pipe.text_encoder.vocabulary()  # a word-level model warns of words it does not know
    first, second = words[:2] if words and len(words) > 1 else ("warm up", "switch")
    for height, width in sizes or [(pipe.cfg.video.height, pipe.cfg.video.width)]:
        if step.cuda_graphs:
            sh, sw = pipe.cfg.video.vae_stride[1:]
            step.add_pool((height // sh, width // sw), sessions)
        opened = [StreamSession(pipe, first, seed=0, height=height, width=width, overlap_decode=False)
                  for _ in range(sessions if step.cuda_graphs else 1)]
        try:
            for session in opened:
                if stream.local_attn_size == -1:  # no window: every block until the cache is full is a new shape
                    for _ in range(stream.max_cache_frames // stream.num_frame_per_block):
                        session.next_chunk()
                    continue
                for _ in range(-(-stream.cache_frames // stream.num_frame_per_block) + 2):
                    session.next_chunk()
                session.switch_prompt(second)
                session.next_chunk()
                session.next_chunk()
        finally:
            for session in opened:
                session.close()
    return time.perf_counter() - t0
