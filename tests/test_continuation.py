"""Streams that start from given frames: a picture to animate, or a video to continue.

A continuation is the offline rollout with the given latents written into the cache (and a leftover held inside the
next block), bit for bit; the output starts with the given frames as the codec reproduces them; bad input is a
clear ValueError; `launch.py generate --image / --video` writes an MP4 that starts with the given frames."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from core.algo.rollout import gaussian_noise
from core.codecs.video import from_uint8_frames, to_uint8_frames
from core.config import PLUMBING_CONFIG, load_config
from core.records.video_io import read_video_file, write_mp4
from core.stream.pipeline import VideoPipeline
from core.stream.prefix import ImageTooLargeError, read_prefix_image
from core.stream.session import StreamSession
from toyworld.config import load_world_config
from toyworld.world import Scene, render

pytestmark = pytest.mark.usefixtures("no_grad")
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe():
    """The plumbing config: random tiny weights, 64x64 through a tiny Wan VAE (1 + 4k frames), float64."""
    return VideoPipeline.from_config(load_config(PLUMBING_CONFIG, ["runtime.dtype=float64"]))


def given_video(frames: int, seed: int = 0) -> np.ndarray:
    """Smooth random frames (a VAE reproduces them roughly), uint8 [T, 64, 64, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)


def offline(pipe: VideoPipeline, frames: np.ndarray, seed: int, blocks: int) -> torch.Tensor:
    """The rollout's own pieces: encode, write the whole given blocks at the context timestep, denoise the next
    block with the leftover held (clean at the context timestep in every step's input, replacing every step's
    prediction), then stream on, to `blocks` blocks in all: the decoded video."""
    rollout, fpb = pipe.rollout, pipe.cfg.stream.num_frame_per_block
    context = pipe.text_encoder.encode([PROMPT])
    latents = pipe.vae.encode(from_uint8_frames(frames, torch.float64)).transpose(1, 2)
    whole = latents.shape[1] // fpb * fpb
    cache = pipe.generator.init_cache(1, pipe.cfg.video.latent_hw)
    for start in range(0, whole, fpb):
        rollout.write_cache(latents[:, start:start + fpb], context, cache, start)
    noise = gaussian_noise((1, fpb, 16, *pipe.cfg.video.latent_hw), torch.Generator().manual_seed(seed),
                           torch.float64, "cpu")
    made = [latents[:, :whole]]
    blocks -= whole // fpb
    held = latents[:, whole:]
    if held.shape[1]:
        r, timesteps = held.shape[1], rollout.timesteps.tolist()
        x = noise(0, -1)
        for i, t in enumerate(timesteps):
            x[:, :r] = held
            t_frames = torch.tensor([[0.0] * r + [t] * (fpb - r)])
            flow = pipe.generator(x.transpose(1, 2), t_frames, context, cache=cache, start_frame=whole)
            x0 = rollout.scheduler.x0_from_flow(flow.transpose(1, 2)[0], x[0], t_frames[0])[None]
            x0[:, :r] = held
            if i + 1 < len(timesteps):
                x = rollout.renoise(x0, noise(0, i), timesteps[i + 1])
        rollout.write_cache(x0, context, cache, whole)
        made.append(x0)
        blocks -= 1
    made.append(rollout.generate(context, cache, noise, blocks))
    return to_uint8_frames(pipe.vae.decode(torch.cat(made, dim=1).transpose(1, 2)))


