"""`launch.py generate` end to end on the embedded default: text -> streamed blocks -> decoded MP4."""

from __future__ import annotations

import pytest
import torch

import launch
from core.config import PLUMBING_CONFIG, load_config
from core.model.wan import CausalWanModel
from core.records.checkpoint import save_self_forcing
from core.records.video_io import read_video_file


def generate(*args: str) -> int:
    """`launch.py generate` on the plumbing config (random tiny weights, 64x64 through the Wan VAE)."""
    return launch.main(["generate", "--config", str(PLUMBING_CONFIG), *args])


def test_generate_writes_a_playable_mp4(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert generate("--prompt", "a red circle moves left", "--frames", "33", "--out", str(out)) == 0
    video = read_video_file(out)
    assert video.frames.shape == (33, 64, 64, 3) and video.fps == 16
    printed = capsys.readouterr().out
    assert f"wrote {out}: 33 frames 64x64 @ 16 fps" in printed
    assert "denoising" in printed and "decoding" in printed


def test_generate_prompts_file_and_frame_trimming(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\na blue square\n")
    assert generate("--prompts-file", str(prompts), "--frames", "10", "--out", str(tmp_path / "vids"),
                    "video.fps=8") == 0
    files = sorted((tmp_path / "vids").glob("*.mp4"))
    assert [f.name for f in files] == ["000_a_blue_square.mp4", "001_a_blue_square.mp4"]
    first, second = (read_video_file(f) for f in files)
    assert first.frames.shape[0] == second.frames.shape[0] == 10 and first.fps == 8
    assert not (first.frames == second.frames).all()  # prompt i uses seed + i
    assert "hits, 1 misses" in capsys.readouterr().out  # the repeated prompt is encoded once


def test_generate_loads_a_generator_checkpoint(tmp_path):
    cfg = load_config(PLUMBING_CONFIG)
    torch.manual_seed(123)
    sd = CausalWanModel(cfg.model, cfg.stream).state_dict()
    ckpt = tmp_path / "gen.pt"
    save_self_forcing(ckpt, generator=sd, generator_ema={k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()})
    videos = []
    for extra in ([], ["checkpoint.use_ema=true"]):
        out = tmp_path / f"v{len(videos)}.mp4"
        args = ["--prompt", "x", "--frames", "9", "--out", str(out), "--checkpoint", str(ckpt), *extra]
        assert generate(*args) == 0
        videos.append(read_video_file(out).frames)
    assert not (videos[0] == videos[1]).all()  # generator and generator_ema really differ


def test_generate_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate("--prompt", "x", "--frames", "0")
    assert "must be >= 1" in capsys.readouterr().err
    assert generate("--prompt", "x", "stream.sink_sise=3") == 2
    assert "stream.sink_sise: unknown key" in capsys.readouterr().err
    assert generate("--prompt", "x", "--checkpoint", str(tmp_path / "nope.pt")) == 2
    assert f"checkpoint.generator: {tmp_path / 'nope.pt'}" in capsys.readouterr().err
    assert generate("--prompt", "x", "vae.checkpoint=" + str(tmp_path / "vae.pth")) == 2
    assert f"vae.checkpoint: {tmp_path / 'vae.pth'}" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert generate("--prompt", "x", "vae.checkpoint=" + str(tmp_path / "garbage.pth")) == 2
    assert "garbage.pth" in capsys.readouterr().err
    assert generate("--prompt", "x", "--frames", "200", "stream.local_attn_size=-1", "stream.sink_mode=static",
                    "stream.rope=absolute", "--out", str(tmp_path / "x.mp4")) == 2
    assert "set stream.local_attn_size" in capsys.readouterr().err


def test_serve_following_a_folder_that_is_not_there_is_one_clear_line(tmp_path, capsys):
    """Checked before Ray or Serve start."""
    assert launch.main(["serve", "--follow", str(tmp_path / "no_run")]) == 2
    err = capsys.readouterr().err
    assert f"--follow {tmp_path / 'no_run'}: no such folder" in err and "learner.output_dir" in err


def test_an_unexpected_runtime_error_shows_its_traceback_behind_a_one_line_summary(tmp_path, capsys):
    """A library's own RuntimeError (here flash-attn missing; CUDA out of memory or NCCL on a cluster) keeps its
    traceback, so the user sees where it came from; the last line says what it was."""
    assert generate("--prompt", "x", "runtime.attention_backend=flash", "--out", str(tmp_path / "x.mp4")) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "core/model/attention.py" in err
    assert err.rstrip().splitlines()[-1].startswith("error: attention backend 'flash' needs flash-attn")
