"""Wan2.1 VAE: streaming decode, loading and its errors (parity with the reference: tests/test_golden.py),
on a randomly initialised VAE of the plumbing config's width at 32x32 pixels."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from core.codecs.video import to_uint8_frames
from core.codecs.wan_vae import WanVAE, wan_arch_from_state_dict
from core.config import PLUMBING_CONFIG, load_config
from core.records.checkpoint import CheckpointError
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("no_grad")



@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    """The embedded default's VAE (random, seeded), in float64."""
    return WanVAE.from_config(load_config(PLUMBING_CONFIG), "cpu", torch.float64)


def video(frames: int, height: int = 32, width: int = 32, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen, dtype=torch.float64) * 2 - 1


def latent(frames: int, hw: tuple[int, int] = (4, 4), seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, *hw, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- streaming


def test_streaming_decode_equals_full_decode(tiny_vae):
    """Blocks of 3 latent frames decoded as they come equal one full decode bit for bit, and match
    diffusers' own decode (which clears its cache per call and clamps)."""
    blocks, per_block = 3, 3
    z = latent(blocks * per_block)
    full = tiny_vae.decode(z)
    assert full.shape == (1, 3, 1 + 4 * (blocks * per_block - 1), 32, 32)

    decoder = tiny_vae.stream_decoder()
    for _ in range(2):  # a second video after reset() starts afresh
        parts = [decoder.decode(z[:, :, b * per_block:(b + 1) * per_block]) for b in range(blocks)]
        assert [p.shape[2] for p in parts] == [1 + 4 * (per_block - 1)] + [4 * per_block] * (blocks - 1)
        assert torch.equal(torch.cat(parts, dim=2), full)
        decoder.reset()

    reference = tiny_vae.model.decode(tiny_vae.denormalize(z)).sample
    assert_close(full.clamp(-1, 1), reference, 1e-12, "full decode vs diffusers AutoencoderKLWan.decode")


def test_encode_decode_shapes():
    vae = WanVAE.random(seed=3, base_dim=8)
    z = vae.encode(video(5, 32, 48, batch=2).float())
    assert z.shape == (2, 16, 2, 4, 6) and z.dtype == torch.float32
    out = vae.decode(z)
    assert out.shape == (2, 3, 5, 32, 48)
    frames = to_uint8_frames(out[:1])
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames, to_uint8_frames(out[0].clamp(-1, 1)))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(video(4).float())
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video(5, 36, 32).float())
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 8, 1, 4, 4))


def test_from_config_random_is_wan21_at_tiny_width():
    cfg = load_config(PLUMBING_CONFIG)
    rng = torch.get_rng_state()
    a, b = WanVAE.from_config(cfg), WanVAE.from_config(cfg)
    assert torch.equal(torch.get_rng_state(), rng), "building the VAE must not move the global RNG"
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    other = WanVAE.from_config(load_config(PLUMBING_CONFIG, overrides=["runtime.seed=1"]))
    assert not torch.equal(a.model.decoder.conv_in.weight, other.model.decoder.conv_in.weight)
    # Wan2.1_VAE.pth's architecture, only narrower
    expected = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], base_dim=cfg.vae.base_dim)
    for key, value in expected.items():
        assert a.model.config[key] == value, key


# ---------------------------------------------------------------------------------------------- loading


def test_wan_key_mapping_agrees_with_diffusers_converter(tiny_vae):
    """At Wan2.1's num_res_blocks (2) diffusers' single-file converter inverts wan_state_dict()."""
    wan = tiny_vae.wan_state_dict()
    assert "decoder.upsamples.3.resample.1.weight" in wan and "encoder.conv1.weight" in wan
    converted = convert_wan_vae_to_diffusers(wan)
    own = tiny_vae.model.state_dict()
    assert set(converted) == set(own)
    assert all(torch.equal(converted[k], own[k]) for k in own)


def test_wan_pth_round_trip(tmp_path, tiny_vae):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: v.float() for k, v in tiny_vae.wan_state_dict().items()}, path)
    cfg = load_config(PLUMBING_CONFIG, overrides=[f"vae.checkpoint={path}", "vae.base_dim=96"])  # the file sets the width
    loaded = WanVAE.from_config(cfg, "cpu", torch.float64)
    assert wan_arch_from_state_dict(torch.load(path))["base_dim"] == tiny_vae.model.config.base_dim
    for key, value in tiny_vae.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    x = video(5)
    z = tiny_vae.encode(x)
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z), tiny_vae.decode(z))


def test_diffusers_folder(tmp_path, tiny_vae):
    tiny_vae.model.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")  # a pipeline root holding vae/
    for path in (tmp_path / "vae", tmp_path):
        loaded = WanVAE.load(path).double()
        z = latent(2)
        assert torch.equal(loaded.decode(z), tiny_vae.decode(z))


def test_missing_and_corrupt_checkpoints(tmp_path):
    missing = tmp_path / "nowhere" / "Wan2.1_VAE.pth"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        WanVAE.load(missing)
    assert str(missing) in str(e.value) and "Wan2.1_VAE.pth" in str(e.value) and "config.json" in str(e.value)

    for name in ("Wan2.1_VAE.pth", "vae.safetensors"):
        corrupt = tmp_path / name
        corrupt.write_bytes(b"\x00not a checkpoint")
        with pytest.raises(CheckpointError, match="cannot read VAE checkpoint") as e:
            WanVAE.load(corrupt)
        assert str(corrupt) in str(e.value)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        WanVAE.load(empty)


def test_key_mismatch_lists_keys_and_loads_nothing(tiny_vae):
    vae = WanVAE.random(seed=5, base_dim=8)
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    sd = tiny_vae.wan_state_dict()
    del sd["decoder.head.2.bias"]
    sd["decoder.upsamples.99.residual.2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        vae.load_wan_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1): decoder.head.2.bias" in msg
    assert "unexpected keys (1): decoder.upsamples.99.residual.2.weight" in msg
    assert all(torch.equal(before[k], v) for k, v in vae.model.state_dict().items())
