"""One stream block as fixed-shape work: eager, with compiled DiT layers, or replayed from a captured CUDA graph.

A stream block is the few denoising steps of one block of latent frames plus the context re-run that leaves its
clean K/V in the cache (core.algo.rollout). Once the window is full every block does the same work on the same
shapes: evict one block's frames (into the EMA sink), then the forwards, which all write the same slots and read the
whole window. `KVCache.open_block` does the pointer arithmetic in Python first; what remains depends only on tensors
and on the block's `BlockSlots`, which take a handful of values while the window fills and then one for ever:

- `compile`: each transformer block goes through torch.compile (static shapes), with q, k and v projected by one
  matmul (`SelfAttention.fuse_qkv`, not with FP8's per-layer float8 linears); the norms, RoPE and modulation fuse
  into a few kernels. The layers share one graph per `BlockSlots` (their parameters are inputs), so the whole
  stream compiles a few small graphs, at warm-up.
- `cuda_graphs`: the whole block (eviction, forwards, re-noising, context re-run) is captured once per stream cache
  and `BlockSlots`, then replayed with the block's noise copied in. The frame position is a tensor (absolute RoPE
  gathers it), the prompt's cross-attention K/V live in buffers the graph reads, so nothing is re-captured as the
  stream advances or switches prompts. A graph is bound to its cache's buffers, so with graphs the caches come from
  a pool made at warm-up, one per session the pipeline serves.

`warm_up` runs every shape a stream meets (the window filling, the steady state, a prompt switch), so no session
compiles or captures. Noise is drawn exactly as the eager rollout draws it, so every mode makes the same stream up
to floating-point reordering.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from core.algo.rollout import NoiseFn, SelfForcedRollout
from core.model.kv_cache import BlockSlots, BlockView, KVCache, StreamLimitError
from core.stream.prefix import denoise_held_block


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    noise: torch.Tensor  # static inputs the replay reads
    start: torch.Tensor
    out: torch.Tensor  # static output the replay writes


class BlockStep:
    def __init__(self, rollout: SelfForcedRollout, compile: bool = False, cuda_graphs: bool = False,
                 fuse_qkv: bool = False):
        model = rollout.model
        device = next(model.parameters()).device
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"runtime.cuda_graphs needs the generator on CUDA (it is on {device}); "
                             "set runtime.cuda_graphs=false or runtime.device=cuda")
        self.rollout, self.model, self.device = rollout, model, device
        self.fpb = rollout.frames_per_block
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self.fuse_qkv, self.fused = fuse_qkv, False
        # One torch.compile per layer module: they share the code of WanBlock.forward and so one graph per shape.
        self.blocks = [torch.compile(block, dynamic=False) for block in model.blocks] if compile else None
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._graphs: dict[tuple[int, BlockSlots], _Graph] = {}
        self._prompt_buffers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pools: dict[tuple[int, int], list[KVCache]] = {}  # graph-bound caches per latent size
        self._free: dict[tuple[int, int], list[KVCache]] = {}  # those not in a session
        self._sizes: dict[int, tuple[int, int]] = {}  # latent size of each graph-bound cache
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Fuse the self-attention projections for the compiled path, once the weights are final (startup LoRA
        merged): warm-up calls it."""
        if self.fuse_qkv and not self.fused:
            for block in self.model.blocks:
                block.self_attn.fuse_qkv()
            self.fused = True

    @property
    def mode(self) -> str:
        """What runs a block: eager, compiled, graphs or compiled+graphs."""
        if self.cuda_graphs:
            return "compiled+graphs" if self.compiled else "graphs"
        return "compiled" if self.compiled else "eager"

    # ------------------------------------------------------------------------------------------ caches

    def acquire(self, latent_hw: tuple[int, int]) -> KVCache:
        """An empty stream cache: a fresh one, or with CUDA graphs a warmed one from the pool."""
        if not self.cuda_graphs:
            return self.model.init_cache(1, latent_hw)
        with self._lock:
            free = self._free.get(tuple(latent_hw))
            if free is None:
                raise ValueError(f"no stream caches were warmed up for latent size {tuple(latent_hw)} (warmed: "
                                 f"{sorted(self._free)}); with runtime.cuda_graphs every size a session may use is "
                                 "warmed when the pipeline starts (core.stream.session.warm_up)")
            if not free:
                raise RuntimeError(f"all {len(self._pools[tuple(latent_hw)])} warmed stream caches of latent size "
                                   f"{tuple(latent_hw)} are in use: a pipeline with CUDA graphs serves at most that "
                                   "many sessions at once (serve.max_sessions)")
            cache = free.pop()
        cache.reset()
        return cache

    def release(self, cache: KVCache) -> None:
        """Give back a cache from `acquire` (a graph-bound one returns to the pool)."""
        if self.cuda_graphs:
            with self._lock:
                free = self._free[self._sizes[id(cache)]]
                if cache not in free:
                    free.append(cache)

    def add_pool(self, latent_hw: tuple[int, int], sessions: int) -> list[KVCache]:
        """With CUDA graphs: `sessions` caches of this size for graphs to be captured for (at warm-up)."""
        key = tuple(latent_hw)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = [self.model.init_cache(1, latent_hw) for _ in range(sessions)]
                self._free[key] = list(self._pools[key])
                self._sizes.update({id(c): key for c in self._pools[key]})
            return list(self._pools[key])

    # ------------------------------------------------------------------------------------------ one block

    @torch.no_grad()
    def __call__(self, cache: KVCache, context: torch.Tensor, noise_fn: NoiseFn, block: int,
                 held: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise the stream's next block (and write its context K/V): its clean latents [B, f, C, H, W]. `held`:
        clean latents the block starts with, held fixed while the rest is denoised (core.stream.prefix); a stream
        has at most one such block, so it always runs as eager work, never captured."""
        rollout = self.rollout
        steps = len(rollout.timesteps)
        draws: list[int | str] = [-1, *range(steps - 1)]
        if rollout.context_rerun and rollout.context_noise:
            draws.append("context")
        noise = torch.stack([noise_fn(block, d) for d in draws])  # the eager rollout's order of draws
        start = cache.frames
        if cache.rope == "absolute" and start + self.fpb > self.model.rope.shape[0]:
            raise StreamLimitError(f"RoPE position {start + self.fpb - 1} is past the {self.model.rope.shape[0]}-entry "
                                   "table: absolute RoPE cannot go further; use stream.rope=window for unbounded length")
        if any(kv is None for kv in cache.cross_kv):
            cache.cross_kv = self.model.prompt_kv(context)
        slots = cache.open_block(start, self.fpb)
        start_t = torch.tensor(start, dtype=torch.int64, device=self.device)
        if self.cuda_graphs and held is None:
            return self._replay(cache, slots, noise, start_t)
        return self._run(cache, slots, noise, start_t, held)

    def _run(self, cache: KVCache, slots: BlockSlots, noise: torch.Tensor, start: torch.Tensor,
             held: torch.Tensor | None = None) -> torch.Tensor:
        """The block's tensor work, given its slots: what is compiled and captured."""
        rollout = self.rollout
        if slots.evict:
            cache.evict(slots.evict)
        view = BlockView(cache, slots)
        if held is None:
            x0 = rollout.denoise_block(noise[0], None, view, start, lambda step: noise[step + 1], self.blocks)
        else:
            x0 = denoise_held_block(rollout, noise[0], held, view, start, lambda step: noise[step + 1], self.blocks)
        if rollout.context_rerun:
            ctx = x0 if not rollout.context_noise else rollout.renoise(x0, noise[-1], float(rollout.context_noise))
            rollout.write_cache(ctx, None, view, start, blocks=self.blocks)
        return x0

    # ------------------------------------------------------------------------------------------ CUDA graphs

    def _hold_prompt(self, cache: KVCache) -> None:
        """Keep the prompt's cross-attention K/V in this cache's fixed buffers, the ones its graphs read."""
        held = self._prompt_buffers.get(id(cache))
        if held is None:
            self._prompt_buffers[id(cache)] = held = [(k.clone(), v.clone()) for k, v in cache.cross_kv]
        for i, ((hk, hv), (k, v)) in enumerate(zip(held, cache.cross_kv)):
            if k is not hk:
                hk.copy_(k)
                hv.copy_(v)
                cache.cross_kv[i] = (hk, hv)

    def _replay(self, cache: KVCache, slots: BlockSlots, noise: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        self._hold_prompt(cache)
        captured = self._graphs.get((id(cache), slots))
        if captured is None:
            return self._capture(cache, slots, noise, start)
        captured.noise.copy_(noise)
        captured.start.copy_(start)
        captured.graph.replay()
        return captured.out.clone()

    def _capture(self, cache: KVCache, slots: BlockSlots, noise: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Run this block for real (on a side stream, which also warms lazy initialisation), then record it."""
        static_noise, static_start = noise.clone(), start.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._run(cache, slots, static_noise, static_start).clone()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # recorded, not executed (the cache is not moved a second time); thread-local, so streams that other threads
        # run meanwhile (a replica warming a new weight version while it serves) are not caught by the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._run(cache, slots, static_noise, static_start)
        self._graphs[(id(cache), slots)] = _Graph(graph, static_noise, static_start, out)
        return result


def compile_counters() -> dict[str, int]:
    """Dynamo's graph and recompile counts so far in this process: a warmed stream adds none."""
    stats = torch._dynamo.utils.counters
    return {"graphs": int(stats["stats"]["unique_graphs"]), "recompiles": sum(stats["recompiles"].values())}

