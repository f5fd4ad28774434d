"""VideoReward backend (core/reward/videoreward.py).

Preprocessing is checked against VideoAlign's formulas (vision_process.py: smart_nframes,
linspace indices, smart_resize; the Qwen2-VL processor's patch layout; prompt_template.py and the
Qwen2-VL chat template), written out here independently. The model is a tiny random Qwen2-VL
saved in the released folder layout (model_config.json + checkpoint-<step>/model.pth holding the
state dict of a peft LoRA-wrapped model with VideoAlign's attribute names); the backend must load
it, merge the LoRA, and give the same rewards as the unmerged peft model run the way VideoAlign's
reward forward runs it (head on every position, gathered at the special tokens, default positions).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2 import Template
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers.vision_utils import get_vision_position_ids

from core.config import VideoRewardConfig
from core.reward.base import AXES, VideoInput
from core.reward.videoreward import (
    DETAILED_SPECIAL_TEMPLATE,
    RELEASE_NORMALIZATION,
    SPECIAL_TOKENS,
    VideoRewardBackend,
    VideoRewardFiles,
    VideoRewardNet,
    build_prompt,
    find_arch_config,
    locate_checkpoint,
    num_sampled_frames,
    patchify_video,
    render_chat,
    resize_frames,
    sample_frame_indices,
    smart_resize,
)
from videoreward_release import (
    INFERENCE_CONFIG,
    MAX_FRAME_PIXELS,
    MIN_PIXELS,
    QWEN2_VL_CHAT_TEMPLATE,
    STEP,
    Release,
    make_tokenizer,
    model_config,
)

TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
# ----------------------------------------------------------------------------- VideoAlign formulas, written out


def ref_nframes(total: int, video_fps: float, fps: float = 2.0) -> int:
    """vision_process.smart_nframes with ele = {"fps": fps} (FRAME_FACTOR 2, 4..768 frames)."""
    min_frames = math.ceil(4 / 2) * 2
    max_frames = math.floor(min(768, total) / 2) * 2
    n = total / video_fps * fps
    n = min(max(n, min_frames), max_frames)
    n = round(n / 2) * 2
    n = min(n, total)
    assert 2 <= n <= total
    return n


def ref_smart_resize(h: int, w: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    h_bar = max(factor, round(h / factor) * factor)
    w_bar = max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar, w_bar = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def test_frame_count_matches_smart_nframes():
    # hand-computed anchors: 81 frames at 16 fps -> 10.125 -> round(5.06)*2 = 10; ties round half to even
    assert num_sampled_frames(81, 16) == 10
    assert num_sampled_frames(100, 40) == 4   # 5 -> round(2.5) = 2 -> 4
    assert num_sampled_frames(140, 40) == 8   # 7 -> round(3.5) = 4 -> 8
    assert num_sampled_frames(5, 16) == 4     # raised to the minimum of 4
    assert num_sampled_frames(3, 16) == 2     # fewer than 4 frames: floor_2(min(768, 3)) = 2
    assert num_sampled_frames(2, 16) == 2
    assert num_sampled_frames(4000, 2) == 768  # capped at 768
    assert num_sampled_frames(33, 8, nframes=11) == 12  # data_config.num_frames path: round(5.5) * 2
    for total in (2, 3, 4, 7, 16, 33, 81, 121, 161, 480, 1601):
        for fps in (4.0, 8.0, 15.0, 16.0, 23.976, 30.0, 60.0):
            assert num_sampled_frames(total, fps) == ref_nframes(total, fps), (total, fps)
    with pytest.raises(ValueError):
        num_sampled_frames(1, 16)  # the reference's own rule rejects one frame


def test_frame_indices_are_rounded_float32_linspace():
    assert sample_frame_indices(81, 16) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert sample_frame_indices(5, 16) == [0, 1, 3, 4]
    assert sample_frame_indices(3, 16) == [0, 2]
    assert sample_frame_indices(2, 30) == [0, 1]
    assert sample_frame_indices(1, 16) == [0, 0]  # shown twice (Qwen2-VL tiles a lone frame); the reference raises
    for total, fps in ((161, 16), (33, 8.0), (1000, 23.976)):
        n = ref_nframes(total, fps)
        want = torch.linspace(0, total - 1, n).round().long().tolist()
        assert sample_frame_indices(total, fps) == want


def test_smart_resize_matches_reference():
    assert smart_resize(480, 832, min_pixels=128 * 28 * 28, max_pixels=200704) == (336, 588)
    assert smart_resize(832, 480, max_pixels=200704) == (588, 336)
    assert smart_resize(64, 64, max_pixels=200704) == (336, 336)  # small frames go up to >= 128*28*28 pixels
    assert smart_resize(336, 588, max_pixels=200704) == (336, 588)
    for h in (28, 61, 240, 480, 512, 720, 1080):
        for w in (40, 320, 480, 832, 1280, 1920):
            assert smart_resize(h, w, max_pixels=200704) == ref_smart_resize(h, w, 128 * 28 * 28, 200704), (h, w)
            want = ref_smart_resize(h, w, MIN_PIXELS, MAX_FRAME_PIXELS)
            if min(want) < 28:  # the reference would hand a zero-sized frame to the resize
                with pytest.raises(ValueError, match="both sides must be at least 28"):
                    smart_resize(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_FRAME_PIXELS)
            else:
                assert smart_resize(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_FRAME_PIXELS) == want, (h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_resize_is_bicubic_antialias_on_float_without_clamping():
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 2, (3, 48, 80, 3)) * 255).astype(np.uint8)  # hard edges overshoot under bicubic
    out = resize_frames(frames, (28, 56))
    want = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(28, 56),
                                           mode="bicubic", align_corners=False, antialias=True)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 28, 56)
    assert torch.equal(out, want)
    assert out.min() < 0 and out.max() > 255  # not clamped
    assert not torch.equal(out, out.round())
    q = resize_frames(frames, (28, 56), quantize=True)  # VideoAlign's uint8 file reader
    assert torch.equal(q, want.clamp(0, 255).round())
    assert torch.equal(resize_frames(frames, (48, 80)), torch.from_numpy(frames).permute(0, 3, 1, 2).float())


def test_patchify_matches_qwen2_vl_layout():
    torch.manual_seed(0)
    t, h, w, p, tp, m = 4, 56, 84, 14, 2, 2
    frames = torch.rand(t, 3, h, w) * 255
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    patches, grid = patchify_video(frames, mean=mean, std=std)
    assert grid == (2, 4, 6)
    x = (frames / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    rows = []  # merge windows in raster order, 2x2 patches inside each, each patch flattened as (C, T, P, P)
    for gt in range(t // tp):
        for bh in range(h // p // m):
            for bw in range(w // p // m):
                for ih in range(m):
                    for iw in range(m):
                        y0, x0 = (bh * m + ih) * p, (bw * m + iw) * p
                        rows.append(x[gt * tp:(gt + 1) * tp, :, y0:y0 + p, x0:x0 + p].permute(1, 0, 2, 3).reshape(-1))
    assert torch.allclose(patches, torch.stack(rows), atol=1e-6)
    odd, grid_odd = patchify_video(frames[:3])  # odd counts repeat the last frame
    even, _ = patchify_video(torch.cat([frames[:3], frames[2:3]]))
    assert grid_odd == (2, 4, 6) and torch.equal(odd, even)


def test_prompt_template_and_chat():
    assert hashlib.sha256(DETAILED_SPECIAL_TEMPLATE.encode()).hexdigest() == TEMPLATE_SHA256
    text = build_prompt("a corgi {runs}")
    assert text.startswith("\nYou are tasked with evaluating a generated video") and text.endswith("END\n")
    assert "\n**Visual Quality:**  \n" in text and "lowest possible. \n" in text and "is acceptable.  \n" in text
    assert "Textual prompt - a corgi {runs}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n" in text
    assert [text.index(t) for t in SPECIAL_TOKENS] == sorted(text.index(t) for t in SPECIAL_TOKENS)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    assert render_chat(text) == Template(QWEN2_VL_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def release(videoreward_release) -> Release:
    return videoreward_release


@pytest.fixture(scope="module")
def backend(release) -> VideoRewardBackend:
    return VideoRewardBackend(release.root, device="cpu", dtype="float32", min_pixels=MIN_PIXELS)


def _videos() -> list[VideoInput]:
    rng = np.random.default_rng(1)

    def vid(t, h, w):
        return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)

    return [
        VideoInput(vid(9, 64, 64), 8.0, "a red circle moves left across a blue background"),
        VideoInput(vid(3, 40, 72), 16.0, "a circle"),
        VideoInput(vid(30, 100, 60), 10.0, "the camera pans slowly across a blue background; zebra unknown words"),
        VideoInput(vid(1, 56, 56), 16.0, "red"),
    ]


def test_loads_released_layout(backend, release):
    f = backend.files
    assert f.checkpoint_dir == release.ckpt and f.layout == "full" and f.tokenizer_dir == release.ckpt / "tokenizer"
    assert backend.arch_source == str(release.root / "config.json")
    assert backend.special_token_ids == tuple(release.tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    assert backend.merged_modules == 14  # q, k, v, o, gate, up, down in 2 layers
    assert backend.lora_summary["scale"] == 2.0
    assert backend.name == "videoreward"


def test_sampling_info_and_sizes(backend):
    vids = _videos()
    _, infos = backend.prepare_batch(vids)
    assert [(i.source_fps, i.source_frames, i.frames_used, i.resized_hw) for i in infos] == [
        (8.0, 9, 4, (56, 56)), (16.0, 3, 2, (28, 84)), (10.0, 30, 6, (84, 28)), (16.0, 1, 2, (56, 56))]
    for v, i in zip(vids, infos):
        h, w = v.frames.shape[1:3]
        assert i.resized_hw == ref_smart_resize(h, w, MIN_PIXELS, MAX_FRAME_PIXELS)


def test_token_layout_and_right_padding(backend, release):
    vids = _videos()
    batch, _ = backend.prepare_batch(vids)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    grids = batch["video_grid_thw"].tolist()
    assert batch["pixel_values_videos"].shape == (sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14)
    for row, (v, (t, h, w)) in enumerate(zip(vids, grids)):
        # the reference processor: chat template text, <|video_pad|> repeated per merged patch, then tokenized
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(v.prompt)}]}]
        text = release.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = text.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4), 1)
        want = release.tok(text)["input_ids"]
        n = len(want)
        assert ids[row, :n].tolist() == want
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == release.tok.pad_token_id).all()
        pos = [want.index(i) for i in backend.special_token_ids]
        assert batch["reward_positions"][row].tolist() == pos and pos == sorted(pos)
    assert (mask.sum(1) < ids.shape[1]).any()  # some rows really are padded


def test_merged_lora_equals_unmerged_peft_reference(backend, release):
    batch, _ = backend.prepare_batch(_videos())
    ref_in = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")}
    with torch.no_grad():
        want = release.peft_model(**ref_in)
        with release.peft_model.disable_adapter():
            no_lora = release.peft_model(**ref_in)
        got = backend.net(**batch)
    assert got.shape == (4, 3)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert (want - no_lora).abs().max() > 1e-2  # the adapter matters, so the merge was tested
    scores = backend.score_batch(_videos())
    assert np.allclose([[s.raw[k] for k in AXES] for s in scores], want.numpy(), atol=2e-5)


def test_head_read_at_the_three_token_positions(backend):
    batch, _ = backend.prepare_batch(_videos()[:2])
    with torch.no_grad():
        hidden = backend.net.hidden_states(batch["input_ids"], batch["attention_mask"],
                                           batch["pixel_values_videos"], batch["video_grid_thw"])
        got = backend.net(**batch)
        head = backend.net.rm_head.weight[0]
        for row in range(2):
            ids = batch["input_ids"][row].tolist()
            manual = [float(hidden[row, ids.index(t)] @ head) for t in backend.special_token_ids]  # VQ, MQ, TA
            assert np.allclose(got[row].tolist(), manual, atol=1e-6)
            shifted = [float(hidden[row, ids.index(t) - 1] @ head) for t in backend.special_token_ids]
            assert not np.allclose(manual, shifted, atol=1e-3)
        assert len({round(x, 4) for x in got[0].tolist()}) == 3


def test_batch_equals_one_by_one(backend):
    vids = _videos()
    together = backend.score_batch(vids)
    for v, s in zip(vids, together):
        alone = backend.score_batch([v])[0]
        assert np.allclose([s.raw[k] for k in AXES], [alone.raw[k] for k in AXES], atol=2e-5)
        assert s.sampling == alone.sampling
    assert backend.score_batch([]) == []
    micro = VideoRewardBackend.__new__(VideoRewardBackend)
    micro.__dict__.update(backend.__dict__, micro_batch_size=1)
    assert np.allclose([[s.raw[k] for k in AXES] for s in micro.score_batch(vids)],
                       [[s.raw[k] for k in AXES] for s in together], atol=2e-5)


READ_MEAN = {k: INFERENCE_CONFIG[f"{k}_mean"] for k in AXES}  # what the fixture's model_config.json says
READ_STD = {k: INFERENCE_CONFIG[f"{k}_std"] for k in AXES}


def test_normalisation(backend, release, tmp_path):
    """Scores are z-normalised with the release's own inference_config (the fixture's numbers, which no constant
    of the backend has); without one, raw scores are returned as they are (the reference's behaviour)."""
    assert RELEASE_NORMALIZATION.mean == {"VQ": 3.6757, "MQ": 1.1646, "TA": 2.8105}  # the real release's
    assert RELEASE_NORMALIZATION.std == {"VQ": 2.2476, "MQ": 1.3811, "TA": 2.5121}
    assert READ_MEAN != RELEASE_NORMALIZATION.mean and READ_STD != RELEASE_NORMALIZATION.std
    assert backend.normalization.mean == READ_MEAN and backend.normalization.std == READ_STD
    assert backend.normalization_source == "inference_config"
    for s in backend.score_batch(_videos()[:2]):
        for k in AXES:
            assert s.normalized[k] == pytest.approx((s.raw[k] - READ_MEAN[k]) / READ_STD[k])
            assert s.normalized[k] != pytest.approx(s.raw[k])
        assert s.overall == pytest.approx(sum(s.normalized.values()))
        d = s.to_dict()
        assert d["Overall"] == pytest.approx(s.overall) and d["VQ"] == s.normalized["VQ"]

    root = _copy_release(release, tmp_path / "no_inference_config")
    config = json.loads((root / "model_config.json").read_text())
    del config["inference_config"]
    (root / "model_config.json").write_text(json.dumps(config))
    raw = VideoRewardBackend(root, device="cpu", dtype="float32", min_pixels=MIN_PIXELS)
    assert raw.normalization_source == "identity (no inference_config)"
    assert raw.normalization.mean == dict.fromkeys(AXES, 0.0) and raw.normalization.std == dict.fromkeys(AXES, 1.0)
    (s,) = raw.score_batch(_videos()[:1])
    assert s.normalized == pytest.approx(s.raw)


def test_info(backend, release):
    info = backend.info()
    sha = hashlib.sha256((release.root / "model_config.json").read_bytes()).hexdigest()
    assert info["backend"] == "videoreward"
    assert info["checkpoint"]["path"] == str(release.root)
    assert info["checkpoint"]["identity"] == f"checkpoint-{STEP}@{sha[:12]}"
    assert info["normalization"]["mean"] == READ_MEAN and info["normalization"]["std"] == READ_STD
    assert info["normalization"]["source"] == "inference_config"
    assert info["sampling"]["fps"] == 2.0 and info["sampling"]["resize"]["max_pixels"] == MAX_FRAME_PIXELS
    assert info["sampling"]["resize"]["min_pixels"] == MIN_PIXELS
    assert info["prompt"]["template_sha256"] == TEMPLATE_SHA256
    assert info["model"]["lora"]["merged_at_load"] and info["model"]["dtype"] == "float32"
    json.dumps(info)


def test_from_config_and_device(release, backend):
    cfg = VideoRewardConfig(checkpoint=str(release.root), device="cpu", dtype="float32")
    b = VideoRewardBackend.from_config(cfg, min_pixels=MIN_PIXELS)
    v = _videos()[:1]
    assert b.score_batch(v)[0].raw == pytest.approx(backend.score_batch(v)[0].raw, abs=1e-6)


def test_bfloat16_rounds_rope_like_the_reference(release, backend):
    b = VideoRewardBackend(release.root, device="cpu", dtype="bfloat16", min_pixels=MIN_PIXELS)
    inv = b.net.language_model.rotary_emb.inv_freq
    assert torch.equal(inv.float(), inv.to(torch.bfloat16).float())
    assert b.net.rm_head.weight.dtype == torch.bfloat16
    # transformers 4.45's vision RoPE after model.to(bf16): table = outer(arange(n, bf16), inv_freq_bf16),
    # cos taken in bf16, laid out [h, w, h, w]
    rot = b.net.visual.rotary_pos_emb
    pos = get_vision_position_ids(torch.tensor([[2, 6, 4]]), 2)
    table = torch.outer(torch.arange(8, dtype=torch.bfloat16), rot.inv_freq.to(torch.bfloat16))
    c = table[pos].flatten(1).cos().float()
    assert torch.equal(rot(torch.zeros(1), pos)[0], torch.cat([c, c], dim=-1))
    v = _videos()[:2]
    lo = np.array([[s.raw[k] for k in AXES] for s in b.score_batch(v)])
    hi = np.array([[s.raw[k] for k in AXES] for s in backend.score_batch(v)])
    assert np.isfinite(lo).all() and np.abs(lo - hi).max() < 0.25 * max(1.0, np.abs(hi).max())


def test_prompt_with_special_tokens_is_rejected(backend):
    v = _videos()[1]
    with pytest.raises(ValueError, match="special tokens"):
        backend.score_batch([VideoInput(v.frames, v.fps, "sneaky <|TA_reward|>")])


def test_adapter_layout_with_local_base(release, backend, tmp_path):
    """adapter_model.safetensors + non_lora_state_dict.pth over base weights from a local folder (4.45 key
    layout, larger vocabulary, resized to the tokenizer as the reference does)."""

    base_dir = tmp_path / "Qwen2-VL-tiny"
    base_dir.mkdir()
    shutil.copy(release.root / "config.json", base_dir / "config.json")
    full = release.peft_model.state_dict()
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.clone()
            for k, v in full.items() if "lora_" not in k and "rm_head" not in k}
    extra = torch.randn(16, base["model.embed_tokens.weight"].shape[1])
    base["model.embed_tokens.weight"] = torch.cat([base["model.embed_tokens.weight"], extra])
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    save_file(base, str(base_dir / "model.safetensors"))

    root = tmp_path / "VideoReward"
    ckpt = root / "checkpoint-11"
    shutil.copytree(release.ckpt / "tokenizer", ckpt / "tokenizer")
    (root / "model_config.json").write_text(json.dumps(model_config(base=str(base_dir))))
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(release.peft_model).items()},
              str(ckpt / "adapter_model.safetensors"))
    torch.save({"base_model.model.rm_head.weight": full["base_model.model.rm_head.weight"]},
               ckpt / "non_lora_state_dict.pth")
    b = VideoRewardBackend(root, device="cpu", dtype="float32", min_pixels=MIN_PIXELS)
    assert b.files.layout == "adapter" and b.arch_source == str(base_dir / "config.json")
    v = _videos()[:2]
    assert np.allclose([[s.raw[k] for k in AXES] for s in b.score_batch(v)],
                       [[s.raw[k] for k in AXES] for s in backend.score_batch(v)], atol=2e-5)

    (root / "model_config.json").write_text(json.dumps(model_config()))  # no local base folder
    with pytest.raises(FileNotFoundError, match="base_model"):
        VideoRewardBackend(root, device="cpu", dtype="float32")


