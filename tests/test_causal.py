"""Causal generator: cached streaming equals block-causal forwards, bounded memory, clear limits, replay."""

from __future__ import annotations

import copy

import pytest
import torch

from core.algo.rollout import SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.config import StreamConfig, WanArchConfig
from core.model.kv_cache import BlockView, CheckpointedCache, KVCache, StreamLimitError
from core.model.wan import CausalWanModel

ARCH = WanArchConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, text_len=8)
SCHED = FlowMatchScheduler()
STEPS = SCHED.denoising_timesteps([1000, 750, 500, 250])


def make(stream: StreamConfig, dtype=torch.float64, seed=0) -> CausalWanModel:
    torch.manual_seed(seed)
    model = CausalWanModel(ARCH, stream).to(dtype).eval()
    with torch.no_grad():  # non-trivial modulation and head (their init is near zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def setup(model, latent_hw=(4, 4), seed=1, context_noise=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    ctx = torch.randn(1, 5, ARCH.text_dim, generator=g, dtype=dtype)
    fpb = model.stream.num_frame_per_block
    noise = gaussian_noise((1, fpb, ARCH.in_dim, *latent_hw), g, dtype, "cpu")
    return SelfForcedRollout(model, SCHED, STEPS, context_noise), ctx, noise, model.init_cache(1, latent_hw)


@pytest.mark.parametrize("stream", [
    StreamConfig(),                                                          # Self Forcing global cache
    StreamConfig(rope="window", local_attn_size=12, sink_size=3, sink_mode="ema"),  # Reward Forcing, no eviction yet
], ids=["absolute", "window"])
def test_cached_rollout_equals_block_causal_forward(stream):
    model = make(stream)
    rollout, ctx, noise, cache = setup(model)
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append((a[0], a[1], out)), with_kwargs=True)
    final = rollout.generate(ctx, cache, noise, num_blocks=3).transpose(1, 2)  # [B, C, F, H, W]
    hook.remove()
    per_block = len(STEPS) + 1
    with torch.no_grad():
        # the context re-runs at t=0 equal one block-causal forward over all final frames
        full = model(final, torch.zeros(1, final.shape[2]), ctx)
        ctx_runs = torch.cat([calls[b * per_block + len(STEPS)][2] for b in range(3)], dim=2)
        assert (full - ctx_runs).abs().max() < 1e-12
        # denoising step i of every block equals one teacher-forcing forward on the clean frames
        for i in range(len(STEPS)):
            noisy = torch.cat([calls[b * per_block + i][0] for b in range(3)], dim=2)
            t = torch.cat([calls[b * per_block + i][1] for b in range(3)], dim=1)
            tf = model(noisy, t, ctx, clean_x=final)
            cached = torch.cat([calls[b * per_block + i][2] for b in range(3)], dim=2)
            assert (tf - cached).abs().max() < 1e-12, f"step {i}"


def test_long_rollout_keeps_cache_size_constant():
    stream = StreamConfig(rope="window", local_attn_size=12, sink_size=3, sink_mode="ema")
    model = make(stream, torch.float32)
    rollout, ctx, noise, cache = setup(model)
    ptr = cache.layers[0].k.data_ptr()
    sizes, n_blocks = [], 100  # 300 latent frames
    for block in rollout.stream(ctx, cache, noise, n_blocks):
        assert torch.isfinite(block.latents).all()
        sizes.append(cache.nbytes())  # self-attention buffers + the prompt's cross-attention K/V
    assert set(sizes) == {sizes[0]} and cache.layers[0].k.data_ptr() == ptr
    assert cache.frames == 300 and cache.evictions == n_blocks - stream.local_attn_size // stream.num_frame_per_block


