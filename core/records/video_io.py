"""Video files in and out: H.264 MP4 writing (whole, incremental, fragmented for streaming) and
MP4/WebM reading with clear errors and size limits.

Frames are uint8 RGB `[T, H, W, 3]` everywhere (numpy or torch on the way in, numpy on the way
out: `torch.from_numpy(video.frames)` is zero-copy). Encoding is H.264 in yuv420p, the format
every browser and player decodes. Pure PyAV + numpy/torch, no Ray.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
from av.video.frame import PictureType

Frames = np.ndarray | torch.Tensor

# read_video keeps every decoded frame in memory (max_frames * max_pixels * 3 bytes at worst),
# so untrusted input is refused past these unless the caller asks for more.
DEFAULT_MAX_FRAMES = 1024
DEFAULT_MAX_PIXELS = 1920 * 1080

ACCEPTED = "accepted: MP4/MOV (e.g. H.264) or WebM/Matroska (e.g. VP9) bytes with a video stream"

# Leading top-level box types of MP4/MOV files and fMP4 segments; EBML magic of WebM/Matroska.
_MP4_BOXES = {b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"free", b"skip", b"wide"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


class VideoDecodeError(ValueError):
    """Input bytes are not a video this module can read; the message says what was wrong."""


class VideoTooLargeError(VideoDecodeError):
    """A readable video beyond the caller's frame or pixel limits (a service answers 413, not 400)."""


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    fps: float
    width: int
    height: int


# ------------------------------------------------------------------------------------ writing


def _as_rate(fps: int | float | Fraction) -> Fraction:
    """fps as an exact fraction (30000/1001 stays exact), so time_base = 1/fps is one frame per tick."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def _check_even(width: int, height: int) -> None:
    """yuv420p subsamples chroma 2x2, so x264 refuses odd sizes; say so instead of cropping silently."""
    if width <= 0 or height <= 0:
        raise ValueError(f"video size must be positive, got {width}x{height}")
    odd = [f"{name} {size}" for name, size in (("width", width), ("height", height)) if size % 2]
    if odd:
        raise ValueError(f"H.264 yuv420p needs an even width and height, got {width}x{height} "
                         f"({' and '.join(odd)} odd); crop or pad the frames to an even size first, "
                         f"e.g. frames[:, :{height // 2 * 2}, :{width // 2 * 2}]")


def _as_frames(frames: Frames) -> np.ndarray:
    """Validate a block of frames and return it as a uint8 [T, H, W, 3] numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB in [0, 255], got dtype {frames.dtype}; convert "
                         "float video in [0, 1] with (x.clamp(0, 1) * 255).round().to(torch.uint8)")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3] (channels last, RGB), got "
                         f"{list(frames.shape)}; for [T, 3, H, W] use x.permute(0, 2, 3, 1)")
    return frames


def _open_block(frames: Frames, closed: bool, width: int, height: int, owner: str) -> np.ndarray:
    """One block of frames for an open writer of this size, as uint8 [T, H, W, 3]."""
    if closed:
        raise RuntimeError(f"{owner} is closed")
    frames = _as_frames(frames)
    if frames.shape[1:3] != (height, width):
        raise ValueError(f"block frames are {frames.shape[2]}x{frames.shape[1]}, "
                         f"the {owner} was opened for {width}x{height}")
    return frames


def _video_frame(rgb: np.ndarray, pts: int, time_base: Fraction) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame.pts, frame.time_base = pts, time_base
    return frame


