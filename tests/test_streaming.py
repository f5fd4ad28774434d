"""Interactive streams: blocks equal the offline rollout, memory stays flat, prompt switches re-cache the window."""

from __future__ import annotations

import pytest
import torch

from core.algo.rollout import gaussian_noise
from core.codecs.video import to_uint8_frames
from core.config import PLUMBING_CONFIG, load_config
from core.stream.pipeline import VideoPipeline
from core.stream.session import StreamSession

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.from_config(load_config(PLUMBING_CONFIG, ["runtime.dtype=float64"]))


def test_session_blocks_equal_the_offline_rollout_and_full_decode(pipe):
    session = StreamSession(pipe, "a red circle", seed=5)
    chunks = [session.next_chunk() for _ in range(3)]
    assert [c.first_frame for c in chunks] == [0, 9, 21] and session.frames == 33
    lh, lw = pipe.cfg.video.latent_hw
    noise = gaussian_noise((1, 3, 16, lh, lw), torch.Generator().manual_seed(5), torch.float64, "cpu")
    latents = pipe.rollout.generate(pipe.text_encoder.encode(["a red circle"]), pipe.generator.init_cache(1, (lh, lw)),
                                    noise, 3)
    expected = to_uint8_frames(pipe.vae.decode(latents.transpose(1, 2)))
    assert torch.equal(torch.cat([c.frames for c in chunks]), expected)


def test_long_session_memory_is_flat(pipe):
    session = StreamSession(pipe, "a blue square", seed=0)
    for _ in range(6):
        session.next_chunk()
    early = session.memory_bytes()
    for _ in range(30):
        session.next_chunk()
    assert session.cache.evictions > 0 and session.memory_bytes() == early
    assert len(session.recent) == pipe.cfg.stream.local_attn_size // 3


def test_switching_to_the_same_prompt_before_any_eviction_changes_nothing(pipe):
    a, b = StreamSession(pipe, "a green star", seed=1), StreamSession(pipe, "a green star", seed=1)
    for _ in range(2):
        a.next_chunk(), b.next_chunk()
    b.switch_prompt("a green star")  # re-cache rebuilds exactly the cache it replaces
    assert torch.equal(a.next_chunk().frames, b.next_chunk().frames)


def test_switching_prompt_mid_stream_changes_what_follows(pipe):
    a, b = StreamSession(pipe, "a green star", seed=1), StreamSession(pipe, "a green star", seed=1)
    for _ in range(8):  # past the window: evictions and the EMA sink
        a.next_chunk(), b.next_chunk()
    assert b.switch_prompt("a purple cube spins") >= 0 and b.prompt == "a purple cube spins"
    new_context = pipe.text_encoder.encode(["a purple cube spins"])
    expected_k = pipe.generator.blocks[0].cross_attn.context_kv(pipe.generator.embed_context(new_context))[0]
    after_a, after_b = a.next_chunk(), b.next_chunk()
    assert torch.equal(b.cache.cross_kv[0][0], expected_k)
    assert after_b.first_frame == after_a.first_frame and not torch.equal(after_a.frames, after_b.frames)
    for _ in range(5):
        b.next_chunk()
    assert b.memory_bytes() == a.memory_bytes()


def test_session_rejects_a_size_off_the_latent_grid(pipe):
    with pytest.raises(ValueError, match="not a multiple of 16x16"):
        StreamSession(pipe, "x", seed=0, height=72, width=64)
    assert StreamSession(pipe, "x", seed=0, height=32, width=96).next_chunk().frames.shape == (9, 32, 96, 3)


def test_switching_to_the_same_weights_before_any_eviction_changes_nothing(pipe):
    """A weight-version switch re-caches the window under the new generator: with the same weights in a new
    generator, the stream goes on exactly as if nothing had happened."""
    a, b = StreamSession(pipe, "a green star", seed=1), StreamSession(pipe, "a green star", seed=1)
    for _ in range(2):
        a.next_chunk(), b.next_chunk()
    twin = pipe.with_weights(pipe.generator.state_dict())
    assert twin.generator is not pipe.generator and twin.text_encoder is pipe.text_encoder
    b.switch_weights(twin)
    assert b.pipe is twin
    assert torch.equal(a.next_chunk().frames, b.next_chunk().frames)


def test_switching_weights_mid_stream_changes_what_follows_and_keeps_the_frame_count(pipe):
    a, b = StreamSession(pipe, "a green star", seed=1), StreamSession(pipe, "a green star", seed=1)
    for _ in range(8):  # past the window: evictions and the EMA sink
        a.next_chunk(), b.next_chunk()
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=v.dtype)
             for k, v in pipe.generator.state_dict().items()}
    other = pipe.with_weights(moved)
    assert b.switch_weights(other) >= 0
    after_a, after_b = a.next_chunk(), b.next_chunk()
    assert after_a.first_frame == after_b.first_frame and after_a.frames.shape == after_b.frames.shape
    assert not torch.equal(after_a.frames, after_b.frames)
    again = StreamSession(other, "a green star", seed=1)  # the new generator is the one that runs: not the old one
    assert not torch.equal(again.next_chunk().frames, StreamSession(pipe, "a green star", seed=1).next_chunk().frames)
