"""Checkpoint layouts: every format round-trips bit-exactly, errors name what is wrong, and diffusers
weights converted by our key mapping give diffusers' own output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from core.config import StreamConfig, WanArchConfig
from core.model.wan import CausalWanModel, WanModel, sinusoidal_embedding
from core.records.checkpoint import (
    CheckpointError,
    arch_from_folder,
    load_into,
    load_wan_state_dict,
    save_safetensors,
    save_self_forcing,
    save_wan_folder,
)

pytestmark = pytest.mark.usefixtures("no_grad")


CFG = WanArchConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, text_len=8)
KINDS = ["wan", "causal"]


def make(kind: str, seed: int, cfg: WanArchConfig = CFG) -> torch.nn.Module:
    """A float64 model with every tensor random, so a tensor left unloaded changes the output."""
    torch.manual_seed(seed)
    model = WanModel(cfg) if kind == "wan" else CausalWanModel(cfg, StreamConfig(num_frame_per_block=1))
    model = model.double()
    for p in model.parameters():
        p.normal_(0.0, 0.2)
    return model.eval()


def run(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen, dtype=torch.float64)
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=gen, dtype=torch.float64)
    t = torch.tensor([[900.0, 500.0, 100.0]], dtype=torch.float64)  # per frame
    return model(x, t if isinstance(model, CausalWanModel) else t[:, 1], ctx)


def prefixed(sd: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


# ------------------------------------------------------------------------------------------ round trips


def _sharded_folder(tmp_path, model):
    folder = tmp_path / "sharded"
    save_wan_folder(folder, model)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(model.state_dict())
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: model.state_dict()[k].contiguous() for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _saved(fmt: str, tmp_path, model) -> Path:
    sd = model.state_dict()
    if fmt == "safetensors":
        save_safetensors(tmp_path / "w.safetensors", sd)
        return tmp_path / "w.safetensors"
    if fmt == "wan_folder":
        save_wan_folder(tmp_path / "wan", model)
        assert arch_from_folder(tmp_path / "wan") == CFG
        return tmp_path / "wan"
    if fmt == "sharded_folder":
        return _sharded_folder(tmp_path, model)
    if fmt == "self_forcing":
        other = make("wan", 99).state_dict()
        save_self_forcing(tmp_path / "sf.pt", generator=sd, critic=other, generator_ema=other)
        return tmp_path / "sf.pt"
    path = tmp_path / {"ode_init_generator": "ode_init.pt", "ode_init_model": "ode_init.pth",
                       "reward_forcing": "rewardforcing.pt"}[fmt]
    torch.save({"ode_init_generator": {"generator": prefixed(sd)}, "ode_init_model": {"model": prefixed(sd)},
                "reward_forcing": prefixed(sd)}[fmt], path)
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["safetensors", "wan_folder", "sharded_folder", "self_forcing",
                                 "ode_init_generator", "ode_init_model", "reward_forcing"])
def test_round_trip(fmt, kind, tmp_path):
    src, dst = make(kind, 0), make(kind, 1)
    expected = run(src)
    assert not torch.allclose(run(dst), expected)
    load_into(dst, load_wan_state_dict(_saved(fmt, tmp_path, src)))
    assert torch.equal(run(dst), expected)


def test_self_forcing_file_holds_model_prefixed_keys(tmp_path):
    sd = make("wan", 0).state_dict()
    save_self_forcing(tmp_path / "sf.pt", generator=sd)
    saved = torch.load(tmp_path / "sf.pt", weights_only=True)
    assert list(saved) == ["generator"]
    assert set(saved["generator"]) == {"model." + k for k in sd}


def test_dtype_is_cast_to_the_model(tmp_path):
    sd = {k: v.float() for k, v in make("wan", 0).state_dict().items()}
    save_safetensors(tmp_path / "w.safetensors", sd)
    model = load_into(make("wan", 1), load_wan_state_dict(tmp_path / "w.safetensors"))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert same(model.state_dict(), sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tensors_are_read_in_the_asked_dtype(suffix, tmp_path):
    """A float32 file read as bfloat16 gives each tensor rounded once, as `.to(bfloat16)` of the stored one."""
    sd = {k: v.float() for k, v in make("wan", 0).state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_safetensors(path, sd) if suffix == ".safetensors" else torch.save(sd, path)
    read = load_wan_state_dict(path, dtype=torch.bfloat16)
    assert {v.dtype for v in read.values()} == {torch.bfloat16}
    assert all(torch.equal(read[k], v.to(torch.bfloat16)) for k, v in sd.items())
    assert same(load_wan_state_dict(path), sd)  # no dtype: the stored one


def test_a_meta_model_takes_the_tensors_themselves(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in make("wan", 0).state_dict().items()}
    with torch.device("meta"):
        model = WanModel(CFG)
    load_into(model, sd)
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in sd.items())
    with torch.device("meta"):
        small = WanModel(CFG.model_copy(update={"dim": 16}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_into(small, sd)


def test_truncated_safetensors_is_an_error(tmp_path):
    save_safetensors(tmp_path / "w.safetensors", make("wan", 0).state_dict())
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="cannot read .*cut.safetensors.*ends inside tensor"):
        load_wan_state_dict(tmp_path / "cut.safetensors")


def test_fsdp_and_compile_fragments_are_stripped(tmp_path):
    sd = make("wan", 0).state_dict()

    def wrapped(key: str) -> str:
        key = re.sub(r"^(blocks\.\d+\.)", r"_fsdp_wrapped_module.\1_checkpoint_wrapped_module.", key)
        return "module.model._orig_mod." + key

    torch.save({"generator_ema": {wrapped(k): v for k, v in sd.items()}}, tmp_path / "ema.pt")
    assert same(load_wan_state_dict(tmp_path / "ema.pt", use_ema=True), sd)


def test_colliding_keys_are_an_error(tmp_path):
    w = torch.zeros(1)
    torch.save({"patch_embedding.weight": w, "model.patch_embedding.weight": w}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="collide"):
        load_wan_state_dict(tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------ role / EMA


def test_role_and_ema_selection(tmp_path):
    gen, critic, ema = (make("wan", s).state_dict() for s in (0, 1, 2))
    save_self_forcing(tmp_path / "sf.pt", generator=gen, critic=critic, generator_ema=ema)
    assert same(load_wan_state_dict(tmp_path / "sf.pt"), gen)
    assert same(load_wan_state_dict(tmp_path / "sf.pt", role="critic"), critic)
    assert same(load_wan_state_dict(tmp_path / "sf.pt", use_ema=True), ema)
    with pytest.raises(CheckpointError, match="no EMA of the critic"):
        load_wan_state_dict(tmp_path / "sf.pt", role="critic", use_ema=True)
    with pytest.raises(CheckpointError, match="role must be"):
        load_wan_state_dict(tmp_path / "sf.pt", role="teacher")


def test_ema_only_file(tmp_path):
    ema = make("wan", 2).state_dict()
    torch.save({"generator_ema": prefixed(ema)}, tmp_path / "ema_only.pt")
    assert same(load_wan_state_dict(tmp_path / "ema_only.pt", use_ema=True), ema)
    with pytest.raises(CheckpointError, match=r"no 'generator' entry.*\['generator_ema'\].*use_ema=True"):
        load_wan_state_dict(tmp_path / "ema_only.pt")


def test_absent_entries_are_errors(tmp_path):
    sd = prefixed(make("wan", 0).state_dict())
    torch.save({"generator": sd}, tmp_path / "ode_init.pt")
    with pytest.raises(CheckpointError, match=r"no 'critic' entry.*\['generator'\]"):
        load_wan_state_dict(tmp_path / "ode_init.pt", role="critic")
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' entry"):
        load_wan_state_dict(tmp_path / "ode_init.pt", use_ema=True)
    torch.save(sd, tmp_path / "rewardforcing.pt")  # flat: there is no EMA to pick
    with pytest.raises(CheckpointError, match="single state dict.*use_ema=False"):
        load_wan_state_dict(tmp_path / "rewardforcing.pt", use_ema=True)


# ------------------------------------------------------------------------------------------ mismatches


def _load_error(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_into(model, sd)
    assert same(model.state_dict(), before), "a failed load must leave the model untouched"
    return str(err.value)


def test_missing_keys_are_listed():
    msg = _load_error(make("wan", 1, CFG.model_copy(update={"num_layers": 3})), make("wan", 0).state_dict())
    assert "missing keys (27): blocks.2.cross_attn.k.bias," in msg  # one block's 27 tensors
    assert "unexpected" not in msg and "architecture config" in msg and "role" in msg


def test_unexpected_keys_are_listed():
    sd = make("wan", 0).state_dict() | {"blocks.0.cross_attn.k_img.weight": torch.zeros(32, 32)}
    msg = _load_error(make("wan", 1), sd)
    assert "unexpected keys (1): blocks.0.cross_attn.k_img.weight" in msg and "missing" not in msg


def test_shape_mismatches_are_listed():
    msg = _load_error(make("wan", 1, CFG.model_copy(update={"ffn_dim": 48})), make("wan", 0).state_dict())
    assert "shape mismatches (6)" in msg  # ffn.0.{weight,bias}, ffn.2.weight x 2
    assert "blocks.0.ffn.0.weight (model (48, 32), checkpoint (64, 32))" in msg


def test_long_key_lists_are_truncated():
    msg = _load_error(make("wan", 1), {"patch_embedding.weight": torch.zeros(32, 16, 1, 2, 2)})
    assert re.search(r"missing keys \(\d+\): .*, \.\.\. and \d+ more", msg)


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist.*config\.json.*Self-Forcing"):
        load_wan_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        arch_from_folder(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"num_attention_heads": 2}')
    with pytest.raises(CheckpointError, match="not a valid Wan2.1 or diffusers transformer config.*attention_head_dim"):
        arch_from_folder(tmp_path / "bad")


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_garbage_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read .*{name}"):
        load_wan_state_dict(tmp_path / name)


def test_unrecognised_layouts(tmp_path):
    torch.save({"state": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"unrecognised layout.*top-level keys state, step.*expected"):
        load_wan_state_dict(tmp_path / "a.pt")
    torch.save([torch.zeros(1)], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_wan_state_dict(tmp_path / "b.pt")
    save_safetensors(tmp_path / "vae.safetensors", {"encoder.conv1.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="does not look like a Wan transformer.*encoder.conv1.weight"):
        load_wan_state_dict(tmp_path / "vae.safetensors")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown suffix '.bin'"):
        load_wan_state_dict(tmp_path / "w.bin")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has neither.*it holds config.json"):
        load_wan_state_dict(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ diffusers


def _diffusers_model(dtype: torch.dtype):
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6).to(dtype)
    for p in model.parameters():  # norms and q/k norms too, so a swapped norm2/norm3 would show
        p.normal_(0.0, 0.3)
    return model.eval()


def _compare(diff_model, tmp_path, kind: str, dtype: torch.dtype) -> float:
    """Save diffusers' model as a diffusers pipeline, load it through our code, return max |diff|."""
    diff_model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    arch = arch_from_folder(tmp_path / "pipe")
    assert arch == CFG.model_copy(update={"text_len": 512})  # diffusers stores no text_len: Wan's 512
    ours = WanModel(arch) if kind == "wan" else CausalWanModel(arch, StreamConfig(num_frame_per_block=3))
    load_into(ours.to(dtype).eval(), load_wan_state_dict(tmp_path / "pipe"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 4, generator=gen).to(dtype)
    ctx = torch.randn(2, arch.text_len, arch.text_dim, generator=gen).to(dtype)  # diffusers does not pad
    t = torch.tensor([999.0, 250.0], dtype=dtype)
    expected = diff_model(x, t, ctx, return_dict=False)[0]
    return (ours(x, t, ctx) - expected).abs().max().item()


class _Sinusoid(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(self.dim, t)


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_parity_float64(kind, tmp_path, monkeypatch):
    """The mapping is exact: with diffusers' float32 islands removed, outputs agree to float64 rounding.

    Even in a float64 model diffusers rounds to float32 in three places: `.float()` on the residual
    stream, modulation and norms (FP32LayerNorm); the RoPE cos/sin tables, built in float64 but stored
    with `.float()`; and the sinusoidal timestep embedding (float32 frequencies and angles). We make
    `.float()` a no-op for float64 tensors while diffusers is built and run, and give it Wan's float64
    sinusoid (same [cos, sin] layout as diffusers' flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    keep_float64 = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64
                        else keep_float64(self, *a, **k))
    diff_model = _diffusers_model(torch.float64)
    assert diff_model.rope.freqs_cos.dtype == torch.float64
    diff_model.condition_embedder.timesteps_proj = _Sinusoid(16)
    assert _compare(diff_model, tmp_path, kind, torch.float64) < 1e-11


def test_diffusers_parity_float32_as_shipped(tmp_path):
    """Unpatched diffusers in float32 at t up to 999: the gap is diffusers' float32 sinusoid.

    Its angle t * freq is rounded to float32 (up to ulp(999) / 2 = 3e-5 rad), which moves the time
    embedding by ~3e-5; we measured ~5e-5 on outputs of magnitude ~13. Any wrong key would be O(1).
    """
    assert _compare(_diffusers_model(torch.float32), tmp_path, "wan", torch.float32) < 2e-4
