"""Helpers the test modules share (not tests themselves): tensor comparisons, a free port, recorded samples,
a PEFT adapter on disk, the true flow toward a target."""

from __future__ import annotations

import copy
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from core.codecs.video import to_uint8_frames
from core.config import Config
from core.records.sample import Sample
from core.reward.base import VideoInput
from core.reward.motion import MotionScorer
from core.stream.pipeline import VideoPipeline


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Max absolute difference within `atol` (no relative term), with the measured value in the message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max |diff| {diff:.3e} > {atol:.1e}"


def assert_close_ulp(actual: torch.Tensor, expected: torch.Tensor, ulp: int, what: str) -> None:
    """float32 tables equal within `ulp` units in the last place of their largest entry.

    For tables computed through a transcendental (exp): its float32 result is not bit-identical across CPU
    kernels (AMD EPYC and Intel Xeon differ by one ulp in some entries), and a table normalised after the
    exp carries that difference, scaled, into every entry, so the bound is stated on the table's scale."""
    assert actual.dtype == expected.dtype == torch.float32, f"{what}: an ulp bound is for float32, got {actual.dtype}"
    atol = ulp * float(np.spacing(np.float32(expected.abs().max())))
    assert_close(actual, expected, atol, f"{what} ({ulp} ulp of the largest entry)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorded_samples(cfg: Config, n: int, seed: int = 0, weight_version: int = 0) -> list[Sample]:
    """`n` real training-rollout samples of `cfg`'s generator (as an actor makes them), scored by the motion reward."""
    pipe, scorer = VideoPipeline.from_config(cfg), MotionScorer()
    samples = []
    for i in range(n):
        prompt = f"prompt {i}"
        record = pipe.training_rollout(prompt, seed + i)
        with torch.no_grad():
            frames = to_uint8_frames(pipe.vae.decode(record.clean_latents().transpose(1, 2))).numpy()
        score = scorer.score(VideoInput(frames, float(cfg.video.fps), prompt)).to_dict()
        samples.append(Sample.from_rollout(record, score=score, text_context=pipe.text_encoder.encode_valid([prompt])[0],
                                           sample_id=f"e0-i{i}", prompt_id=i, prompt=prompt,
                                           epoch=0, seed=seed + i, weight_version=weight_version, actor="test"))
    return samples


def peft_adapter(base: torch.nn.Module, folder: Path, targets=("q", "k", "v", "o"), r=4, alpha=8, **extra):
    """A PEFT-wrapped copy of `base` with random (non-zero) LoRA weights, saved to `folder`."""
    wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                              **extra)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    wrapped.save_pretrained(str(folder))
    return wrapped


class TrueFlow(torch.nn.Module):
    """A 'teacher' that returns the exact flow toward `x0` [B, F, C, H, W]: (x_t - x0) / sigma."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.p = torch.nn.Parameter(torch.zeros(1, dtype=x0.dtype))  # samplers read the dtype off a parameter

    def forward(self, x, t, context):
        sigma = t[0, 0] / 1000
        return ((x.transpose(1, 2) - self.x0) / sigma).transpose(1, 2)


NO_CHROMIUM = "no Chromium at /usr/bin/chromium (install Debian's chromium package)"


def chromium() -> str | None:
    """Debian's Chromium, which the browser tests drive with Playwright; None when there is none."""
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