def test_window_rope_is_unbounded_and_absolute_rope_stops_clearly():
    kw = dict(local_attn_size=6, sink_size=3, num_frame_per_block=3)
    n_blocks = 1026 // 3  # past the 1024-entry RoPE table
    window = make(StreamConfig(rope="window", sink_mode="ema", **kw), torch.float32)
    rollout, ctx, noise, cache = setup(window, latent_hw=(2, 2))
    assert sum(1 for _ in rollout.stream(ctx, cache, noise, n_blocks)) == n_blocks
    absolute = make(StreamConfig(rope="absolute", **kw), torch.float32)
    rollout, ctx, noise, cache = setup(absolute, latent_hw=(2, 2))
    with pytest.raises(StreamLimitError, match="absolute RoPE cannot go further; use stream.rope=window"):
        for _ in rollout.stream(ctx, cache, noise, n_blocks):
            pass
    assert cache.frames == 1023  # frames 0..1022 were generated, the block reaching 1024 was refused


def test_global_cache_refuses_to_overflow():
    model = make(StreamConfig(max_cache_frames=6), torch.float32)
    rollout, ctx, noise, cache = setup(model)
    with pytest.raises(StreamLimitError, match="set stream.local_attn_size"):
        list(rollout.stream(ctx, cache, noise, 3))
    assert cache.frames == 6


def _cache(stream: StreamConfig, tpf=2, dtype=torch.float64, head_dim=1) -> KVCache:
    return KVCache(stream, num_layers=1, batch=1, tokens_per_frame=tpf, num_heads=1, head_dim=head_dim,
                   dtype=dtype, device="cpu")


def _write_frames(cache: KVCache, values: list[float], start_frame: int):
    """Write one block whose frame j has every K/V entry equal to values[j]."""
    kv = torch.tensor(values, dtype=torch.float64).repeat_interleave(cache.tokens_per_frame).view(1, -1, 1, 1)
    return cache.update(0, kv, kv, start_frame)


@pytest.mark.parametrize("mode, alpha", [("ema", 0.75), ("static", 0.75)])
def test_sink_update_on_eviction(mode, alpha):
    stream = StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode=mode, compression_alpha=alpha)
    cache = _cache(stream)
    _write_frames(cache, [1, 2, 3], 0)      # sink
    _write_frames(cache, [4, 5, 6], 3)      # fills the window
    keys, _ = _write_frames(cache, [7, 8, 9], 6)  # evicts frames 3..5 (the oldest non-sink)
    frames = keys[0, ::2, 0, 0].tolist()
    sink = [alpha * s + (1 - alpha) * e for s, e in zip([1, 2, 3], [4, 5, 6])] if mode == "ema" else [1, 2, 3]
    assert frames == pytest.approx(sink + [7, 8, 9])
    # later calls of the same block overwrite its slots and never evict again
    keys, _ = _write_frames(cache, [0, 0, 0], 6)
    assert keys[0, ::2, 0, 0].tolist() == pytest.approx(sink + [0, 0, 0]) and cache.evictions == 1


def test_ema_sink_smaller_than_evicted_block_fuses_frame_by_frame():
    stream = StreamConfig(rope="window", local_attn_size=4, sink_size=1, sink_mode="ema", compression_alpha=0.5)
    cache = _cache(stream, tpf=1)
    _write_frames(cache, [8], 0)
    _write_frames(cache, [1, 2, 3], 1)  # window full: sink + 3 frames
    keys, _ = _write_frames(cache, [0, 0, 0], 4)  # evicts 1, 2, 3 into the single sink frame in order
    assert keys[0, 0, 0, 0].item() == pytest.approx(((8 * 0.5 + 1 * 0.5) * 0.5 + 2 * 0.5) * 0.5 + 3 * 0.5)


def _ema_stream(accumulator: str = "float32") -> StreamConfig:
    return StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode="ema", ema_sink_accumulator=accumulator)


