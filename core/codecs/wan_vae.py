"""Wan2.1 VAE (docs/reference.md): diffusers' AutoencoderKLWan plus what this project needs on top.

* Loads the original `Wan2.1_VAE.pth` (Wan key names, converted here, no hub access) or a local
  diffusers AutoencoderKLWan folder; loads are strict and a mismatch lists the keys.
* Works in the DiT's latent space: `encode` returns the normalised posterior mean (mu - mean) / std
  with Wan's 16-channel constants, `decode` takes normalised latents.
* `StreamingDecoder` decodes latent frames as the generator produces them. The decoder's causal
  convolutions keep their last two input frames per layer between calls, so decoding block by block
  gives exactly the full decode (the first latent -> 1 frame, each later latent -> 4 frames).
  diffusers' own `decode` clears that cache on every call (and clamps), so it cannot stream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d, WanResample, WanUpsample
from safetensors.torch import load_file
from torch import nn

from core.config import Config
from core.records.checkpoint import CheckpointError, mismatch_report

StateDict = dict[str, torch.Tensor]

LAYOUTS = ("expected the original Wan2.1 VAE file (`Wan2.1_VAE.pth`, or a .safetensors with the same "
           "original keys such as `encoder.conv1.weight`) or a diffusers AutoencoderKLWan folder "
           "(config.json + diffusion_pytorch_model.safetensors, or a pipeline root with a vae/ folder)")

# ---------------------------------------------------------------------------------------------- keys

# diffusers name -> original Wan name, as key prefixes.
_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
_PART = {  # after `encoder.` / `decoder.`
    "conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2.",
    "mid_block.resnets.0.": "middle.0.", "mid_block.attentions.0.": "middle.1.", "mid_block.resnets.1.": "middle.2.",
}
# WanResidualBlock's named layers -> indices in Wan's `residual` Sequential (norm, act, conv, norm, act, drop, conv)
_RESNET = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
           "conv_shortcut.": "shortcut."}


def _resnet_key(rest: str) -> str:
    for new, old in _RESNET.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest  # resample / time_conv / attention keys keep their names


def diffusers_to_wan_key(key: str, num_res_blocks: int) -> str:
    """One AutoencoderKLWan key under its original Wan name.

    Wan's decoder is one flat `upsamples` list (per stage num_res_blocks + 1 residual blocks, then a
    resample), where diffusers groups them into `up_blocks.S.resnets.J` / `up_blocks.S.upsamplers.0`;
    diffusers' own converter hard-codes num_res_blocks 2, so the index is computed here.
    """
    for new, old in _TOP.items():
        if key.startswith(new):
            return old + key[len(new):]
    part, rest = key.split(".", 1)
    for new, old in _PART.items():
        if rest.startswith(new):
            tail = rest[len(new):]
            return f"{part}.{old}{_resnet_key(tail) if 'resnets' in new else tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{part}.downsamples.{m[1]}.{_resnet_key(m[2])}"
    per_stage = num_res_blocks + 2
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.upsamples.{int(m[1]) * per_stage + int(m[2])}.{_resnet_key(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{part}.upsamples.{int(m[1]) * per_stage + num_res_blocks + 1}.{m[2]}"
    raise KeyError(f"no Wan2.1 name for AutoencoderKLWan key {key!r}")


def wan_arch_from_state_dict(sd: StateDict) -> dict:
    """AutoencoderKLWan arguments read off an original-key Wan2.1 VAE state dict.

    The encoder's flat `downsamples` list gives everything: residual blocks until a resample closes a
    stage, each stage's width, and whether its resample also halves time (it has a time_conv).
    """
    if "encoder.conv1.weight" not in sd or "conv2.weight" not in sd:
        raise CheckpointError("not a Wan2.1 VAE state dict (no encoder.conv1.weight / conv2.weight); " + LAYOUTS)
    base_dim = sd["encoder.conv1.weight"].shape[0]
    index = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    dim_mult, temporal, blocks = [], [], [0]
    for i in index:
        prefix = f"encoder.downsamples.{i}."
        if prefix + "residual.2.weight" in sd:
            blocks[-1] += 1
            width = sd[prefix + "residual.2.weight"].shape[0]
        elif prefix + "resample.1.weight" in sd:
            dim_mult.append(width // base_dim)
            temporal.append(prefix + "time_conv.weight" in sd)
            blocks.append(0)
    dim_mult.append(width // base_dim)
    if len(set(blocks)) != 1:
        raise CheckpointError(f"Wan2.1 VAE encoder stages have different block counts {blocks}; "
                              "only the Wan2.1 layout (same num_res_blocks per stage, no attention) is supported")
    return dict(base_dim=base_dim, z_dim=sd["conv2.weight"].shape[0], dim_mult=dim_mult,
                num_res_blocks=blocks[0], temperal_downsample=temporal)


# ---------------------------------------------------------------------------------------------- model


class _ExactUpsample(WanUpsample):
    """diffusers' WanUpsample (like Wan's own Upsample) rounds its input through float32 (`x.float()`),
    there for half-precision kernels; for float64 that costs ~1e-7. Nearest upsampling is a plain copy,
    so float64 input is upsampled as is; every other dtype keeps diffusers' behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            return nn.Upsample.forward(self, x)
        return super().forward(x)