def test_tokenizer_without_reward_tokens_gets_them_added(release, backend, tmp_path):
    root = tmp_path / "VideoReward"
    ckpt = root / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pth").symlink_to(release.ckpt / "model.pth")
    shutil.copy(release.root / "config.json", root / "config.json")
    shutil.copy(release.root / "model_config.json", root / "model_config.json")
    make_tokenizer().save_pretrained(str(ckpt))  # the base tokenizer, in checkpoint-1/ itself
    b = VideoRewardBackend(root, device="cpu", dtype="float32", min_pixels=MIN_PIXELS)
    assert b.added_special_tokens and b.special_token_ids == backend.special_token_ids
    v = _videos()[:1]
    assert b.score_batch(v)[0].raw == pytest.approx(backend.score_batch(v)[0].raw, abs=1e-6)


def test_builtin_qwen2_vl_2b_architecture(tmp_path):
    """The release stores no config.json; the built-in Qwen2-VL-2B-Instruct one gives its known shapes
    (2.21B parameters with the 151660-token vocabulary), built on the meta device."""

    files = VideoRewardFiles(tmp_path, tmp_path / "model_config.json", tmp_path / "checkpoint-11352", "full",
                             (tmp_path / "checkpoint-11352" / "model.pth",), tmp_path)
    cfg, source = find_arch_config(files, None, "Qwen/Qwen2-VL-2B-Instruct")
    assert source == "built-in Qwen/Qwen2-VL-2B-Instruct architecture"
    cfg.text_config.vocab_size = 151660
    with torch.device("meta"):
        sd = VideoRewardNet(cfg, 1).state_dict()
    assert sum(v.numel() for v in sd.values()) == 2_208_563_200
    assert sd["visual.patch_embed.proj.weight"].shape == (1280, 3, 2, 14, 14)
    assert sd["visual.merger.mlp.2.weight"].shape == (1536, 5120)
    assert sd["language_model.layers.27.self_attn.k_proj.weight"].shape == (256, 1536)
    assert sd["rm_head.weight"].shape == (1, 1536)
    assert cfg.video_token_id == 151656
    with pytest.raises(FileNotFoundError, match="config.json"):
        find_arch_config(files, None, "someone/other-model")