@pytest.mark.parametrize("given", [1, 13, 9, 16])  # an image; a block + a held frame; whole blocks; 3 frames dropped
def test_a_continuation_is_the_offline_rollout_with_that_prefix_bit_for_bit(pipe, given):
    frames = given_video(given)
    used = 1 + (given - 1) // 4 * 4  # the Wan VAE encodes 1 + 4k frames
    session = StreamSession(pipe, PROMPT, seed=3, prefix=frames)
    assert (session.given_frames, session.dropped_frames) == (used, given - used)
    chunks = [session.next_chunk() for _ in range(4)]
    expected = offline(pipe, frames[:used], seed=3, blocks=4)
    assert torch.equal(torch.cat([c.frames for c in chunks]), expected)
    reproduced = to_uint8_frames(pipe.vae.decode(pipe.vae.encode(from_uint8_frames(frames[:used], torch.float64))))
    assert torch.equal(expected[:used], reproduced)  # the stream starts with the given frames as the codec makes them
    assert sum(c.given_frames for c in chunks) == used
    assert [c.first_frame for c in chunks] == [0, 9, 21, 33] and session.frames == 45


def test_overlapped_decode_and_a_same_prompt_switch_keep_the_continuation(pipe):
    frames = given_video(13, seed=1)
    plain = StreamSession(pipe, PROMPT, seed=2, prefix=frames)
    expected = [plain.next_chunk().frames for _ in range(4)]
    with StreamSession(pipe, PROMPT, seed=2, prefix=frames, overlap_decode=True) as overlapped:
        assert all(torch.equal(overlapped.next_chunk().frames, e) for e in expected)
    switched = StreamSession(pipe, PROMPT, seed=2, prefix=frames)
    switched.switch_prompt(PROMPT)  # re-caches the given block: the same cache as it wrote
    assert all(torch.equal(switched.next_chunk().frames, e) for e in expected)


def test_a_long_given_video_stays_within_the_window(pipe):
    window_blocks = pipe.cfg.stream.local_attn_size // 3
    frames = given_video(1 + 4 * (3 * (window_blocks + 3) - 1), seed=2)  # 3 blocks past the window
    session = StreamSession(pipe, PROMPT, seed=0, prefix=frames)
    assert session.cache.evictions > 0 and len(session.recent) == window_blocks
    plain = StreamSession(pipe, PROMPT, seed=0)
    for _ in range(window_blocks + 4):
        session.next_chunk(), plain.next_chunk()
    assert session.memory_bytes() == plain.memory_bytes()
    for _ in range(3):
        session.next_chunk()
    assert session.memory_bytes() == plain.memory_bytes()


def test_the_patch_codec_stream_starts_with_the_given_frames_exactly():
    pipe = VideoPipeline.from_config(load_world_config(None, []))
    clip = render(Scene.from_seed(1_000_000), 9, 32, 32)
    for given in (1, 3, 4):
        chunks = list(StreamSession(pipe, Scene.from_seed(1_000_000).prompt, 0, prefix=clip[:given]).chunks(9))
        out = torch.cat([c.frames for c in chunks])
        assert out.shape == (9, 32, 32, 3) and torch.equal(out[:given], torch.from_numpy(clip[:given]))


@pytest.mark.parametrize("prefix, message", [
    (np.zeros((1, 32, 64, 3), np.uint8), r"the given frames are 64x32 \(width x height\) but this stream makes 64x64"),
    (np.zeros((1, 64, 64, 3), np.float32), r"must be uint8 RGB \[T, H, W, 3\] .* got float32 \[1, 64, 64, 3\]"),
    (np.zeros((64, 64, 3), np.uint8), r"got uint8 \[64, 64, 3\]"),
    (np.zeros((0, 64, 64, 3), np.uint8), r"with T >= 1"),
    ([[0]], r"must be a uint8 numpy array or torch tensor .* got a list"),
])
def test_a_bad_prefix_is_a_clear_value_error(pipe, prefix, message):
    with pytest.raises(ValueError, match=message):
        StreamSession(pipe, PROMPT, seed=0, prefix=prefix)


