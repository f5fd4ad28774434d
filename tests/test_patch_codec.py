"""The exact pixel-space codec (`vae.kind: patch`): bit-exact round trip, the documented channel layout,
streaming decode, its config checks, codec-dependent frame counting and `launch.py generate` with it."""

from __future__ import annotations

import pytest
import torch

import launch
from core.codecs.patch import PatchCodec
from core.codecs.video import build_codec, from_uint8_frames, latent_frames_for, to_uint8_frames, video_frames_for
from core.codecs.wan_vae import WanVAE
from core.config import PLUMBING_CONFIG, ConfigError, load_config
from core.records.video_io import read_video_file
from core.stream.pipeline import VideoPipeline
from core.stream.session import StreamSession

PATCH = ["vae.kind=patch", "video.height=32", "video.width=32", "video.vae_stride=[1,2,2]"]


def generate(*args: str) -> int:
    """`launch.py generate` on the plumbing config (random tiny weights)."""
    return launch.main(["generate", "--config", str(PLUMBING_CONFIG), *args])


def uint8_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, height, width, 3), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_round_trip_is_exact(stride, dtype):
    codec = PatchCodec(stride, 16, dtype)
    for seed, (t, h, w) in enumerate([(5, 32, 32), (21, 8, 12), (1, 2, 2)]):
        pixels = uint8_video(t, h, w, seed)
        z = codec.encode(from_uint8_frames(pixels))
        assert z.shape == (1, 16, t, h // stride, w // stride) and z.dtype == dtype
        assert not z[:, 3 * stride * stride:].any(), "padding channels are zero"
        assert torch.equal(to_uint8_frames(codec.decode(z)), pixels)
    # every pixel value, and a batch
    pixels = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).view(1, 16, 16, 3)
    assert torch.equal(to_uint8_frames(codec.decode(codec.encode(from_uint8_frames(pixels)))), pixels)
    x = torch.rand(3, 3, 4, 8, 8, dtype=torch.float64) * 2 - 1
    assert torch.equal(codec.decode(codec.encode(x)), x.to(dtype))


