"""An exact pixel-space codec (`vae.kind: patch`), in place of the Wan VAE for small synthetic worlds.

No weights and no compression loss: one latent frame is one video frame (temporal stride 1), and each
latent cell holds the s x s RGB patch of pixels under it (s = video.vae_stride[1] = vae_stride[2]) as
channels

    c = 3 * (dy * s + dx) + rgb        (0 <= dy, dx < s; rgb 0, 1, 2)

with the values of the [-1, 1] video the rest of the code uses (pixel / 127.5 - 1); channels from
3 * s * s up to the latent width (model.in_dim) are zero on encode and ignored on decode. So
`to_uint8_frames(decode(encode(x)))` gives back x's uint8 pixels bit for bit, and a decoded video is
exactly what the model produced. Same interface as `core.codecs.wan_vae.WanVAE` (`from_config`, `encode`,
`decode`, `stream_decoder`); no torch.nn state, so nothing to move between devices.
"""

from __future__ import annotations

import torch

from core.config import Config


class PatchCodec:
    """Space-to-depth of s x s pixel patches into latent channels, and back."""

    temporal_stride = 1  # latent frames -> video frames: one each

    def __init__(self, stride: int, channels: int = 16, dtype: torch.dtype = torch.float32):
        if stride < 1 or 3 * stride * stride > channels:
            raise ValueError(f"a {stride}x{stride} RGB patch needs 3 * {stride} * {stride} = {3 * stride * stride} "
                             f"latent channels, more than the {channels} there are")
        self.stride, self.channels, self.dtype = stride, channels, dtype

    @property
    def used_channels(self) -> int:
        """Channels holding pixels (3 * s * s); the rest are zero padding."""
        return 3 * self.stride * self.stride

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "PatchCodec":
        """Stride video.vae_stride[1] and model.in_dim channels (checked by the config); `device` is
        accepted for WanVAE's signature, there being nothing to place (outputs stay on the input's device)."""
        return cls(cfg.video.vae_stride[1], cfg.model.in_dim, dtype)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> latent [B, channels, T, H/s, W/s] in this codec's dtype."""
        s = self.stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video [B, 3, T, H, W], got {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        if h % s or w % s:
            raise ValueError(f"encode needs H, W multiples of the patch stride {s}, got H={h}, W={w}")
        x = video.to(self.dtype).reshape(b, 3, t, h // s, s, w // s, s)
        x = x.permute(0, 4, 6, 1, 2, 3, 5).reshape(b, self.used_channels, t, h // s, w // s)  # (dy, dx, rgb) -> c
        pad = x.new_zeros(b, self.channels - self.used_channels, t, h // s, w // s)
        return torch.cat([x, pad], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [B, channels, T, h, w] -> video [B, 3, T, s*h, s*w], not clamped (padding channels ignored)."""
        s = self.stride
        if latent.dim() != 5 or latent.shape[1] != self.channels:
            raise ValueError(f"decode expects a latent [B, {self.channels}, t, h, w], got {tuple(latent.shape)}")
        b, _, t, h, w = latent.shape
        x = latent[:, :self.used_channels].to(self.dtype).reshape(b, s, s, 3, t, h, w)
        return x.permute(0, 3, 4, 5, 1, 6, 2).reshape(b, 3, t, h * s, w * s)

    def stream_decoder(self) -> "PatchStreamDecoder":
        return PatchStreamDecoder(self)


class PatchStreamDecoder:
    """`core.codecs.wan_vae.StreamingDecoder`'s interface for the patch codec: every latent frame decodes on its own,
    so chunks decode exactly as the whole video would; only the count of decoded latent frames is kept."""

    def __init__(self, codec: PatchCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self.latent_frames = 0

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent chunk [B, channels, t, h, w] -> its t video frames, not clamped."""
        video = self.codec.decode(latent)
        self.latent_frames += latent.shape[2]
        return video
