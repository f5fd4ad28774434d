"""The toy world's exact teacher: the optimal denoiser E[x0 | x_t, prompt] in closed form, and exact measures.

Under flow matching x_t = (1 - σ) x0 + σ ε, and a prompt's clips are finitely many: the torus translations
(on the world's GRID) of one base clip per size (toyworld/world.py). So the posterior over them is a softmax
of -||x_t - (1 - σ) x0_i||² / 2σ² (a σ per frame is allowed), and E[x0 | x_t] is its weighted mean. Every
clip is background + (colour - background) x mask, the mask depending only on the geometry (shape, motion,
size). With hats for 2-D FFTs over the frame:

    <x_t, T_d B> = Σ_c bg_c Σ x_c + Σ_c (fg_c - bg_c) (x_c ⋆ M)(d)   a circular cross-correlation: iFFT(x̂ · conj(M̂))
    E[x0]_c     = Σ_i w_i [bg_c + (fg_c - bg_c) T_d M]              with Σ_d w(d) T_d M a circular convolution: iFFT(ŵ · M̂)

computed in float64 in pixel space (latents go through the exact, linear patch codec). The empty prompt ""
(the negative prompt) is the unconditional mixture over every prompt, weighted by how often the world draws
it. `WorldClips.nearest` finds, for any clip, the closest world clip (all prompts, sizes and positions): its
attributes and the distance to it, which the evaluation reports as adherence and fidelity. Importing this
module registers the teacher as `learner.teacher.kind: exact_world`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.algo.distill import register_teacher
from core.codecs.patch import PatchCodec
from core.codecs.video import from_uint8_frames
from core.config import Config, ConfigError
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    GRID,
    SHAPES,
    SIZES,
    SPEEDS,
    Attributes,
    Scene,
    all_attributes,
    parse_prompt,
    render,
    shape_mask,
)

MOTIONS: tuple[tuple[str, str | None], ...] = (
    ("static", None), *((d, s) for d in DIRECTIONS if d != "static" for s in SPEEDS))
MIN_SIGMA = 1e-4  # the noise level treated as clean (t = 0)


def _unit(rgb: tuple[int, int, int]) -> torch.Tensor:
    """A palette colour as the codecs see it: pixel / 127.5 - 1."""
    return torch.tensor(rgb, dtype=torch.float64) / 127.5 - 1


@dataclass
class Nearest:
    """The world clip closest to a clip: what it shows, where it starts, and how far it is (RMS over pixels)."""

    attributes: Attributes
    size: float
    start: tuple[int, int]  # (x, y) in pixels
    rms: float


class WorldClips:
    """Every world clip of one geometry (frames x height x width), as masks per (shape, motion, size) and their
    FFTs, with the posterior and nearest-clip computations over them."""

    def __init__(self, frames: int, height: int, width: int):
        if height % GRID or width % GRID:
            raise ValueError(f"the exact world needs frames whose sides are multiples of {GRID}, got {height}x{width}")
        self.frames, self.height, self.width = frames, height, width
        self.index: dict[tuple[str, str, str | None, int], int] = {}
        masks = []
        for shape in SHAPES:
            for direction, speed in MOTIONS:
                for k, size in enumerate(SIZES):
                    self.index[(shape, direction, speed, k)] = len(masks)
                    scene = Scene(shape, "white", "black", direction, speed or "slowly", 0.0, 0.0, size)
                    masks.append(torch.from_numpy(shape_mask(scene, frames, height, width)))
        self.masks = torch.stack(masks).double()  # [G, F, H, W]
        self.mask_fft = torch.fft.rfft2(self.masks)
        self.count = self.masks.sum(dim=(-2, -1))  # [G, F]: pixels covered, the same at every position
        self.valid = torch.zeros(height, width, dtype=torch.bool)  # translations that keep the start on the grid
        self.valid[::height // GRID, ::width // GRID] = True
        self.attributes = all_attributes()

    # ------------------------------------------------------------------------------------------ scores

    def _geometry(self, attrs: Attributes) -> list[int]:
        return [self.index[(attrs.shape, attrs.direction, attrs.speed, k)] for k in range(len(SIZES))]

    def scores(self, x: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor, attrs: list[Attributes]) -> torch.Tensor:
        """Σ_f lam_f <x_f, T_d B_f> - Σ_f kappa_f ||B_f||² for one clip x [3, F, H, W] and every (attribute, size,
        translation d): [A, S, H, W]; translations off the grid are -inf."""
        geoms = torch.tensor([self._geometry(a) for a in attrs])  # [A, S]
        used, inverse = torch.unique(geoms, return_inverse=True)
        x_fft = torch.fft.rfft2(x)  # [3, F, H, W']
        weighted = lam[None, :, None, None] * x_fft  # the per-frame weights go in before the sum over frames
        corr = torch.fft.irfft2(torch.einsum("cfhw,gfhw->gchw", weighted, self.mask_fft[used].conj()),
                                s=(self.height, self.width))  # [G', 3, H, W]: channel-wise cross-correlations
        fg = torch.stack([_unit(COLOURS[a.colour]) for a in attrs])  # [A, 3]
        bg = torch.stack([_unit(BACKGROUNDS[a.background]) for a in attrs])
        sums = x.sum(dim=(-2, -1))  # [3, F]
        const = bg @ (sums * lam).sum(dim=1)  # [A]: Σ_f lam_f Σ_c bg_c Σ x_cf
        out = torch.einsum("ac,ascij->asij", fg - bg, corr[inverse])  # [A, S, H, W]
        pixels = self.height * self.width
        norms = (bg.pow(2).sum(1)[:, None, None] * pixels
                 + (fg.pow(2) - bg.pow(2)).sum(1)[:, None, None] * self.count[geoms])  # [A, S, F]: ||B_f||²
        out = out + const[:, None, None, None] - (norms * kappa).sum(-1)[:, :, None, None]
        return out.masked_fill(~self.valid, -math.inf)

    # ------------------------------------------------------------------------------------------ denoiser

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, attrs: list[Attributes],
                       log_prior: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t = x] for one clip x [3, F, H, W] (pixel space) with noise level sigma [F], over the clips of
        `attrs` (weighted by `log_prior` [A], uniform over sizes and positions)."""
        sigma = sigma.double().clamp(MIN_SIGMA, 1.0)
        a = 1 - sigma
        logits = self.scores(x.double(), a / sigma.pow(2), a.pow(2) / (2 * sigma.pow(2)), attrs)
        if log_prior is not None:
            logits = logits + log_prior[:, None, None, None]
        w = torch.softmax(logits.flatten(), dim=0).view_as(logits)  # [A, S, H, W]
        fg = torch.stack([_unit(COLOURS[t.colour]) for t in attrs])
        bg = torch.stack([_unit(BACKGROUNDS[t.background]) for t in attrs])
        geoms = torch.tensor([self._geometry(t) for t in attrs]).flatten()  # [A*S]
        per_channel = torch.einsum("ac,asij->ascij", fg - bg, w).flatten(0, 1)  # [A*S, 3, H, W]
        summed = torch.zeros(len(self.masks), 3, self.height, self.width, dtype=torch.float64)
        summed.index_add_(0, geoms, per_channel)  # weights of the same mask added up before the convolution
        used = torch.unique(geoms)
        shapes = torch.fft.irfft2(torch.einsum("gchw,gfhw->cfhw", torch.fft.rfft2(summed[used]), self.mask_fft[used]),
                                  s=(self.height, self.width))  # [3, F, H, W]
        return (w.sum(dim=(1, 2, 3)) @ bg)[:, None, None, None] + shapes

    def log_prior(self) -> tuple[list[Attributes], torch.Tensor]:
        """Every prompt's attributes and log probability: the unconditional mixture."""
        attrs = [a for a, _ in self.attributes]
        return attrs, torch.tensor([math.log(p) for _, p in self.attributes], dtype=torch.float64)

    # ------------------------------------------------------------------------------------------ measures

    def nearest(self, x: torch.Tensor, attrs: list[Attributes] | None = None) -> Nearest:
        """The world clip closest to the clip x [3, F, H, W] in pixel space: of any prompt, or of `attrs`' prompts
        (any size and position)."""
        attrs = attrs or self.log_prior()[0]
        ones = torch.ones(self.frames, dtype=torch.float64)
        s = self.scores(x.double(), ones, ones / 2, attrs)  # <x, B> - ||B||²/2: the largest is the nearest
        best = int(torch.argmax(s))
        a, k, dy, dx = np.unravel_index(best, tuple(s.shape))
        dist2 = float(x.double().pow(2).sum() - 2 * s.flatten()[best])
        return Nearest(attrs[a], SIZES[k], (int(dx), int(dy)), math.sqrt(max(dist2, 0.0) / x.numel()))