def _ema_video(cache: KVCache, seed: int, blocks: int, fixed_shape: bool, start_frame: int = 0):
    """Stream `blocks` 3-frame blocks of random K/V into `cache`, each written twice (noisy, then clean, as a block's
    calls do), by the plain `update` path or by the fixed-shape one (`open_block`, `evict`, `BlockView`). The sink
    block's entries lie in [1, 1.9], the later ones in [2.5, 3.5], so the sink has somewhere to go. Returns the
    sink's first K/V and their EMA over the evicted clean K/V, computed in float64 from the values the cache holds."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 3 * cache.tokens_per_frame, *cache.layers[0].k.shape[2:])
    dtype, alpha = cache.layers[0].k.dtype, cache.stream.compression_alpha
    if fixed_shape:
        cache.cross_kv = [(torch.empty(0), torch.empty(0))] * len(cache.layers)  # a block view needs the prompt's
    clean = []
    for b in range(blocks):
        start = start_frame + 3 * b
        noisy_k, noisy_v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        k, v = (((1.0 if b == 0 else 2.5) + 0.9 * torch.rand(shape, generator=g)).to(dtype) for _ in range(2))
        if fixed_shape:
            slots = cache.open_block(start, 3)
            if slots.evict:
                cache.evict(slots.evict)
            layer = BlockView(cache, slots).layer(0)
        else:
            layer = cache.layer(0)
        layer.update(noisy_k, noisy_v, start)
        layer.update(k, v, start)
        clean.append((k.double(), v.double()))
    ema = clean[0]
    for evicted in clean[1:-1]:  # block b evicts block b - 1 into the sink, frame j into sink frame j
        ema = [alpha * s + (1 - alpha) * e for s, e in zip(ema, evicted)]
    return clean[0], ema


def _sink_error(cache: KVCache, ema: list[torch.Tensor]) -> float:
    """Largest relative difference between the cache's sink slots (K and V) and `ema`."""
    c, n = cache.layers[0], cache.sink_tokens
    return max(((got[:, :n].double() - want).abs() / want.abs()).max().item() for got, want in zip((c.k, c.v), ema))


SINK_TOLERANCE = 2.0 ** -8 + 1e-5  # bf16's relative rounding (8 significant bits) of a float32 average of 300 terms


def test_bf16_ema_sink_moves_with_a_float32_accumulator_and_stays_put_in_the_cache_dtype():
    """At alpha 0.999 an eviction moves the sink by 0.1% of the way to the evicted frame, less than half a bf16 step:
    averaged in the bf16 cache (the reference, `ema_sink_accumulator: cache`) the sink never moves; averaged in
    float32 it follows the float64 EMA to within the bf16 rounding of its slots."""
    errors = {}
    for accumulator in ("float32", "cache"):
        cache = _cache(_ema_stream(accumulator), dtype=torch.bfloat16, head_dim=4)
        first, ema = _ema_video(cache, seed=0, blocks=300, fixed_shape=False)  # 298 evictions
        errors[accumulator] = _sink_error(cache, ema)
        if accumulator == "cache":  # not one bf16 step in 298 evictions
            assert _sink_error(cache, first) == 0
    assert errors["float32"] <= SINK_TOLERANCE, errors
    assert errors["cache"] > 0.05, errors  # the float64 EMA went 26% of the way to the evicted frames


def test_fixed_shape_eviction_fuses_the_sink_as_the_plain_path_across_reset_and_restart():
    """The block step's `open_block` / `evict` (what a CUDA graph captures) keep the same float32 sink as per-layer
    writes, in the same buffers throughout; a new video (`reset`) or a prompt switch (`restart_at`) starts the
    average again from its own first frames."""
    caches = {fixed: _cache(_ema_stream(), dtype=torch.bfloat16, head_dim=4) for fixed in (False, True)}
    for fixed, cache in caches.items():
        buffers = [t.data_ptr() for t in (cache.layers[0].sink_k, cache.layers[0].sink_v)]
        _ema_video(cache, seed=1, blocks=8, fixed_shape=fixed)
        cache.reset()
        _, ema = _ema_video(cache, seed=2, blocks=40, fixed_shape=fixed)
        assert _sink_error(cache, ema) <= SINK_TOLERANCE
        frame = cache.frames
        cache.restart_at(frame)
        _, ema = _ema_video(cache, seed=3, blocks=40, fixed_shape=fixed, start_frame=frame)
        assert _sink_error(cache, ema) <= SINK_TOLERANCE and cache.evictions == 76
        assert buffers == [t.data_ptr() for t in (cache.layers[0].sink_k, cache.layers[0].sink_v)]
    plain, fixed = caches[False].layers[0], caches[True].layers[0]
    assert all(torch.equal(a, b) for a, b in zip((plain.k, plain.v, plain.sink_k, plain.sink_v),
                                                  (fixed.k, fixed.v, fixed.sink_k, fixed.sink_v)))


