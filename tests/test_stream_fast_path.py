"""The streaming fast path: a fixed-shape block step (eager, compiled), overlapped decode, and their guards.

CUDA graphs and FP8 need a GPU; here they are checked to refuse a CPU clearly, and benchmarks/gpu_check.sh runs
them against the eager path on one."""

from __future__ import annotations

import pytest
import torch

from core.algo.rollout import gaussian_noise
from core.config import PLUMBING_CONFIG, ConfigError, load_config
from core.model.wan import apply_rope, rope_tables
from core.stream.block_step import compile_counters
from core.stream.pipeline import VideoPipeline
from core.stream.session import StreamSession, warm_up
from serve.app import build_app

pytestmark = pytest.mark.usefixtures("no_grad")


def _pipe(*overrides: str) -> VideoPipeline:
    return VideoPipeline.from_config(load_config(PLUMBING_CONFIG, list(overrides)))


def _offline(pipe: VideoPipeline, prompt: str, seed: int, blocks: int) -> torch.Tensor:
    """The stream's latents as the offline rollout makes them (per-layer cache writes, Python positions)."""
    lh, lw = pipe.cfg.video.latent_hw
    noise = gaussian_noise((1, 3, pipe.cfg.model.in_dim, lh, lw), torch.Generator().manual_seed(seed), pipe.dtype, "cpu")
    return pipe.rollout.generate(pipe.encode([prompt]), pipe.generator.init_cache(1, (lh, lw)), noise, blocks)


def _streamed(session: StreamSession, blocks: int) -> torch.Tensor:
    for _ in range(blocks):
        session.next_chunk()
    return torch.cat(list(session.recent), dim=1)


@pytest.mark.parametrize("stream", [
    [],  # the plumbing config: window 12, EMA sink 3, window RoPE
    ["stream.rope=absolute", "stream.sink_mode=static"],  # Self Forcing style: the position is a gathered tensor
    ["stream.context_rerun=false"],  # the last denoising step's K/V stay in the cache
    ["runtime.dtype=bfloat16"],  # the EMA sink averaged in its float32 accumulator
])
def test_the_block_step_makes_the_offline_rollout_bit_for_bit_past_evictions(stream):
    pipe = _pipe(*stream)
    with StreamSession(pipe, "a red circle", seed=4) as session:
        streamed = _streamed(session, 8)  # 24 latent frames through a 12-frame window: 4 evictions
        assert session.cache.evictions == 4
    window = streamed.shape[1]
    assert torch.equal(streamed, _offline(pipe, "a red circle", 4, 8)[:, -window:])


def test_a_stream_without_the_context_rerun_is_a_different_stream():
    with StreamSession(_pipe(), "a red circle", seed=4) as a, \
            StreamSession(_pipe("stream.context_rerun=false"), "a red circle", seed=4) as b:
        assert torch.equal(a.next_chunk().frames, b.next_chunk().frames)  # the first block sees no context
        assert not torch.equal(a.next_chunk().frames, b.next_chunk().frames)


def test_a_tensor_rope_position_rotates_as_the_int_one():
    tables, x = rope_tables(16), torch.randn(1, 3 * 2 * 2, 2, 16, dtype=torch.float64)
    assert torch.equal(apply_rope(x, tables, (3, 2, 2), 37), apply_rope(x, tables, (3, 2, 2), torch.tensor(37)))


@pytest.fixture(scope="module")
def compiled_and_eager(cxx_compiler):
    eager, compiled = _pipe(), _pipe("runtime.compile=true")
    compiled.generator.load_state_dict(eager.generator.state_dict())
    assert warm_up(eager) == 0.0 and warm_up(compiled) > 0  # eager has nothing to warm
    return compiled, eager


@pytest.mark.compile
def test_the_compiled_stream_equals_eager_past_evictions_and_through_a_prompt_switch(compiled_and_eager):
    compiled, eager = compiled_and_eager
    assert compiled.block_step.mode == "compiled"
    with StreamSession(compiled, "a red circle", seed=3) as fast, StreamSession(eager, "a red circle", seed=3) as ref:
        for block in range(12):
            if block == 7:  # after 3 evictions into the EMA sink
                fast.switch_prompt("a blue square")
                ref.switch_prompt("a blue square")
            fast.next_chunk(), ref.next_chunk()
            torch.testing.assert_close(fast.recent[-1], ref.recent[-1], rtol=1e-4, atol=1e-5)
        assert fast.cache.evictions == ref.cache.evictions == 8


