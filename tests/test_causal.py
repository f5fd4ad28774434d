"""Causal generator: cached streaming equals block-causal forwards, bounded memory, clear limits, replay."""

from __future__ import annotations

import pytest
import torch

from core.algo.rollout import SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.config import StreamConfig, WanArchConfig
from core.model.kv_cache import CheckpointedCache, KVCache, StreamLimitError
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


def _cache(stream: StreamConfig, tpf=2) -> KVCache:
    return KVCache(stream, num_layers=1, batch=1, tokens_per_frame=tpf, num_heads=1, head_dim=1,
                   dtype=torch.float64, device="cpu")


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
