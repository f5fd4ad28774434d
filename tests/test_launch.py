"""`launch.py rollout` end to end on the embedded default, through the same code paths as the 1.3B config."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import launch
from core.checkpoint import save_self_forcing
from core.config import load_config
from core.wan.model import CausalWanModel


def test_rollout_writes_latents(tmp_path, capsys):
    out = tmp_path / "lat.safetensors"
    assert launch.main(["rollout", "--frames", "18", "--out", str(out)]) == 0
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 18, 16, 8, 8) and torch.isfinite(latents).all()
    printed = capsys.readouterr().out
    assert "latent frames/s" in printed and "2 evictions" in printed  # window 12 frames: blocks 5 and 6 evict


def test_rollout_loads_a_checkpoint(tmp_path):
    cfg = load_config()
    torch.manual_seed(123)
    model = CausalWanModel(cfg.model, cfg.stream)
    ckpt = tmp_path / "gen.pt"
    save_self_forcing(ckpt, generator=model.state_dict(), generator_ema={k: v + 1 for k, v in model.state_dict().items()})
    outs = []
    for extra in ([], ["checkpoint.use_ema=true"]):
        out = tmp_path / f"lat{len(outs)}.safetensors"
        assert launch.main(["rollout", "--frames", "3", "--out", str(out), "--checkpoint", str(ckpt), *extra]) == 0
        outs.append(load_file(str(out))["latents"])
    random_init = tmp_path / "rand.safetensors"
    assert launch.main(["rollout", "--frames", "3", "--out", str(random_init), "runtime.seed=5"]) == 0
    assert not torch.equal(outs[0], outs[1])  # generator vs generator_ema really differ


def test_rollout_errors_are_one_clear_line(tmp_path, capsys):
    assert launch.main(["rollout", "stream.sink_sise=3"]) == 2
    assert "stream.sink_sise: unknown key" in capsys.readouterr().err
    assert launch.main(["rollout", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert launch.main(["rollout", "--frames", "9", "stream.local_attn_size=-1", "stream.sink_mode=static",
                        "stream.rope=absolute", "stream.max_cache_frames=6", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "set stream.local_attn_size" in capsys.readouterr().err