class ExactWorldTeacher(nn.Module):
    """The real score of the toy world behind a Wan teacher's interface: forward(x, t, context) -> flow, for latents
    of the patch codec at per-frame timesteps t [B, F] (or [B]). It reads the prompts' text, not their
    embeddings (`conditions_on = "prompts"`): `context` is the list of prompts, "" the unconditional mixture."""

    conditions_on = "prompts"

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.vae.kind != "patch":
            raise ConfigError("learner.teacher.kind 'exact_world' works in the toy world's pixel space: it needs "
                              f"vae.kind: patch (got {cfg.vae.kind!r})")
        self.codec = PatchCodec.from_config(cfg, dtype=torch.float64)
        self.height, self.width = cfg.video.height, cfg.video.width
        self._clips: dict[int, WorldClips] = {}

    def clips(self, frames: int) -> WorldClips:
        """The world's clips of `frames` frames (built once per length)."""
        if frames not in self._clips:
            self._clips[frames] = WorldClips(frames, self.height, self.width)
        return self._clips[frames]

    def denoise(self, pixels: torch.Tensor, sigma: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """E[x0 | x_t] in pixel space for videos [B, 3, F, H, W] at noise levels sigma [B, F]."""
        clips = self.clips(pixels.shape[2])
        out = []
        for video, s, prompt in zip(pixels, sigma, prompts):
            if prompt.strip():
                out.append(clips.posterior_mean(video, s, [parse_prompt(prompt)]))
            else:
                attrs, log_prior = clips.log_prior()
                out.append(clips.posterior_mean(video, s, attrs, log_prior))
        return torch.stack(out)

    def true_samples(self, prompts: list[str], frames: int, rng: torch.Generator) -> torch.Tensor:
        """Latents [B, F, C, h, w] of world clips of `prompts`, each at a random size and start on the grid."""
        videos = []
        for prompt in prompts:
            a = parse_prompt(prompt)
            x0, y0 = (int(v) for v in torch.randint(0, GRID, (2,), generator=rng))
            k = int(torch.randint(0, len(SIZES), (1,), generator=rng))
            scene = Scene(a.shape, a.colour, a.background, a.direction, a.speed or "slowly", x0 / GRID, y0 / GRID,
                          SIZES[k])
            videos.append(from_uint8_frames(render(scene, frames, self.height, self.width), torch.float64))
        return self.codec.encode(torch.cat(videos)).transpose(1, 2)

    def nearest_world(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """For clean latents x [B, F, C, h, w], the latents of each one's nearest world clip of its prompt (any size
        and position): the exact place a sample should move to."""
        pixels = self.codec.decode(x.double().transpose(1, 2))  # [B, 3, F, H, W]
        clips = self.clips(x.shape[1])
        targets = []
        for video, prompt in zip(pixels, prompts):
            near = clips.nearest(video, [parse_prompt(prompt)])
            scene = Scene(near.attributes.shape, near.attributes.colour, near.attributes.background,
                          near.attributes.direction, near.attributes.speed or "slowly", near.start[0] / self.width,
                          near.start[1] / self.height, near.size)
            targets.append(from_uint8_frames(render(scene, x.shape[1], self.height, self.width), torch.float64))
        return self.codec.encode(torch.cat(targets)).transpose(1, 2)

    def world_cosine(self, x: torch.Tensor, grad: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per video, the cosine between a DMD gradient `grad` and the exact way back to the world from the clean
        latents x [B, F, C, h, w]: x minus the nearest world clip of its prompt (any size and position). The generator
        moves x along -grad, so 1 is straight toward the world and -1 straight away."""
        away = x.double() - self.nearest_world(x, prompts)
        return torch.nn.functional.cosine_similarity(grad.double().flatten(1), away.flatten(1), dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: list[str]) -> torch.Tensor:
        """Flow (x_t - E[x0 | x_t]) / sigma for latents x [B, C, F, h, w]; sigma = t / 1000 per frame."""
        b, f = x.shape[0], x.shape[2]
        if isinstance(context, torch.Tensor) or len(context) != b:
            raise TypeError("the exact teacher takes the prompts themselves as context: a list of one prompt per video")
        sigma = (t.double().reshape(b, -1).expand(b, f) / 1000).clamp(MIN_SIGMA, 1.0)
        x0 = self.codec.encode(self.denoise(self.codec.decode(x.double()), sigma, list(context)))
        return ((x.double() - x0) / sigma[:, None, :, None, None]).to(x.dtype)


register_teacher("exact_world", ExactWorldTeacher)
