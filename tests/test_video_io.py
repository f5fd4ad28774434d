"""core.records.video_io: MP4 writing (whole, incremental, fragmented), MP4/WebM reading and its errors."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from core.records import video_io
from core.records.video_io import (
    DecodedVideo,
    FragmentedMP4Encoder,
    MP4Writer,
    VideoDecodeError,
    read_video,
    read_video_file,
    write_mp4,
)

T, H, W, FPS = 8, 48, 64, 16


def gradient(t: int = T, h: int = H, w: int = W, start: int = 0) -> np.ndarray:
    """A smooth moving pattern: codecs keep it nearly intact, so pixel checks can be tight."""
    ti = np.arange(start, start + t)[:, None, None]
    y, x = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    r, g, b = np.broadcast_arrays(x * 2 + ti * 3, y * 3 + ti * 2, (x + y) * 2 + 20)
    return (np.stack([r, g, b], -1) % 256).astype(np.uint8)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "gradient.mp4"
    write_mp4(path, gradient(), FPS)
    return path.read_bytes()


def webm_vp9_bytes(frames: np.ndarray, fps: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def png_bytes() -> bytes:
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = W, H, "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(gradient(1)[0], format="rgb24")) + codec.encode(None)
    return bytes(packets[0])


# ------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("fps", [FPS, Fraction(30000, 1001)])
def test_write_mp4_round_trip(tmp_path, fps):
    frames = gradient()
    write_mp4(tmp_path / "v.mp4", torch.from_numpy(frames), fps)  # torch input too

    with av.open(str(tmp_path / "v.mp4")) as container:  # the container says exactly fps and T / fps
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.frames == T and stream.average_rate == fps
        assert container.duration == pytest.approx(T / fps * av.time_base, abs=1)

    video = read_video_file(tmp_path / "v.mp4")
    assert isinstance(video, DecodedVideo)
    assert video.frames.shape == (T, H, W, 3) and video.frames.dtype == np.uint8
    assert (video.width, video.height) == (W, H) and video.fps == pytest.approx(float(fps))
    assert mae(video.frames, frames) < 3.0


@pytest.mark.parametrize("shape, which", [((2, 47, 64, 3), "height 47"), ((2, 48, 63, 3), "width 63")])
def test_odd_size_is_an_error_not_a_crop(tmp_path, shape, which):
    with pytest.raises(ValueError, match=f"even width and height.*{which}.*crop or pad"):
        write_mp4(tmp_path / "odd.mp4", np.zeros(shape, np.uint8), FPS)
    with pytest.raises(ValueError, match="even"):
        FragmentedMP4Encoder(shape[2], shape[1], FPS)
    assert not (tmp_path / "odd.mp4").exists()


@pytest.mark.parametrize("frames, error, message", [
    (np.zeros((2, H, W, 3), np.float32), ValueError, "uint8.*float32"),
    (torch.zeros(2, 3, H, W, dtype=torch.uint8), ValueError, r"\[T, H, W, 3\].*permute"),
    (np.zeros((H, W, 3), np.uint8), ValueError, r"\[T, H, W, 3\]"),
    ([[0]], TypeError, "numpy array or torch tensor"),
])
def test_write_mp4_validates_frames(tmp_path, frames, error, message):
    with pytest.raises(error, match=message):
        write_mp4(tmp_path / "bad.mp4", frames, FPS)


def test_write_mp4_needs_frames_and_positive_fps(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        write_mp4(tmp_path / "empty.mp4", np.zeros((0, H, W, 3), np.uint8), FPS)
    with pytest.raises(ValueError, match="fps must be positive"):
        write_mp4(tmp_path / "v.mp4", gradient(), 0)


def test_mp4_writer_appends_blocks(tmp_path):
    blocks = [gradient(3, start=0), gradient(0), gradient(5, start=3), gradient(4, start=8)]
    with MP4Writer(tmp_path / "blocks.mp4", W, H, FPS) as writer:
        for block in blocks:
            writer.write(block)
        with pytest.raises(ValueError, match="opened for 64x48"):
            writer.write(np.zeros((1, 32, 32, 3), np.uint8))
    assert writer.frames_written == 12
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(gradient(1))

    video = read_video_file(tmp_path / "blocks.mp4")
    assert video.frames.shape == (12, H, W, 3) and video.fps == FPS
    assert mae(video.frames, gradient(12)) < 3.0


# ------------------------------------------------------------------------------------ fragmented


def top_level_boxes(data: bytes) -> list[bytes]:
    return [kind for kind, _ in video_io._boxes(data)]


def test_fragmented_mp4_streams_each_call_as_a_fragment():
    encoder = FragmentedMP4Encoder(W, H, FPS)
    blocks = [gradient(4, start=4 * k) for k in range(3)]
    chunks = []
    for k, block in enumerate(blocks):
        chunks.append(encoder.encode(block))
        # bytes arrive at once, and they already hold this call's frames: nothing waits for close()
        assert read_video(b"".join(chunks)).frames.shape[0] == 4 * (k + 1)
    tail = encoder.close()
    assert encoder.close() == b"" and encoder.frames_encoded == 12

    assert top_level_boxes(chunks[0]) == [b"ftyp", b"moov", b"moof", b"mdat"]
    assert all(top_level_boxes(c) == [b"moof", b"mdat"] for c in chunks[1:])
    assert chunks[0].startswith(encoder.init_segment)

    stream = b"".join(chunks) + tail
    video = read_video(stream)
    assert video.frames.shape == (12, H, W, 3) and video.fps == FPS
    assert mae(video.frames, np.concatenate(blocks)) < 3.0
    with av.open(io.BytesIO(stream)) as container:  # decode times continue across fragments
        times = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    assert times == pytest.approx([i / FPS for i in range(12)])

    # a client joining late needs only the init segment and any fragment (each starts with an IDR)
    late = read_video(encoder.init_segment + chunks[2])
    assert mae(late.frames, blocks[2]) < 3.0

    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode(blocks[0])


# ------------------------------------------------------------------------------------ reading


def test_webm_vp9_round_trip():
    frames = gradient()
    video = read_video(webm_vp9_bytes(frames, FPS))
    assert video.frames.shape == (T, H, W, 3) and video.fps == FPS and (video.width, video.height) == (W, H)
    assert mae(video.frames, frames) < 3.0


@pytest.mark.parametrize("case, message", [
    ("empty", "empty input"),
    ("truncated", "corrupt or truncated"),
    ("corrupt", "corrupt or truncated"),
    ("png", "not a video container.*PNG"),
    ("text", "not a video container"),
    ("audio_only", r"no video stream \(streams: audio\)"),
])
def test_read_video_errors(mp4_bytes, case, message):
    rng = np.random.default_rng(0)
    data = {
        "empty": lambda: b"",
        "truncated": lambda: mp4_bytes[:len(mp4_bytes) * 3 // 4],
        "corrupt": lambda: mp4_bytes[:32] + rng.integers(0, 256, len(mp4_bytes), dtype=np.uint8).tobytes(),
        "png": png_bytes,
        "text": lambda: b"frame 1: a cat walks across the street\n",
        "audio_only": audio_only_mp4,
    }[case]()
    with pytest.raises(VideoDecodeError, match=message) as info:
        read_video(data)
    assert "accepted: MP4" in str(info.value) and "WebM" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_video_size_limits(mp4_bytes, monkeypatch):
    webm = webm_vp9_bytes(gradient(), FPS)
    for data in (mp4_bytes, webm):  # counted from metadata: MP4 sample table, WebM duration x fps
        with pytest.raises(VideoDecodeError, match=f"has {T} frames, more than max_frames=5"):
            read_video(data, max_frames=5)
        with pytest.raises(VideoDecodeError, match=f"{W}x{H} = {W * H} pixels.*max_pixels=1000"):
            read_video(data, max_pixels=1000)
        assert read_video(data, max_frames=T, max_pixels=W * H).frames.shape[0] == T

    # without a usable count in the metadata, the limit still holds while decoding
    monkeypatch.setattr(video_io, "_declared_frames", lambda *args: 0)
    with pytest.raises(VideoDecodeError, match="more frames than max_frames=5"):
        read_video(mp4_bytes, max_frames=5)


def test_read_video_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no video file at .*missing.mp4"):
        read_video_file(tmp_path / "missing.mp4")