@pytest.mark.compile
def test_the_compiled_path_projects_q_k_v_with_one_matmul_on_the_same_parameters(compiled_and_eager):
    compiled, eager = compiled_and_eager
    attn = compiled.generator.blocks[0].self_attn
    assert attn.qkv_weight is not None and eager.generator.blocks[0].self_attn.qkv_weight is None
    assert attn.k.weight.data_ptr() == attn.qkv_weight.data_ptr() + attn.q.weight.numel() * attn.q.weight.element_size()
    assert set(compiled.generator.state_dict()) == set(eager.generator.state_dict())  # Wan's keys, no new ones


def test_fused_q_k_v_equal_the_three_projections_and_follow_loaded_weights():
    model, fused = _pipe().generator.blocks[0].self_attn, _pipe().generator.blocks[0].self_attn
    fused.fuse_qkv()
    x = torch.randn(1, 8, model.q.in_features)
    for a, b in zip(model._qkv(x), fused._qkv(x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    changed = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(changed), fused.load_state_dict(changed)  # a weight switch writes through the views
    for a, b in zip(model._qkv(x), fused._qkv(x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_per_session_lora_is_refused_with_the_fast_path():
    cfg = load_config("configs/serve.yaml", ["serve.lora_adapters={style: some/folder}", "runtime.compile=true"])
    with pytest.raises(ConfigError, match="forward hooks.*serve.lora, or set runtime.compile=false"):
        build_app(cfg)


@pytest.mark.compile
def test_a_warmed_compiled_stream_never_recompiles(compiled_and_eager, monkeypatch):
    compiled, _ = compiled_and_eager
    before = compile_counters()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    with StreamSession(compiled, "a green star", seed=9) as session:
        for block in range(50):
            if block == 25:
                session.switch_prompt("a purple cube")
            session.next_chunk()
    assert compile_counters() == before


def test_overlapped_decode_makes_the_same_frames_and_switches_one_block_later():
    pipe = _pipe()
    with StreamSession(pipe, "a red circle", seed=2, overlap_decode=False) as ref, \
            StreamSession(pipe, "a red circle", seed=2, overlap_decode=True) as ahead:
        for block in range(10):
            if block == 5:
                ahead.switch_prompt("a blue square")  # block 5 is already denoised: applies from block 6
                assert ahead.switch_frame == ref.frames + 12 == 9 + 12 * 5
            if block == 6:
                ref.switch_prompt("a blue square")
            a, b = ref.next_chunk(), ahead.next_chunk()
            assert (a.block, a.first_frame) == (b.block, b.first_frame)
            assert torch.equal(a.frames, b.frames), f"block {block}"
        assert ahead.denoised == 11  # one ahead


def test_the_last_block_of_a_finite_overlapped_stream_is_not_made_ahead():
    with StreamSession(_pipe(), "a red circle", seed=2, overlap_decode=True) as session:
        assert len(list(session.chunks(12))) == 4 and session.denoised == 4


def test_cuda_graphs_and_fp8_refuse_a_cpu_with_what_to_do():
    with pytest.raises(ValueError, match="runtime.cuda_graphs needs the generator on CUDA.*runtime.cuda_graphs=false"):
        _pipe("runtime.device=cpu", "runtime.cuda_graphs=true")
    with pytest.raises(ValueError, match="runtime.fp8 needs a CUDA GPU.*runtime.fp8=false"):
        _pipe("runtime.device=cpu", "runtime.fp8=true")


def test_a_chunk_names_the_weights_that_made_it_when_a_weight_switch_waits_for_the_block_ahead():
    pipe = _pipe()
    other = pipe.with_weights({k: v * 0.5 for k, v in pipe.generator.state_dict().items()})
    with StreamSession(pipe, "a red circle", seed=2, overlap_decode=False) as ref, \
            StreamSession(pipe, "a red circle", seed=2, overlap_decode=True) as ahead:
        for session in (ref, ahead):
            session.next_chunk()
            session.switch_weights(other)
        assert ref.next_chunk().pipe is other
        assert [ahead.next_chunk().pipe for _ in range(2)] == [pipe, other]  # block 1 was denoised before the switch