class MP4Writer:
    """Append blocks of frames to an H.264 MP4 as they are generated, at bounded memory.

    A streaming generator yields a few frames per block; holding a long video in memory just to
    encode it at the end would defeat the constant-memory rollout, so each block is encoded on
    arrival. Closing finalises the file (moov moved to the front, so it plays while downloading).
    `metadata` goes into the container's tags (e.g. title, comment: what made the video).
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int | float | Fraction,
                 *, crf: int = 18, preset: str = "medium", metadata: dict[str, str] | None = None):
        _check_even(width, height)
        self.width, self.height, self.fps = width, height, _as_rate(fps)
        self.frames_written = 0
        self._time_base = 1 / self.fps
        self._container = av.open(str(path), "w", format="mp4",
                                  container_options={"movflags": "+faststart"})
        self._container.metadata.update(metadata or {})
        self._stream = self._container.add_stream("libx264", rate=self.fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.time_base = self._time_base
        self._stream.options = {"crf": str(crf), "preset": preset}
        self._closed = False

    def write(self, frames: Frames) -> None:
        """Encode one block of uint8 [T, H, W, 3] frames (any T, including 0)."""
        frames = _open_block(frames, self._closed, self.width, self.height, "MP4Writer")
        for rgb in frames:
            frame = _video_frame(rgb, self.frames_written, self._time_base)
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finalise the file; an MP4 needs at least one frame."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.frames_written:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
        if not self.frames_written:
            raise ValueError("no frames were written: an MP4 needs at least one frame")

    def __enter__(self) -> MP4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the original error; a partial file is still finalised
            try:
                self.close()
            except Exception:
                pass


def write_mp4(path: str | Path, frames: Frames, fps: int | float | Fraction, **options) -> None:
    """Write uint8 [T, H, W, 3] RGB frames to an H.264 MP4 (yuv420p) at exactly `fps`."""
    frames = _as_frames(frames)
    with MP4Writer(path, frames.shape[2], frames.shape[1], fps, **options) as writer:
        writer.write(frames)


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split MP4 bytes into top-level (type, box) pairs."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        out.append((kind, data[pos:pos + size]))
        pos += size
    return out


class FragmentedMP4Encoder:
    """H.264 fragmented MP4 for streaming: each `encode(frames)` returns a playable fragment at once.

    The first call's bytes start with the init segment (ftyp + moov, also kept in
    `init_segment` for clients joining late); every call then yields one moof + mdat fragment
    starting with an IDR frame, so any fragment decodes on its own after the init segment.

    Why one muxer per call: FFmpeg's mp4 muxer only cuts a fragment when the *next* packet
    arrives, and PyAV exposes no explicit flush, so one long-lived muxer would hold each
    block's frames back until the next block. Instead one encoder (x264, zerolatency: a packet
    per frame, no lookahead) feeds a fresh muxer per call, which is closed to emit the fragment;
    `frag_discont` keeps the fragment's decode time continuous, `fragment_index` its sequence
    number, and the repeated init segment is dropped.
    """

    _MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"

    def __init__(self, width: int, height: int, fps: int | float | Fraction,
                 *, crf: int = 23, preset: str = "veryfast"):
        _check_even(width, height)
        self.width, self.height, self.fps = width, height, _as_rate(fps)
        self.init_segment: bytes | None = None
        self.frames_encoded = 0
        self._fragments = 0
        self._closed = False
        self._codec = av.CodecContext.create("libx264", "w")
        self._codec.width, self._codec.height, self._codec.pix_fmt = width, height, "yuv420p"
        self._codec.time_base, self._codec.framerate = 1 / self.fps, self.fps
        self._codec.options = {"crf": str(crf), "preset": preset, "tune": "zerolatency",
                               "forced-idr": "1"}

    def encode(self, frames: Frames) -> bytes:
        """Encode a block of uint8 [T, H, W, 3] frames; returns its fragment (init segment first)."""
        frames = _open_block(frames, self._closed, self.width, self.height, "FragmentedMP4Encoder")
        packets = []
        for i, rgb in enumerate(frames):
            frame = _video_frame(rgb, self.frames_encoded, self._codec.time_base)
            if i == 0:  # each fragment starts with an IDR, so it decodes on its own
                frame.pict_type = PictureType.I
            packets += self._codec.encode(frame)
            self.frames_encoded += 1
        return self._fragment(packets)

    def close(self) -> bytes:
        """Flush the encoder; returns any remaining fragment (normally empty with zerolatency)."""
        if self._closed:
            return b""
        self._closed = True
        return self._fragment(self._codec.encode(None))

    def _fragment(self, packets: list[av.Packet]) -> bytes:
        if not packets:
            return b""
        first = self._fragments == 0
        buf = io.BytesIO()
        options = {"movflags": self._MOVFLAGS + ("" if first else "+frag_discont"),
                   "fragment_index": str(self._fragments + 1),
                   # keep the packets' timestamps as they are: no shift to zero, no edit list
                   "avoid_negative_ts": "make_non_negative", "use_editlist": "0"}
        with av.open(buf, "w", format="mp4", container_options=options) as muxer:
            stream = muxer.add_mux_stream("h264", rate=self.fps, width=self.width, height=self.height)
            stream.time_base = self._codec.time_base
            for packet in packets:
                packet.stream = stream
                packet.duration = 1  # one tick per frame: the fragment's last sample needs it
                muxer.mux(packet)
        boxes = _boxes(buf.getvalue())
        if first:
            self.init_segment = b"".join(box for kind, box in boxes if kind in (b"ftyp", b"moov"))
        self._fragments += 1
        return b"".join(box for kind, box in boxes if first or kind not in (b"ftyp", b"moov"))


# ------------------------------------------------------------------------------------ reading


def _sniff_format(data: bytes) -> str:
    """Pick the demuxer from the magic bytes instead of letting FFmpeg probe.

    Probing would happily "decode" a PNG (image2 pipe) or plain text (tty demuxer) as video,
    and could reach demuxers that open other URLs (HLS playlists); only MP4 and WebM are read.
    """
    head = bytes(data[:8])
    if head[:4] == _EBML_MAGIC:
        return "matroska"
    if head[4:8] in _MP4_BOXES:
        return "mov"
    raise VideoDecodeError(f"not a video container: the data starts with {head!r}, which is neither "
                           f"an MP4 box nor the WebM/EBML header; {ACCEPTED}")


def _declared_frames(stream: av.video.stream.VideoStream, container: av.container.InputContainer,
                     fps: float) -> int:
    """Frame count from metadata (MP4 sample table), else estimated from duration; 0 if unknown."""
    if stream.frames:
        return stream.frames
    if stream.duration is not None and stream.time_base:
        seconds = stream.duration * float(stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return 0
    return round(seconds * fps)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoTooLargeError(f"video is {width}x{height} = {width * height} pixels per frame, above "
                               f"max_pixels={max_pixels}; pass a larger max_pixels to read it")


def _too_many_frames(count: int | None, max_frames: int) -> VideoDecodeError:
    has = f"{count} frames, more than" if count is not None else "more frames than"
    return VideoTooLargeError(f"video has {has} max_frames={max_frames}; pass a larger max_frames to read it")


def _decode(container: av.container.InputContainer, max_frames: int, max_pixels: int) -> DecodedVideo:
    if not container.streams:
        raise VideoDecodeError(f"the container holds no streams (truncated or corrupt header?); {ACCEPTED}")
    if not container.streams.video:
        found = ", ".join(s.type for s in container.streams)
        raise VideoDecodeError(f"the container has no video stream (streams: {found}); {ACCEPTED}")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoDecodeError(f"the video stream's codec is unknown or its header corrupt; {ACCEPTED}")
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_pixels(width, height, max_pixels)
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    declared = _declared_frames(stream, container, fps)
    if declared > max_frames:
        raise _too_many_frames(declared, max_frames)

    frames: list[np.ndarray] = []
    for frame in container.decode(stream):
        if len(frames) == max_frames:
            raise _too_many_frames(None, max_frames)
        if frames and (frame.width, frame.height) != (width, height):
            raise VideoDecodeError(f"the frame size changes mid-stream ({width}x{height} -> "
                                   f"{frame.width}x{frame.height}); only constant-size video is read")
        width, height = frame.width, frame.height
        _check_pixels(width, height, max_pixels)
        frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise VideoDecodeError("the video stream holds no decodable frames (truncated or corrupt "
                               f"data?); {ACCEPTED}")
    return DecodedVideo(np.stack(frames), fps, width, height)


def read_video(data: bytes | bytearray | memoryview, *, max_frames: int = DEFAULT_MAX_FRAMES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedVideo:
    """Decode MP4 or WebM bytes to uint8 [T, H, W, 3] RGB frames, refusing oversized input.

    Sizes are checked from the stream metadata before decoding where it has them (MP4 sample
    count, duration x fps, coded size) and enforced again frame by frame while decoding.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise VideoDecodeError(f"empty input (0 bytes); {ACCEPTED}")
    fmt = _sniff_format(data)
    kind = "WebM/Matroska" if fmt == "matroska" else "MP4"
    try:
        with av.open(io.BytesIO(data), "r", format=fmt) as container:
            return _decode(container, max_frames, max_pixels)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"could not decode the {kind} data, it looks corrupt or truncated "
                               f"({e}); {ACCEPTED}") from e


def read_video_file(path: str | Path, *, max_frames: int = DEFAULT_MAX_FRAMES,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedVideo:
    """`read_video` on a file's bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}" +
                                (" (it is a directory)" if path.is_dir() else ""))
    return read_video(path.read_bytes(), max_frames=max_frames, max_pixels=max_pixels)