def test_latent_layout():
    """Pixel (row, col) of RGB channel rgb lands in latent cell (row // s, col // s), channel
    3 * (dy * s + dx) + rgb with dy, dx its offsets in the patch, as pixel / 127.5 - 1."""
    s = 2
    codec = PatchCodec(s, 16)
    video = torch.full((1, 3, 2, 6, 4), -1.0)
    frame, row, col, rgb, value = 1, 5, 3, 2, 200  # dy = 1, dx = 1: channel 3 * 3 + 2
    video[0, rgb, frame, row, col] = value / 127.5 - 1
    z = codec.encode(video)
    dy, dx = row % s, col % s
    channel = 3 * (dy * s + dx) + rgb
    assert channel == 11
    assert z[0, channel, frame, row // s, col // s] == torch.tensor(value / 127.5 - 1, dtype=torch.float32)
    others = z.clone()
    others[0, channel, frame, row // s, col // s] = -1
    assert torch.equal(others[:, :12], torch.full_like(others[:, :12], -1.0))
    # decode ignores the padding channels and does not clamp
    z[:, 12:] = 7.0
    z[0, 0, 0, 0, 0] = 1.5
    out = codec.decode(z)
    assert out[0, 0, 0, 0, 0] == 1.5 and out[0, rgb, frame, row, col] == video[0, rgb, frame, row, col]


def test_stream_decode_equals_full_decode():
    codec = PatchCodec(2, 16)
    z = torch.randn(1, 16, 9, 4, 4)
    full = codec.decode(z)
    assert full.shape == (1, 3, 9, 8, 8)
    decoder = codec.stream_decoder()
    for _ in range(2):
        parts = [decoder.decode(z[:, :, b * 3:(b + 1) * 3]) for b in range(3)]
        assert [p.shape[2] for p in parts] == [3, 3, 3] and decoder.latent_frames == 9
        assert torch.equal(torch.cat(parts, dim=2), full)
        decoder.reset()
        assert decoder.latent_frames == 0


def test_shape_errors():
    codec = PatchCodec(2, 16)
    with pytest.raises(ValueError, match="multiples of the patch stride 2"):
        codec.encode(torch.zeros(1, 3, 1, 5, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        codec.encode(torch.zeros(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match=r"latent \[B, 16"):
        codec.decode(torch.zeros(1, 12, 1, 4, 4))
    with pytest.raises(ValueError, match="48"):
        PatchCodec(4, 16)
    with pytest.raises(ValueError, match="uint8 frames"):
        from_uint8_frames(torch.zeros(2, 4, 4, 3))


def test_config_and_factory():
    assert load_config(PLUMBING_CONFIG).vae.kind == "wan"
    assert isinstance(build_codec(load_config(PLUMBING_CONFIG)), WanVAE)
    cfg = load_config(PLUMBING_CONFIG, overrides=PATCH)
    codec = build_codec(cfg, "cpu", torch.float64)
    assert isinstance(codec, PatchCodec) and (codec.stride, codec.channels, codec.dtype) == (2, 16, torch.float64)
    assert load_config(PLUMBING_CONFIG, overrides=["vae.kind=patch", "video.vae_stride=[1,1,1]"]).vae.kind == "patch"


@pytest.mark.parametrize("overrides, message", [
    (["vae.kind=patch"], r"vae.kind 'patch' .* video.vae_stride\[0\] = 1, got video.vae_stride \[4, 8, 8\]"),
    (["vae.kind=patch", "video.vae_stride=[1,2,4]"], r"video.vae_stride\[1\] = video.vae_stride\[2\]"),
    (["vae.kind=patch", "video.vae_stride=[1,4,4]"], r"3 \* 4 \* 4 = 48 .* model.in_dim \(16\)"),
    (["vae.kind=patch", "video.vae_stride=[1,2,2]", "vae.checkpoint=Wan2.1_VAE.pth"], "unset vae.checkpoint"),
    (["vae.kind=tae"], "vae.kind"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PLUMBING_CONFIG, overrides=overrides)


def test_frame_counting_depends_on_the_codec():
    wan, patch = load_config(PLUMBING_CONFIG), load_config(PLUMBING_CONFIG, overrides=PATCH)
    assert video_frames_for(21, wan) == 81 and video_frames_for(21, patch) == 21
    assert video_frames_for(1, wan) == video_frames_for(1, patch) == 1
    for cfg in (wan, patch):  # the default length needs exactly the configured latent frames
        assert latent_frames_for(video_frames_for(21, cfg), cfg) == 21
    # whole blocks of 3 latent frames
    assert [latent_frames_for(n, wan) for n in (1, 9, 10, 33, 34)] == [3, 3, 6, 9, 12]
    assert [latent_frames_for(n, patch) for n in (1, 3, 4, 21, 22)] == [3, 3, 6, 21, 24]
    with pytest.raises(ValueError, match=">= 1"):
        latent_frames_for(0, patch)


def test_pipeline_streams_patch_decoded_blocks():
    """Each block decodes to one frame per latent, exactly the block's latents as pixels."""
    pipe = VideoPipeline.from_config(load_config(PLUMBING_CONFIG, overrides=PATCH))
    assert isinstance(pipe.vae, PatchCodec)
    session = StreamSession(pipe, "a red circle", seed=0)
    for block in range(2):
        chunk = session.next_chunk()
        assert chunk.frames.shape == (3, 32, 32, 3) and chunk.first_frame == 3 * block
        latents = session.recent[-1].transpose(1, 2)  # [1, C, 3, 16, 16]
        assert torch.equal(chunk.frames, to_uint8_frames(pipe.vae.decode(latents)))
        assert torch.equal(pipe.vae.encode(from_uint8_frames(chunk.frames)), to_latent_grid(chunk.frames, latents))


def to_latent_grid(frames: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """What encoding the uint8 frames gives: the latents' pixel channels clamped and quantised to
    pixel / 127.5 - 1, the padding channels zero."""
    pixels = ((latents[:, :12].float().clamp(-1, 1) + 1) * 127.5).round().double() / 127.5 - 1
    return torch.cat([pixels, torch.zeros_like(latents[:, 12:])], dim=1).float()


def test_generate_with_the_patch_codec(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert generate("--prompt", "a red circle moves left", "--out", str(out), *PATCH) == 0
    video = read_video_file(out)
    assert video.frames.shape == (21, 32, 32, 3)
    assert f"wrote {out}: 21 frames 32x32" in capsys.readouterr().out
    out = tmp_path / "short.mp4"
    assert generate("--prompt", "x", "--frames", "4", "--out", str(out), *PATCH) == 0
    assert read_video_file(out).frames.shape == (4, 32, 32, 3)
    assert "6 latent frames -> 4 video frames" in capsys.readouterr().out
