"""Start a stream from given frames: a picture to animate, or a video to continue.

A causal student with a KV cache needs no retraining for either. Continuing a video is what every block after the
first already does: it denoises under a cache of clean past frames. So the given frames are encoded by the codec
and cut into latent blocks of `stream.num_frame_per_block`:

- every whole block is written into the cache as clean context, exactly as a finished block's context pass writes
  it (`SelfForcedRollout.write_cache` at the context timestep), and the stream goes on after them;
- what is left over (fewer latent frames than a block: a single image always) is held fixed inside the next
  block. That block is denoised as usual, except that its leading frames are the given clean latents at the
  context timestep (a timestep per frame, as the DiT takes them) in every step, and they replace the prediction
  there: from the first step on, the block's other frames are drawn seeing the given ones as they are, and its
  output starts with them. Feeding them instead noised to each step's level (so the block has one timestep) hides
  them from the first step, at sigma 1: in the toy world even the exact denoiser then draws the first step's frames
  without them and never recovers the given size (docs/image-to-video.md has the measures).

The codec sets what can be given: the Wan VAE encodes 1 + 4k frames (the first latent frame holds one frame, every
later one four), so of a video the first 1 + 4k frames are used and up to 3 trailing ones are dropped (counted, never
silently); the patch codec takes any number. Frames must have the stream's exact size: nothing is resized or
cropped.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.algo.rollout import SelfForcedRollout
from core.codecs.video import Codec, from_uint8_frames
from core.config import StreamConfig
from core.model.kv_cache import BlockView, KVCache

IMAGE_FORMATS = ("PNG", "JPEG")


class ImageTooLargeError(ValueError):
    """Image bytes past the caller's limit (a service answers 413, not 400)."""


@dataclass
class Prefix:
    """Given frames as the stream uses them: whole latent blocks for the cache, and the leftover latent frames that
    the next block holds fixed."""

    blocks: list[torch.Tensor]  # clean latents [1, fpb, C, h, w] each, written into the cache as context
    held: torch.Tensor | None  # clean latents [1, r, C, h, w], r < fpb: the first frames of the next block
    given: int  # video frames given
    used: int  # of them, the ones encoded (the codec's frame rule): the stream starts with these


def check_frames(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The given frames as a uint8 tensor [T, H, W, 3] of this size, or a ValueError saying what is expected."""
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        raise ValueError(f"the given frames must be a uint8 numpy array or torch tensor [T, H, W, 3], got a "
                         f"{type(frames).__name__}")
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"the given frames must be uint8 RGB [T, H, W, 3] with T >= 1 (T = 1: an image), got "
                         f"{str(frames.dtype).removeprefix('torch.')} {list(frames.shape)}")
    h, w = frames.shape[1:3]
    if (h, w) != (height, width):
        raise ValueError(f"the given frames are {w}x{h} (width x height) but this stream makes {width}x{height} "
                         f"frames: resize or crop them to {width}x{height} first")
    return frames


def usable_frames(given: int, temporal_stride: int) -> int:
    """How many of `given` frames the codec encodes: 1 + stride * k (Wan VAE: 1, 5, 9, ...; patch codec: all)."""
    return 1 + temporal_stride * ((given - 1) // temporal_stride)


def encode_prefix(frames: np.ndarray | torch.Tensor, codec: Codec, frames_per_block: int, height: int, width: int,
                  device: torch.device, dtype: torch.dtype) -> Prefix:
    """Check, encode and split the given frames (module docstring): the whole blocks and the held leftover."""
    frames = check_frames(frames, height, width)
    used = usable_frames(len(frames), codec.temporal_stride)
    video = from_uint8_frames(frames[:used], codec.dtype).to(device)
    latents = codec.encode(video).transpose(1, 2).to(device, dtype)  # [1, L, C, h, w]
    whole = latents.shape[1] // frames_per_block * frames_per_block
    blocks = [latents[:, i:i + frames_per_block] for i in range(0, whole, frames_per_block)]
    held = latents[:, whole:] if whole < latents.shape[1] else None
    return Prefix(blocks, held, len(frames), used)


def check_room(prefix: Prefix, stream: StreamConfig, rope_frames: int) -> None:
    """A ValueError when the stream cannot hold the prefix and one block after it (a cache with no window, or
    absolute RoPE's table of `rope_frames` positions)."""
    latent = (len(prefix.blocks) + 1) * stream.num_frame_per_block
    if stream.local_attn_size == -1 and latent > stream.max_cache_frames:
        raise ValueError(f"the given video is too long for this model: with what follows it takes {latent} latent "
                         f"frames, and its cache holds {stream.max_cache_frames} with no window "
                         "(stream.local_attn_size=-1); give fewer frames")
    if stream.rope == "absolute" and latent > rope_frames:
        raise ValueError(f"the given video is too long for this model: with what follows it takes {latent} latent "
                         f"frames, past the {rope_frames} positions of absolute RoPE; give fewer frames")


def hold(x0: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """A block's latents [B, f, C, h, w] with its first frames replaced by the held clean latents."""
    return torch.cat([held.to(x0.dtype), x0[:, held.shape[1]:]], dim=1)


def denoise_held_block(rollout: SelfForcedRollout, x: torch.Tensor, held: torch.Tensor,
                       cache: KVCache | BlockView, start_frame: int | torch.Tensor,
                       renoise_noise: Callable[[int], torch.Tensor],
                       blocks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
    """`SelfForcedRollout.denoise_block` with the block's first frames held at `held`: in every step they are the
    clean latents at the context timestep and replace the prediction there (the other frames are denoised and
    re-noised as usual). Its clean estimate, starting with `held`."""
    timesteps = rollout.timesteps.tolist()
    b, f = x.shape[:2]
    for i, t in enumerate(timesteps):
        x = hold(x, held)
        t_frames = torch.full((b, f), t, dtype=torch.float32, device=x.device)
        t_frames[:, :held.shape[1]] = float(rollout.context_noise)
        flow = rollout.model(x.transpose(1, 2), t_frames, None, cache=cache, start_frame=start_frame, blocks=blocks)
        x0 = rollout.scheduler.x0_from_flow(flow.transpose(1, 2).flatten(0, 1), x.flatten(0, 1), t_frames.flatten())
        x0 = hold(x0.unflatten(0, (b, f)), held)
        if i + 1 < len(timesteps):
            x = rollout.renoise(x0, renoise_noise(i), timesteps[i + 1])
    return x0


def read_prefix_image(data: bytes, height: int, width: int, max_bytes: int) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 [1, H, W, 3] RGB, for a stream of this size. ValueError when the bytes are not
    such an image or it has another size; `ImageTooLargeError` (a ValueError) past `max_bytes`. The size is read
    from the header before any pixel is decoded."""
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes, more than the {max_bytes} allowed")
    if not data:
        raise ValueError("the image is empty (0 bytes); expected a PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"not an image: expected PNG or JPEG bytes ({len(data)} bytes given, starting "
                         f"{bytes(data[:8])!r})") from None
    if image.format not in IMAGE_FORMATS:
        raise ValueError(f"the image is {image.format}; expected PNG or JPEG")
    if image.size != (width, height):
        raise ValueError(f"the image is {image.width}x{image.height} (width x height) but this stream makes "
                         f"{width}x{height} frames: resize or crop it to {width}x{height} first")
    try:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"the {image.format} image could not be decoded: {e}") from None
    return rgb[None].copy()
