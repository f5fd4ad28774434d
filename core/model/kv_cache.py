"""KV cache of the causal generator: fixed-size buffers, a local window, sink frames and the EMA sink.

Semantics follow the reference (docs/reference.md): per layer a buffer
[B, cache_tokens, heads, head_dim] with `global_end` (absolute tokens generated)
and `local_end` (fill pointer). Only the first call of a new block advances the
pointers and may evict; the later denoising calls and the clean t=0 re-run of
that block overwrite the same slots, so the cache ends holding clean K/V.

On eviction the oldest non-sink frames leave the window. With `sink_mode: ema`
they are fused into the sink position-wise, `sink <- a*sink + (1-a)*evicted`
(Reward Forcing). When more frames are evicted than the sink holds, evicted
frame j is fused into sink frame j mod sink_size in order (the reference
replaces the sink in that case; with the standard 3-frame blocks and 3-frame
sink both agree). A 16-bit cache keeps that average in a float32 copy of the sink
and writes its cast into the sink slots (`stream.ema_sink_accumulator`): in bf16
a 0.1% update mostly rounds away and the sink would hardly move. The copy starts
from what the sink slots hold at the first eviction after they were written.

Gradient checkpointing recomputes a block in the backward pass, when the replay has
long moved the cache on. A checkpointed forward therefore goes through
`CheckpointedCache`: the first run writes the cache and keeps views of the window
it attended to, the recompute attends to those same views and writes nothing. The
views cost no memory; to keep them valid, the cache never changes a region a view
covers in place: such a write (an eviction, a rewind) first moves the layer to
fresh buffers (copy-on-write). A replay that never evicts (the paper's 21-frame
window over a 21-frame clip) never copies; streaming, without grad, never pins.

A stream block can also run as fixed-shape work (core/stream/block_step.py): `open_block` moves every layer's
pointers for the new block at once, `evict` shifts the window, and the block's forwards see a `BlockView`, whose
per-layer `WindowSlots` write to constant slots and read a constant window. The tensors are the cache's own
buffers, which no streaming write ever reallocates, so a captured CUDA graph may hold their addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config import StreamConfig


class StreamLimitError(RuntimeError):
    """The stream cannot go further with this configuration."""


@dataclass
class LayerCache:
    k: torch.Tensor
    v: torch.Tensor
    global_end: int = 0
    local_end: int = 0
    pinned: int = 0  # leading tokens of k/v that a checkpointed block holds views of
    sink_k: torch.Tensor | None = None  # float32 EMA of the sink slots [B, sink_tokens, heads, head_dim]
    sink_v: torch.Tensor | None = None
    sink_stale: bool = True  # the sink slots were written since sink_k/sink_v last copied them


@dataclass(frozen=True)
class BlockSlots:
    """Where one block's K/V go, in tokens: `evict` leave the window first, the block fills [start, end), attention
    reads [0, end). Constant once the window is full, so it keys a compiled or captured block step."""

    evict: int
    start: int
    end: int


class KVCache:
    """Self-attention caches of every layer plus the per-prompt cross-attention K/V of one stream."""

    def __init__(self, stream: StreamConfig, num_layers: int, batch: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.stream = stream
        self.tokens_per_frame = tokens_per_frame
        self.capacity = stream.cache_frames * tokens_per_frame
        self.sink_tokens = stream.sink_size * tokens_per_frame if stream.local_attn_size != -1 else 0
        shape = (batch, self.capacity, num_heads, head_dim)
        self.layers = [LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        if (stream.sink_mode == "ema" and stream.ema_sink_accumulator == "float32" and dtype.itemsize < 4
                and self.sink_tokens):
            sink_shape = (batch, self.sink_tokens, num_heads, head_dim)
            for c in self.layers:
                c.sink_k = torch.zeros(sink_shape, dtype=torch.float32, device=device)
                c.sink_v = torch.zeros(sink_shape, dtype=torch.float32, device=device)
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.evictions = 0

    @property
    def rope(self) -> str:
        return self.stream.rope

    @property
    def windowed(self) -> bool:
        return self.stream.local_attn_size != -1

    @property
    def frames(self) -> int:
        """Latent frames generated so far (absolute)."""
        return self.layers[0].global_end // self.tokens_per_frame

    def nbytes(self) -> int:
        tensors = [t for c in self.layers for t in (c.k, c.v, c.sink_k, c.sink_v) if t is not None]
        tensors += [t for kv in self.cross_kv if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self, keep_prompt: bool = False) -> None:
        """Start a new video; keep the cross-attention K/V only if the prompt stays."""
        for c in self.layers:
            c.global_end = c.local_end = 0
            c.sink_stale = True
        if not keep_prompt:
            self.cross_kv = [None] * len(self.layers)
        self.evictions = 0

    def restart_at(self, frame: int) -> None:
        """Empty the window (and the prompt's cross-attention K/V) so the next write starts at absolute `frame`:
        how a prompt switch rebuilds the cache from recent clean latents."""
        for c in self.layers:
            c.global_end, c.local_end = frame * self.tokens_per_frame, 0
            c.sink_stale = True
        self.cross_kv = [None] * len(self.layers)

    def layer(self, index: int) -> LayerView:
        return LayerView(self, index)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's K/V for frames starting at `start_frame`; return the K/V to attend to."""
        c = self.layers[layer]
        start = self.write(layer, k, v, start_frame)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Replay with grad: attend to the live tensors so gradients reach this call's K/V, and
            # keep the cached (detached) buffers free to be overwritten by later calls.
            return torch.cat([c.k[:, :start], k], dim=1), torch.cat([c.v[:, :start], v], dim=1)
        return c.k[:, :c.local_end], c.v[:, :c.local_end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_frame: int) -> int:
        """Store this call's K/V (detached) for frames starting at `start_frame`, advancing the pointers and
        evicting on the first call of a new block; return the slot they start at."""
        c = self.layers[layer]
        slots, current_end = self._slots(c, start_frame, k.shape[1])
        if slots.evict:
            self._load_sink(c)
            self._evict(c, slots.evict)
            if layer == 0:
                self.evictions += 1
        if slots.start < c.pinned:
            self._unpin(c)
        c.k[:, slots.start:slots.end] = k.detach()
        c.v[:, slots.start:slots.end] = v.detach()
        c.sink_stale |= slots.start < self.sink_tokens
        c.global_end, c.local_end = current_end, slots.end
        return slots.start

    def _slots(self, c: LayerCache, start_frame: int, new: int) -> tuple[BlockSlots, int]:
        """Where `new` tokens of frames from `start_frame` go in layer cache `c`, and its new `global_end`."""
        current_end = start_frame * self.tokens_per_frame + new
        local_end = c.local_end + current_end - c.global_end
        evict = 0
        if current_end > c.global_end and c.local_end + new > self.capacity:
            if not self.windowed:
                raise StreamLimitError(
                    f"the KV cache holds {self.stream.max_cache_frames} latent frames and no window is set "
                    f"(stream.local_attn_size=-1), so frame {current_end // self.tokens_per_frame - 1} cannot be "
                    "generated: set stream.local_attn_size (e.g. 12) and stream.sink_size (e.g. 3) for longer videos")
            evict = c.local_end + new - self.capacity
            local_end -= evict
        if local_end - new < 0:
            raise StreamLimitError(f"frame {start_frame} lies before the cached window; "
                                     "a stream can only rewrite its latest block")
        return BlockSlots(evict, local_end - new, local_end), current_end

    def open_block(self, start_frame: int, frames: int) -> BlockSlots:
        """Advance every layer's pointers for a new block of `frames` latent frames at `start_frame`, as its first
        write would, touching no slot of the window: the eviction (`evict`) and the writes (`BlockView`) then run as
        fixed-shape work, the same for every block once the window is full. Where the block evicts, the float32 EMA
        of the sink starts here if it must: whether it must is Python state, which a captured `evict` cannot read."""
        new = frames * self.tokens_per_frame
        slots, current_end = self._slots(self.layers[0], start_frame, new)
        if current_end <= self.layers[0].global_end:
            raise StreamLimitError(f"frame {start_frame} is not a new block (the stream is at frame {self.frames})")
        for c in self.layers:
            if c.pinned:
                self._unpin(c)
            if slots.evict:
                self._load_sink(c)
            c.sink_stale |= slots.start < self.sink_tokens
            c.global_end, c.local_end = current_end, slots.end
        self.evictions += bool(slots.evict)
        return slots

    def evict(self, tokens: int) -> None:
        """Drop the oldest `tokens` non-sink tokens of every layer (fused into the EMA sink): `open_block`'s eviction."""
        for c in self.layers:
            self._evict(c, tokens)

    def pin(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `tokens` cached K/V of `layer` that keep their values: later writes there copy first."""
        c = self.layers[layer]
        c.pinned = max(c.pinned, tokens)
        return c.k[:, :tokens], c.v[:, :tokens]

    @staticmethod
    def _unpin(c: LayerCache) -> None:
        """Copy-on-write: the pinned views keep the old buffers; the cache goes on in copies."""
        c.k, c.v, c.pinned = c.k.clone(), c.v.clone(), 0

    def _load_sink(self, c: LayerCache) -> None:
        """Start the float32 EMA of the sink from what the sink slots hold now, if they were written since."""
        if c.sink_k is not None and c.sink_stale:
            c.sink_k.copy_(c.k[:, :self.sink_tokens])
            c.sink_v.copy_(c.v[:, :self.sink_tokens])
            c.sink_stale = False

    def _evict(self, c: LayerCache, n_evict: int) -> None:
        if c.pinned:
            self._unpin(c)
        sink = self.sink_tokens
        n_roll = c.local_end - n_evict - sink
        evicted_k = c.k[:, sink:sink + n_evict].clone()
        evicted_v = c.v[:, sink:sink + n_evict].clone()
        c.k[:, sink:sink + n_roll] = c.k[:, sink + n_evict:sink + n_evict + n_roll].clone()
        c.v[:, sink:sink + n_roll] = c.v[:, sink + n_evict:sink + n_evict + n_roll].clone()
        if self.stream.sink_mode == "ema":
            self._fuse_into_sink(c, evicted_k, evicted_v)

    def _fuse_into_sink(self, c: LayerCache, evicted_k: torch.Tensor, evicted_v: torch.Tensor) -> None:
        """The EMA, in place: in the float32 accumulators when the cache has them (then cast into the sink slots),
        else in the cache itself."""
        alpha, tpf = self.stream.compression_alpha, self.tokens_per_frame
        sink_frames = self.stream.sink_size
        sink_k, sink_v = (c.k, c.v) if c.sink_k is None else (c.sink_k, c.sink_v)
        for j in range(evicted_k.shape[1] // tpf):
            dst = slice((j % sink_frames) * tpf, (j % sink_frames + 1) * tpf)
            src = slice(j * tpf, (j + 1) * tpf)
            sink_k[:, dst] = alpha * sink_k[:, dst] + (1 - alpha) * evicted_k[:, src].to(sink_k.dtype)
            sink_v[:, dst] = alpha * sink_v[:, dst] + (1 - alpha) * evicted_v[:, src].to(sink_v.dtype)
        if c.sink_k is not None:
            c.k[:, :self.sink_tokens] = c.sink_k
            c.v[:, :self.sink_tokens] = c.sink_v


class CheckpointedCache:
    """The cache as one gradient-checkpointed forward sees it, so the recompute in backward sees the same.

    The first `update` of a layer writes the cache and pins the window before its slots; a second one (the
    recompute) attends to that pinned window with the recomputed K/V and leaves the cache untouched.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rope(self) -> str:
        return self.cache.rope

    def layer(self, index: int) -> LayerView:
        return LayerView(self, index)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V to attend to: the pinned window of the first run, then this run's own K/V (live, for the grad)."""
        if layer not in self.windows:
            self.windows[layer] = self.cache.pin(layer, self.cache.write(layer, k, v, start_frame))
        past_k, past_v = self.windows[layer]
        return torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)


@dataclass
class LayerView:
    """One layer of a cache, as a transformer block's self-attention uses it: `rope` and `update(k, v, start_frame)`."""

    cache: KVCache | CheckpointedCache
    index: int

    @property
    def rope(self) -> str:
        return self.cache.rope

    def update(self, k: torch.Tensor, v: torch.Tensor, start_frame: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.index, k, v, start_frame)


@dataclass
class WindowSlots:
    """One layer's buffers as a fixed-shape block step uses them: this call's K/V overwrite slots [start, end) and
    attention reads [0, end). Only tensors and constants, so one compiled graph serves every layer and every block
    with the same `BlockSlots`, and a captured CUDA graph replays it."""

    k: torch.Tensor
    v: torch.Tensor
    start: int
    end: int
    rope: str

    def update(self, k: torch.Tensor, v: torch.Tensor, start_frame: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[:, self.start:self.end] = k
        self.v[:, self.start:self.end] = v
        return self.k[:, :self.end], self.v[:, :self.end]


class BlockView:
    """A cache after `open_block`, as the block's forwards see it: per layer `WindowSlots`, and the prompt's
    cross-attention K/V (already computed)."""

    def __init__(self, cache: KVCache, slots: BlockSlots):
        if any(kv is None for kv in cache.cross_kv):
            raise ValueError("a block view needs the prompt's cross-attention K/V in the cache (KVCache.cross_kv)")
        self.rope = cache.rope
        self.cross_kv = cache.cross_kv
        self.layers = [WindowSlots(c.k, c.v, slots.start, slots.end, cache.rope) for c in cache.layers]

    def layer(self, index: int) -> WindowSlots:
        return self.layers[index]