# ----------------------------------------------------------------------------- errors


def _copy_release(release: Release, dst: Path, weights: bool = True) -> Path:
    ckpt = dst / f"checkpoint-{STEP}"
    shutil.copytree(release.ckpt / "tokenizer", ckpt / "tokenizer")
    shutil.copy(release.root / "model_config.json", dst / "model_config.json")
    shutil.copy(release.root / "config.json", dst / "config.json")
    if weights:
        (ckpt / "model.pth").symlink_to(release.ckpt / "model.pth")
    return dst


def test_missing_files_are_named(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_checkpoint(tmp_path / "nowhere")
    root = _copy_release(release, tmp_path / "a")
    (root / "model_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_config\.json is missing.*expected layout"):
        locate_checkpoint(root)

    root = tmp_path / "b"
    root.mkdir()
    shutil.copy(release.root / "model_config.json", root / "model_config.json")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-<step>/ folder"):
        locate_checkpoint(root)

    root = _copy_release(release, tmp_path / "c", weights=False)
    (root / f"checkpoint-{STEP}" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing: model\.pth, non_lora_state_dict\.pth"):
        locate_checkpoint(root)

    root = _copy_release(release, tmp_path / "d")
    shutil.rmtree(root / f"checkpoint-{STEP}" / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        locate_checkpoint(root)

    root = _copy_release(release, tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="has no checkpoint-5/"):
        locate_checkpoint(root, step=5)
    assert locate_checkpoint(root, step=STEP).step == STEP


def test_key_mismatch_lists_missing_and_unexpected(release, tmp_path):
    root = _copy_release(release, tmp_path / "k", weights=False)
    sd = dict(torch.load(release.ckpt / "model.pth", weights_only=True))
    del sd["base_model.model.model.norm.weight"]
    sd["base_model.model.extra_head.weight"] = torch.zeros(2)
    torch.save(sd, root / f"checkpoint-{STEP}" / "model.pth")
    with pytest.raises(ValueError) as e:
        VideoRewardBackend(root, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "missing keys (1): language_model.norm.weight" in msg
    assert "unexpected keys (1): extra_head.weight" in msg

    sd = dict(torch.load(release.ckpt / "model.pth", weights_only=True))
    sd["base_model.model.rm_head.weight"] = torch.zeros(3, 64)
    torch.save(sd, root / f"checkpoint-{STEP}" / "model.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): rm_head\.weight \(model \(1, 64\), checkpoint \(3, 64\)\)"):
        VideoRewardBackend(root, device="cpu", dtype="float32")


def test_unsupported_configuration_is_refused(release, tmp_path):
    root = _copy_release(release, tmp_path / "u")
    (root / "model_config.json").write_text(json.dumps(model_config(prompt_template_type="simple")))
    with pytest.raises(ValueError, match="detailed_special"):
        VideoRewardBackend(root, device="cpu", dtype="float32")
    (root / "model_config.json").write_text(json.dumps({"data_config": {}}))
    with pytest.raises(ValueError, match="model_config"):
        VideoRewardBackend(root, device="cpu", dtype="float32")
