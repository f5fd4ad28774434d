"""MotionScorer: a cheap, deterministic reward computed from pixels (backend "motion").

The embedded CPU default and a baseline for the learned backends. It needs no weights and
scores a 480x832, 81-frame clip in well under a second on one CPU core. It returns the
three VideoReward axes, but only two are measured:

* MQ (motion quality): how much the video moves, discounted by how coherent the motion is.
* VQ (visual quality): sharpness of real structure plus contrast, minus clipping.
* TA (text alignment) cannot be computed from pixels: raw 0.0 and normalised 0.0 for every
  video, so TA adds nothing to Overall. `info()` says so too.

Frame selection (motion is measured between *consecutive* source frames, at the source frame
rate, so per-frame flicker and jitter cannot alias away):

    T <= max_frames (48): all T frames, one contiguous window.
    T >  max_frames:      max_frames // 3 (16) windows of 3 consecutive frames, their start
                          frames evenly spaced over [0, T-3] (rounded half up).

Preprocessing: luma (BT.601: 0.299 R + 0.587 G + 0.114 B) / 255, resized so the short side is
`size` (64) px and the long side keeps the aspect ratio (capped at 4 * size); `area`
interpolation when shrinking, bilinear when enlarging; float64 from there on. Call the
analysis frames g_t (values in [0, 1], h x w pixels) and fps the source frame rate.

Motion terms, over the consecutive pairs inside the windows (never across windows):

    velocity      v_t = (g_{t+1} - g_t) * fps                           (intensity per second)
    motion_magnitude  M = mean over pairs of mean_px |v_t|
    coherence     C = sum <v_t, v_{t+1}> / sum |v_t| |v_{t+1}|          (in [-1, 1])
                      over consecutive velocity pairs; 0 when there are none or all are 0
    continuity    R = sum <c_t, c_{t+1}> / sum |c_t| |c_{t+1}|          (in [-1, 1])
                      c_t = g_t - mean(g_t); 1 when every frame is flat or there is one frame
    smoothness    S = (1 + C) / 2                                        (in [0, 1])

    MQ_raw = log(1 + M / 0.1) * S * max(R, 0)

M is per second, so the same motion sampled at 8, 16 or 24 fps gives nearly the same value
(within about 2% on the calibration scenes, while the per-frame change stays small against the
image structure; C and R do depend on the frame rate: a higher rate makes the same motion look
smoother). C is the
cosine between successive velocity fields: steady motion keeps its direction (C near 1),
fresh per-frame noise gives C = -0.5 (successive differences share one frame with opposite
signs), back-and-forth jitter and brightness flicker give C = -1. R is the correlation
between successive frames: it stays near 1 for motion and drops to 0 for frames unrelated to
their predecessor (noise, scene cuts). log(1 + M/0.1) rewards more motion with diminishing
returns; 0.1 intensity/s is a slow pan. A static video scores MQ_raw = 0, a single-frame video
too (no motion, reported with frames_used = 1).

Visual terms, over all analysis frames:

    sharpness   G = mean_px sqrt(dx^2 + dy^2) * size      (forward differences; per short side)
    structure   rho = TV(avgpool2(g)) / (2 TV(g)),  TV = mean|dx| + mean|dy|;  1 if TV = 0
                (about 1 for edges and smooth shading, which survive a 2x downscale, about
                0.25 for pixel noise, which averages away)
    contrast    sigma = mean over frames of std_px(g_t)
    saturation  s = fraction of analysis pixels with g <= 0.02 or g >= 0.98

    VQ_raw = rho^2 * log(1 + G / 1.0) + log(1 + sigma / 0.1) - 2 * s

Normalisation: normalized = (raw - mean) / std with `MOTION_NORMALIZATION` (MQ 0.83 / 0.57,
VQ 1.73 / 0.51, TA 0 / 1), calibrated as described at that constant. Every term above goes to
`RewardScore.extra`.

Limitations (it is a pixel statistic, not a judge): motion faster than the image structure per
frame (a pan crossing the frame in well under a second) decorrelates consecutive frames and
is scored like incoherent change; camera shake is penalised like jitter; hard scene cuts only
lower R by their share of the pairs; nothing here knows what the prompt asked for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from core.config import MotionRewardConfig
from core.reward.base import AXES, Normalization, RewardScore, SamplingInfo, VideoInput

FORMULA_VERSION = "motion-v1"

LUMA = (0.299, 0.587, 0.114)
MOTION_REF = 0.1        # M0, intensity per second (a slow pan)
SHARPNESS_REF = 1.0     # G0, gradient per short side
CONTRAST_REF = 0.1      # sigma0, luma std
SATURATION_WEIGHT = 2.0
SATURATION_LOW, SATURATION_HIGH = 0.02, 0.98

# Calibration (redo it when a constant above changes): raw scores of 84 synthetic "plausible"
# videos: the textured scene of `scene_video` in tests/test_reward_backends.py (anti-aliased
# discs over smooth sinusoids; seeds 0-5) translated at 0, 0.025, 0.05, 0.1, 0.2, 0.4 and 0.6
# short sides per second, 33 frames at 16 fps, at 64x64 and 240x416, each with one of six looks
# (contrast x0.5 / x1 / x1.6 around grey 128, with or without a 5x5 box blur, 3x3 at 64 px).
# Mean and population std per axis, rounded (measured: MQ 0.826 / 0.574, VQ 1.732 / 0.508).
# Normalised, that family spans about MQ -1.5..1.9 and VQ -1.6..1.4; a static video sits at
# MQ -1.46, and so do incoherent ones (noise, jitter, flicker: MQ_raw about 0). These are
# synthetic videos, not generated ones: recalibrate on real rollouts before trusting the scale.
MOTION_NORMALIZATION = Normalization(mean={"VQ": 1.73, "MQ": 0.83, "TA": 0.0},
                                     std={"VQ": 0.51, "MQ": 0.57, "TA": 1.0})


def select_frames(num_frames: int, max_frames: int = 48, window: int = 3) -> list[np.ndarray]:
    """Windows of consecutive frame indices to analyse (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if window < 2 or max_frames < window:
        raise ValueError(f"need window >= 2 and max_frames >= window, got window {window}, max_frames {max_frames}")
    if num_frames <= max_frames:
        return [np.arange(num_frames)]
    starts = np.unique(np.floor(np.linspace(0, num_frames - window, max_frames // window) + 0.5).astype(np.int64))
    return [np.arange(s, s + window) for s in starts]


def analysis_size(height: int, width: int, size: int = 64) -> tuple[int, int]:
    """(h, w) with the short side `size` and the aspect ratio kept (long side capped at 4 * size)."""
    scale = size / min(height, width)
    h, w = round(height * scale), round(width * scale)
    return min(max(h, 1), 4 * size), min(max(w, 1), 4 * size)


def to_gray_small(frames: np.ndarray, size: int = 64, chunk: int = 8) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float64 luma in [0, 1], [n, h, w] at the analysis size."""
    n, height, width = frames.shape[:3]
    h, w = analysis_size(height, width, size)
    luma = torch.tensor(LUMA, dtype=torch.float32) / 255.0
    mode = "area" if h <= height and w <= width else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    out = []
    for i in range(0, n, chunk):  # bounded memory: a chunk of full-size frames at a time
        gray = torch.from_numpy(np.ascontiguousarray(frames[i:i + chunk])).to(torch.float32) @ luma
        out.append(F.interpolate(gray[:, None], size=(h, w), mode=mode, **kw)[:, 0])
    return torch.cat(out).to(torch.float64).clamp_(0.0, 1.0)


def _pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Numerator and denominator of sum_i <a_i, b_i> / sum_i |a_i| |b_i|."""
    return float((a * b).sum()), float((a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)).sum())


def _total_variation(g: torch.Tensor) -> float:
    return float((g[:, :, 1:] - g[:, :, :-1]).abs().mean() + (g[:, 1:, :] - g[:, :-1, :]).abs().mean())


def motion_features(frames: np.ndarray, fps: float, *, size: int = 64, max_frames: int = 48,
                    window: int = 3) -> tuple[dict[str, float], int, tuple[int, int]]:
    """The terms of the module docstring for one video: (features, frames_used, analysis (h, w))."""
    windows = select_frames(len(frames), max_frames, window)
    used = np.unique(np.concatenate(windows))
    g_all = to_gray_small(frames[used], size)
    row = {int(j): k for k, j in enumerate(used)}
    speeds: list[torch.Tensor] = []
    coh_num = coh_den = con_num = con_den = 0.0
    for idx in windows:
        g = g_all[[row[int(j)] for j in idx]]
        if len(g) < 2:
            continue
        v = (g[1:] - g[:-1]) * fps
        speeds.append(v.abs().mean(dim=(1, 2)))
        if len(v) > 1:
            n, d = _pooled_cosine(v[1:], v[:-1])
            coh_num, coh_den = coh_num + n, coh_den + d
        c = g - g.mean(dim=(1, 2), keepdim=True)
        n, d = _pooled_cosine(c[1:], c[:-1])
        con_num, con_den = con_num + n, con_den + d
    eps = 1e-12
    feats = {
        "motion_magnitude": float(torch.cat(speeds).mean()) if speeds else 0.0,
        "coherence": min(max(coh_num / coh_den, -1.0), 1.0) if coh_den > eps else 0.0,
        "continuity": min(max(con_num / con_den, -1.0), 1.0) if con_den > eps else 1.0,
    }
    feats["smoothness"] = (1.0 + feats["coherence"]) / 2.0

    dx = g_all[:, :-1, 1:] - g_all[:, :-1, :-1]
    dy = g_all[:, 1:, :-1] - g_all[:, :-1, :-1]
    feats["sharpness"] = float(torch.sqrt(dx * dx + dy * dy).mean()) * size if dx.numel() else 0.0
    tv = _total_variation(g_all)
    if tv > eps and min(g_all.shape[1:]) >= 4:
        feats["structure"] = min(_total_variation(F.avg_pool2d(g_all[:, None], 2)[:, 0]) / (2.0 * tv), 1.0)
    else:
        feats["structure"] = 1.0
    feats["contrast"] = float(g_all.flatten(1).std(dim=1, unbiased=False).mean())
    feats["saturation"] = float(((g_all <= SATURATION_LOW) | (g_all >= SATURATION_HIGH)).to(torch.float64).mean())
    return feats, len(used), (int(g_all.shape[1]), int(g_all.shape[2]))


def raw_scores(feats: dict[str, float]) -> dict[str, float]:
    """MQ_raw and VQ_raw from the features (TA_raw is always 0: not measurable from pixels)."""
    mq = math.log1p(feats["motion_magnitude"] / MOTION_REF) * feats["smoothness"] * max(feats["continuity"], 0.0)
    vq = (feats["structure"] ** 2 * math.log1p(feats["sharpness"] / SHARPNESS_REF)
          + math.log1p(feats["contrast"] / CONTRAST_REF) - SATURATION_WEIGHT * feats["saturation"])
    return {"VQ": vq, "MQ": mq, "TA": 0.0}


class MotionScorer:
    """Deterministic pixel-statistics reward (see the module docstring for the formula)."""

    name = "motion"

    def __init__(self, size: int = 64, max_frames: int = 48, window: int = 3,
                 normalization: Normalization = MOTION_NORMALIZATION):
        if size < 4:
            raise ValueError(f"size must be >= 4, got {size}")
        select_frames(1, max_frames, window)  # validates max_frames / window
        if any(normalization.std[k] <= 0 for k in AXES):
            raise ValueError(f"normalisation std must be > 0, got {normalization.std}")
        self.size, self.max_frames, self.window = size, max_frames, window
        self.normalization = normalization

    @classmethod
    def from_config(cls, cfg: MotionRewardConfig | None = None) -> MotionScorer:
        """The scorer for `reward.backend: motion` (its section has no settings)."""
        return cls()

    def score(self, video: VideoInput) -> RewardScore:
        feats, used, hw = motion_features(video.frames, video.fps, size=self.size,
                                          max_frames=self.max_frames, window=self.window)
        sampling = SamplingInfo(source_fps=float(video.fps), source_frames=int(video.frames.shape[0]),
                                frames_used=used, resized_hw=hw)
        return RewardScore.from_raw(raw_scores(feats), self.normalization, sampling, feats)

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        # Videos differ in size and length; each is scored on its own, so a batch gives exactly
        # the scores of one-by-one calls.
        with torch.no_grad():
            return [self.score(v) for v in videos]

    def info(self) -> dict:
        return {
            "backend": self.name,
            "formula_version": FORMULA_VERSION,
            "checkpoint": None,
            "deterministic": True,
            "axes": {
                "VQ": "rho^2 * log(1 + sharpness / 1.0) + log(1 + contrast / 0.1) - 2 * saturation",
                "MQ": "log(1 + motion_magnitude / 0.1) * (1 + coherence) / 2 * max(continuity, 0)",
                "TA": "not computed: text alignment cannot be measured from pixels; raw 0.0, normalised 0.0",
            },
            "normalization": {"mean": dict(self.normalization.mean), "std": dict(self.normalization.std)},
            "sampling": {
                "frames": f"all frames when T <= {self.max_frames}, else {self.max_frames // self.window} "
                          f"evenly spaced windows of {self.window} consecutive frames",
                "max_frames": self.max_frames,
                "window": self.window,
                "resize_short_side": self.size,
                "color": "BT.601 luma",
            },
        }