@pytest.mark.parametrize("dtype, sink_mode, accumulator, kept", [
    (torch.bfloat16, "ema", "float32", True),
    (torch.float16, "ema", "float32", True),
    (torch.bfloat16, "ema", "cache", False),
    (torch.bfloat16, "static", "float32", False),
    (torch.float32, "ema", "float32", False),  # the cache itself is the accumulator
    (torch.float64, "ema", "float32", False),
])
def test_a_float32_sink_accumulator_exists_only_for_an_ema_sink_in_a_16_bit_cache(dtype, sink_mode, accumulator, kept):
    stream = StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode=sink_mode,
                          ema_sink_accumulator=accumulator)
    cache = KVCache(stream, num_layers=2, batch=2, tokens_per_frame=5, num_heads=2, head_dim=4, dtype=dtype, device="cpu")
    layers, batch, dim = 2, 2, 8
    window = layers * 2 * batch * 6 * 5 * dim * dtype.itemsize  # k and v of 6 frames x 5 tokens
    accumulators = layers * 2 * batch * 3 * 5 * dim * 4  # float32 k and v of the 3 sink frames
    assert cache.nbytes() == window + kept * accumulators
    assert all((c.sink_k is not None) == (c.sink_v is not None) == kept for c in cache.layers)


def test_checkpointed_window_survives_eviction_and_rewind():
    """What a checkpointed call attended to is what its recompute attends to, whatever the cache did since."""
    stream = StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode="ema", compression_alpha=0.5)
    cache = _cache(stream)

    def frames(values):
        return torch.tensor(values, dtype=torch.float64).repeat_interleave(2).view(1, -1, 1, 1)

    def seen(keys):
        return keys[0, ::2, 0, 0].tolist()

    _write_frames(cache, [1, 2, 3], 0)
    first = CheckpointedCache(cache)
    assert seen(first.update(0, frames([4, 5, 6]), frames([4, 5, 6]), 3)[0]) == [1, 2, 3, 4, 5, 6]
    _write_frames(cache, [7, 8, 9], 6)  # evicts 4..6 and fuses them into the sink
    assert seen(first.update(0, frames([4, 5, 6]), frames([4, 5, 6]), 3)[0]) == [1, 2, 3, 4, 5, 6]
    second = CheckpointedCache(cache)  # the latest block again: attends to the fused sink
    assert seen(second.update(0, frames([7, 7, 7]), frames([7, 7, 7]), 6)[0]) == [2.5, 3.5, 4.5, 7, 7, 7]
    cache.restart_at(9)
    _write_frames(cache, [0, 0, 0], 9)  # rewinds onto the slots the second call attended to
    assert seen(second.update(0, frames([7, 7, 7]), frames([7, 7, 7]), 6)[0]) == [2.5, 3.5, 4.5, 7, 7, 7]
    assert seen(cache.layers[0].k[:, :12]) == [0, 0, 0, 7, 7, 7] and cache.frames == 12
    assert cache.evictions == 1  # the recomputes wrote nothing


@pytest.mark.parametrize("context_noise", [0, 50])
def test_replay_reproduces_training_rollout_with_grad(context_noise):
    stream = StreamConfig(rope="window", local_attn_size=12, sink_size=3, sink_mode="ema")
    model = make(stream)
    for exit_index in range(len(STEPS)):
        rollout, ctx, noise, cache = setup(model, context_noise=context_noise)
        record = rollout.training_rollout(ctx, cache, noise, num_blocks=5, exit_index=exit_index)  # evicts at block 4
        assert record.exit_timestep == float(STEPS[exit_index])
        assert all(b.noisy.requires_grad is False for b in record.blocks)
        model.zero_grad()
        replayed = rollout.replay_exit_steps(record, ctx, model.init_cache(1, (4, 4)))
        assert replayed.requires_grad
        assert (replayed - record.clean_latents()).abs().max() < 1e-12
        replayed.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