def _exact_float64_upsampling(model: AutoencoderKLWan) -> None:
    """Swap every WanUpsample for _ExactUpsample (no weights involved, so nothing else changes)."""
    for module in model.modules():
        if isinstance(module, WanResample) and module.mode.startswith("upsample") \
                and type(module.resample[0]) is WanUpsample:
            old = module.resample[0]
            module.resample[0] = _ExactUpsample(scale_factor=old.scale_factor, mode=old.mode)


class WanVAE(nn.Module):
    """AutoencoderKLWan working on normalised latents, with a streaming decoder."""

    temporal_stride = 4  # Wan2.1's: latent frame 0 -> 1 video frame, every later one -> 4

    def __init__(self, model: AutoencoderKLWan, latents_mean: Sequence[float] | torch.Tensor | None = None,
                 latents_std: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        cfg = model.config
        if cfg.patch_size is not None or cfg.is_residual:
            raise ValueError("this is a Wan2.2-style AutoencoderKLWan (patch_size / is_residual); only the Wan2.1 "
                             "VAE is supported")
        _exact_float64_upsampling(model)
        self.model = model.eval()
        mean = latents_mean if latents_mean is not None else cfg.latents_mean
        std = latents_std if latents_std is not None else cfg.latents_std
        # kept in float64 outside the module's dtype casts (the constants are decimal lists); cast to
        # the data's device and dtype where used
        self.latents_mean = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
        self.latents_std = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1, 1)
        self.num_decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(cls, seed: int = 0, **arch) -> "WanVAE":
        """Randomly initialised VAE (diffusers' default init) from `seed`; Wan2.1's architecture unless
        `arch` overrides AutoencoderKLWan arguments (e.g. base_dim). The global RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(**arch))

    @classmethod
    def from_wan_state_dict(cls, sd: StateDict) -> "WanVAE":
        """Build the architecture the original-key state dict describes and load it strictly."""
        arch = wan_arch_from_state_dict(sd)
        with torch.device("meta"):  # no random init of weights that are overwritten next
            model = AutoencoderKLWan(**arch)
        vae = cls(model.to_empty(device="cpu"))
        vae.load_wan_state_dict(sd)
        return vae

    @classmethod
    def load(cls, path: str | Path) -> "WanVAE":
        """From `Wan2.1_VAE.pth` (or an original-key .safetensors) or a local diffusers folder; never the hub."""
        path = Path(path)
        if path.is_dir():
            folder = path / "vae" if (path / "model_index.json").is_file() and (path / "vae").is_dir() else path
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"VAE folder {path} has no config.json; {LAYOUTS}")
            try:
                return cls(AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True))
            except (OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"cannot load the diffusers AutoencoderKLWan folder {folder}: {e}") from e
        if not path.is_file():
            raise CheckpointError(f"VAE checkpoint {path} does not exist; {LAYOUTS}")
        return cls.from_wan_state_dict(_read_state_dict(path))

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "WanVAE":
        """`cfg.vae.checkpoint`, or (None) a random Wan2.1 VAE of width `cfg.vae.base_dim` seeded from
        `cfg.runtime.seed`: the tiny default runs the real VAE's code with fewer channels."""
        if cfg.vae.checkpoint:
            vae = cls.load(cfg.vae.checkpoint)
        else:
            vae = cls.random(cfg.runtime.seed, base_dim=cfg.vae.base_dim)
        return vae.to(device=device, dtype=dtype).requires_grad_(False)

    # ------------------------------------------------------------------ weights

    def load_wan_state_dict(self, sd: StateDict) -> None:
        """Strictly load original-key weights (cast to the model's dtype); a mismatch loads nothing."""
        expected = self.model.state_dict()
        names = {diffusers_to_wan_key(k, self.model.config.num_res_blocks): k for k in expected}
        report = mismatch_report({k: expected[names[k]].shape for k in names}, sd)
        if report:
            raise CheckpointError("Wan2.1 VAE checkpoint does not fit the model; nothing was loaded.\n  " + report)
        self.model.load_state_dict({names[k]: v.to(expected[names[k]].dtype) for k, v in sd.items()}, strict=True)

    def wan_state_dict(self) -> StateDict:
        """The weights under their original Wan2.1 names (what `Wan2.1_VAE.pth` holds)."""
        n = self.model.config.num_res_blocks
        return {diffusers_to_wan_key(k, n): v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ encode / decode

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> the DiT's latent space, (mu - mean) / std."""
        return (mu - self.latents_mean.to(mu)) / self.latents_std.to(mu)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.latents_std.to(latent) + self.latents_mean.to(latent)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised posterior mean [B, 16, 1 + k, H/8, W/8]."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % 4 or h % 8 or w % 8:
            raise ValueError(f"encode needs 1 + 4k frames and H, W multiples of 8, got T={t}, H={h}, W={w}")
        mu = self.model.encode(video.to(self.dtype)).latent_dist.mean
        return self.normalize(mu)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, 16, T', h, w] -> video [B, 3, 1 + 4(T'-1), 8h, 8w], not clamped."""
        return self.stream_decoder().decode(latent)

    def stream_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes one video chunk by chunk, carrying the decoder's causal-conv cache across calls.

    Each latent frame goes through post_quant_conv and the decoder on its own, as diffusers' `_decode`
    does, but the cache lives here instead of being cleared per call, so any split of the latent frames
    gives bit-identical output to decoding them at once. Several decoders may share one VAE.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video: the next latent frame is the first (decodes to one frame)."""
        self._cache: list = [None] * self.vae.num_decoder_convs
        self.latent_frames = 0

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent chunk [B, 16, t, h, w] -> its video frames (1 + 4(t-1) for the first
        chunk of a video, 4t afterwards), not clamped."""
        model = self.vae.model
        if latent.dim() != 5 or latent.shape[1] != model.config.z_dim:
            raise ValueError(f"decode expects a latent [B, {model.config.z_dim}, t, h, w], got {tuple(latent.shape)}")
        z = self.vae.denormalize(latent.to(self.vae.dtype))
        frames = []
        for i in range(z.shape[2]):
            x = model.post_quant_conv(z[:, :, i:i + 1])
            frames.append(model.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=self.latent_frames == 0))
            self.latent_frames += 1
        return torch.cat(frames, dim=2)


def _read_state_dict(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a truncated or foreign file
        raise CheckpointError(f"cannot read VAE checkpoint {path} ({type(e).__name__}: {e}); is it a complete "
                              f"file? {LAYOUTS}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a flat state dict; {LAYOUTS}")
    return obj