def test_a_video_too_long_for_a_cache_without_a_window_is_refused():
    pipe = VideoPipeline.from_config(load_config(PLUMBING_CONFIG, ["stream.local_attn_size=-1", "stream.sink_size=0",
                                                                   "stream.sink_mode=static"]))
    with pytest.raises(ValueError, match="too long for this model: .* its cache holds 21"):
        StreamSession(pipe, PROMPT, seed=0, prefix=given_video(1 + 4 * 20))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_read_prefix_image():
    pixels = given_video(1)[0]
    png = encoded(Image.fromarray(pixels), "PNG")
    assert np.array_equal(read_prefix_image(png, 64, 64, 1 << 20), pixels[None])
    rgba = read_prefix_image(encoded(Image.fromarray(pixels).convert("RGBA"), "PNG"), 64, 64, 1 << 20)
    assert rgba.shape == (1, 64, 64, 3) and rgba.dtype == np.uint8
    assert read_prefix_image(encoded(Image.fromarray(pixels), "JPEG"), 64, 64, 1 << 20).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"not an image: expected PNG or JPEG"):
        read_prefix_image(b"GIF? no, text", 64, 64, 1 << 20)
    with pytest.raises(ValueError, match=r"the image is GIF; expected PNG or JPEG"):
        read_prefix_image(encoded(Image.fromarray(pixels), "GIF"), 64, 64, 1 << 20)
    with pytest.raises(ValueError, match=r"the image is 64x64 \(width x height\) but this stream makes 32x48"):
        read_prefix_image(png, 48, 32, 1 << 20)
    with pytest.raises(ImageTooLargeError, match=f"the image is {len(png)} bytes, more than the 100 allowed"):
        read_prefix_image(png, 64, 64, 100)
    with pytest.raises(ValueError, match="could not be decoded"):
        read_prefix_image(png[:len(png) // 2], 64, 64, 1 << 20)


def test_generate_from_an_image_and_from_a_video_on_the_embedded_default(tmp_path, capsys):
    scene = Scene.from_seed(1_000_003)
    clip = render(scene, 9, 32, 32)
    Image.fromarray(clip[0]).save(tmp_path / "start.png")
    out = tmp_path / "from_image.mp4"
    assert launch.main(["generate", "--prompt", scene.prompt, "--image", str(tmp_path / "start.png"),
                        "--out", str(out)]) == 0
    assert f"wrote {out}: 9 frames 32x32 @ 8 fps, seed 0, the first 1 from" in capsys.readouterr().out
    video = read_video_file(out).frames
    assert video.shape == (9, 32, 32, 3)
    assert np.abs(video[0].astype(int) - clip[0]).mean() < 3  # H.264 is lossy; the frame is the image

    write_mp4(tmp_path / "start.mp4", clip[:4], fps=8)
    given = read_video_file(tmp_path / "start.mp4").frames
    out = tmp_path / "continued.mp4"
    assert launch.main(["generate", "--prompt", scene.prompt, "--video", str(tmp_path / "start.mp4"),
                        "--frames", "10", "--out", str(out)]) == 0
    video = read_video_file(out).frames
    assert video.shape == (10, 32, 32, 3)
    assert np.abs(video[:4].astype(int) - given).mean() < 3


def test_generate_names_the_file_and_what_is_wrong_in_one_line(tmp_path, capsys):
    Image.new("RGB", (48, 32)).save(tmp_path / "wide.png")
    (tmp_path / "note.png").write_text("not a picture")
    write_mp4(tmp_path / "short.mp4", np.zeros((2, 32, 32, 3), np.uint8), fps=8)
    cases = [(["--image", str(tmp_path / "wide.png")], "wide.png: the image is 48x32 (width x height) but this stream "
                                                       "makes 32x32 frames"),
             (["--image", str(tmp_path / "note.png")], "note.png: not an image: expected PNG or JPEG"),
             (["--image", str(tmp_path / "none.png")], "none.png: no such file"),
             (["--video", str(tmp_path / "note.png")], "note.png: not a video container"),
             (["--video", str(tmp_path / "short.mp4"), "--frames", "2"], "--frames 2 leaves nothing to generate")]
    for args, message in cases:
        assert launch.main(["generate", "--prompt", "a red circle", *args, "--out", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