def test_training_rollout_draws_exit_from_generator():
    model = make(StreamConfig())
    rollout, ctx, noise, cache = setup(model)
    exits = {rollout.training_rollout(ctx, model.init_cache(1, (4, 4)), noise, 1,
                                      generator=torch.Generator().manual_seed(s)).exit_index for s in range(12)}
    assert exits <= set(range(len(STEPS))) and len(exits) > 1
    with pytest.raises(ValueError, match="exit_index"):
        rollout.training_rollout(ctx, cache, noise, 1, exit_index=len(STEPS))


def test_gradient_checkpointing_gives_same_gradients():
    model = make(StreamConfig(), torch.float64)
    x = torch.randn(1, 16, 6, 4, 4, dtype=torch.float64)
    t = torch.full((1, 6), 500.0)
    ctx = torch.randn(1, 5, ARCH.text_dim, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-12


@pytest.mark.parametrize("stream", [
    StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode="ema", compression_alpha=0.5),
    StreamConfig(rope="window", local_attn_size=9, sink_size=3, sink_mode="static"),
    StreamConfig(rope="window", local_attn_size=12, sink_size=3, sink_mode="ema"),
    StreamConfig(),
], ids=["ema-sink-evicts", "static-sink-evicts", "window-holds-clip", "global-cache"])
def test_gradient_checkpointing_gives_same_replay_gradients(stream):
    """The recompute in backward must attend to the window the first forward saw, although by then the replay
    has moved the cache on (later blocks written, frames evicted, the EMA sink fused), and leave the cache alone.
    Without eviction (the paper's window holds the clip) it does so without a single copy of the cache."""
    model = make(stream)
    rollout, ctx, noise, cache = setup(model)
    record = rollout.training_rollout(ctx, cache, noise, num_blocks=4, exit_index=1)
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(1, 12, ARCH.in_dim, 4, 4, dtype=torch.float64, generator=g)
    grads, caches = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        replay_cache = model.init_cache(1, (4, 4))
        buffers = [(c.k.data_ptr(), c.v.data_ptr()) for c in replay_cache.layers]
        loss = (rollout.replay_exit_steps(record, ctx, replay_cache) * weights).sum()
        after_forward = [(c.k.clone(), c.v.clone(), c.global_end, c.local_end) for c in replay_cache.layers]
        loss.backward()
        for (k, v, g_end, l_end), c in zip(after_forward, replay_cache.layers):
            assert torch.equal(k, c.k) and torch.equal(v, c.v) and (g_end, l_end) == (c.global_end, c.local_end)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        caches.append(replay_cache)
        copied = buffers != [(c.k.data_ptr(), c.v.data_ptr()) for c in replay_cache.layers]
        assert copied == (ckpt and replay_cache.evictions > 0)
    model.gradient_checkpointing = False
    evictions = 4 - stream.cache_frames // 3 if stream.local_attn_size != -1 else 0
    assert caches[0].evictions == caches[1].evictions == evictions
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() < 1e-12


