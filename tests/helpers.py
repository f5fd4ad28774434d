"""Small assertions shared by the parity tests."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Max absolute difference within `atol` (no relative term), with the measured value in the message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max |diff| {diff:.3e} > {atol:.1e}"


def recorded_samples(cfg, n: int, seed: int = 0, weight_version: int = 0) -> list:
    """`n` real training-rollout samples of `cfg`'s generator, decoded and scored by the motion reward."""
    from core.pipeline import VideoPipeline
    from core.reward.base import VideoInput
    from core.reward.motion import MotionScorer
    from core.rollout import gaussian_noise
    from core.sample import Sample
    from core.vae import to_uint8_frames

    pipe, scorer = VideoPipeline.from_config(cfg), MotionScorer()
    fpb, (lh, lw) = cfg.stream.num_frame_per_block, cfg.video.latent_hw
    samples = []
    with torch.no_grad():
        for i in range(n):
            gen = torch.Generator().manual_seed(seed + i)
            noise = gaussian_noise((1, fpb, cfg.model.in_dim, lh, lw), gen, pipe.dtype, pipe.device)
            prompt = f"prompt {i}"
            context = pipe.text_encoder.encode([prompt])
            record = pipe.rollout.training_rollout(context, pipe.generator.init_cache(1, (lh, lw)), noise,
                                                   cfg.video.num_latent_frames // fpb, generator=gen)
            frames = to_uint8_frames(pipe.vae.decode(record.clean_latents().transpose(1, 2))).numpy()
            score = scorer.score(VideoInput(frames, float(cfg.video.fps), prompt)).to_dict()
            samples.append(Sample.from_rollout(record, score=score, sample_id=f"e0-i{i}", prompt_id=i, prompt=prompt,
                                               epoch=0, seed=seed + i, weight_version=weight_version, actor="test"))
    return samples


class TrueFlow(torch.nn.Module):
    """A 'teacher' that returns the exact flow toward `x0` [B, F, C, H, W]: (x_t - x0) / sigma."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.p = torch.nn.Parameter(torch.zeros(1, dtype=x0.dtype))  # samplers read the dtype off a parameter

    def forward(self, x, t, context):
        sigma = t[0, 0] / 1000
        return ((x.transpose(1, 2) - self.x0) / sigma).transpose(1, 2)