def test_dtype_cast_keeps_rope_table_exact():
    model = make(StreamConfig(), torch.float32).to(torch.bfloat16)
    assert model.rope.dtype == torch.float64
    out = model(torch.randn(1, 16, 3, 4, 4, dtype=torch.bfloat16), torch.full((1, 3), 1000.0),
                torch.randn(1, 5, ARCH.text_dim, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bf16_model_computes_time_embedding_and_modulation_in_float32():
    """As Wan does: e and e0 are float32 whatever the weights' dtype, equal to a float32 run of the same (bf16)
    weights, and a block's modulation, modulated norms and gated adds use them in float32. The time projection is
    scaled so that |e0| reaches ~8, where rounding e0 and the modulation to bf16 (as before) nearly doubles a block's
    error."""
    model = make(StreamConfig(), torch.float32)
    with torch.no_grad():
        model.time_projection[1].weight.mul_(50)
    bf16 = model.to(torch.bfloat16)
    f32 = copy.deepcopy(bf16).to(torch.float32)  # the same bf16-rounded weights
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, ARCH.in_dim, 3, 8, 8, generator=g)
    t = torch.tensor([[1000.0, 937.5, 250.0]])
    ctx = torch.randn(1, 5, ARCH.text_dim, generator=g)
    runs = []
    with torch.no_grad():
        for m, dtype in ((bf16, torch.bfloat16), (f32, torch.float32)):
            tokens, grid, e, e0 = m._embed(x.to(dtype), t)
            block = m.blocks[0]
            out = block(tokens, e0, block.cross_attn.context_kv(m.embed_context(ctx.to(dtype))), grid=grid,
                        rope=m.rope, backend=m.attention_backend)
            runs.append((e, e0, tokens, out))
    (e, e0, tokens, out), (e_f32, e0_f32, tokens_f32, out_f32) = runs
    assert e.dtype == e0.dtype == torch.float32 and e0_f32.abs().max() > 5
    torch.testing.assert_close(e, e_f32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e0, e0_f32, rtol=1e-6, atol=1e-6)
    # measured against what the block adds (its output's own rounding of x + update would hide the update's error):
    # 0.0051 here; 0.0090 with e, e0 and the modulation in bf16 (as before), 0.0073 with only the modulation in bf16
    assert out.dtype == torch.bfloat16
    assert (out.float() - out_f32).norm() / (out_f32 - tokens_f32).norm() < 0.0065


def test_replay_gradient_equals_self_forcing_in_rollout_gradient():
    """Self Forcing takes the gradient inside the rollout (exit step with grad, everything else
    without); the learner's replay of the recorded exit steps must give the same gradient."""
    stream = StreamConfig(rope="window", local_attn_size=6, sink_size=3, sink_mode="ema")  # evicts from block 2
    model = make(stream)
    exit_index, n_blocks = 2, 4
    rollout, ctx, noise, _ = setup(model)
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(1, 3 * n_blocks, ARCH.in_dim, 4, 4, dtype=torch.float64, generator=g)

    # Self Forcing: one pass, gradient through each block's exit-step forward only
    draws = [noise(b, s) for b in range(n_blocks) for s in (-1, *range(exit_index))]
    it = iter(draws)

    def replayed_noise(block, step):
        return next(it)

    cache, outputs = model.init_cache(1, (4, 4)), []
    for b in range(n_blocks):
        start = cache.frames
        x = replayed_noise(b, -1)
        for i in range(exit_index + 1):
            t = float(STEPS[i])
            with torch.set_grad_enabled(i == exit_index):
                x0 = rollout.predict_x0(x, t, ctx, cache, start)
            if i < exit_index:
                x = rollout.renoise(x0, replayed_noise(b, i), float(STEPS[i + 1]))
        outputs.append(x0)
        with torch.no_grad():
            rollout._write_context(x0.detach(), ctx, cache, start, b, replayed_noise)
    model.zero_grad()
    (torch.cat(outputs, dim=1) * weights).sum().backward()
    in_rollout = [p.grad.clone() for p in model.parameters()]

    # actor + learner: gradient-free recorded rollout, then replay of the exit steps
    it = iter(draws)
    record = rollout.training_rollout(ctx, model.init_cache(1, (4, 4)), replayed_noise, n_blocks, exit_index=exit_index)
    model.zero_grad()
    (rollout.replay_exit_steps(record, ctx, model.init_cache(1, (4, 4))) * weights).sum().backward()
    for a, p in zip(in_rollout, model.parameters()):
        assert (a - p.grad).abs().max() < 1e-10
    assert any(a.abs().sum() > 0 for a in in_rollout)
