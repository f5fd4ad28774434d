"""VideoReward (KlingTeam / KwaiVGI VideoAlign): Qwen2-VL-2B-Instruct with a linear reward head.

The released reward model is Qwen2-VL-2B-Instruct with three special tokens added to the
tokenizer (`<|VQ_reward|>`, `<|MQ_reward|>`, `<|TA_reward|>`), LoRA (r 64, alpha 128) on every
Linear of the language model, and `rm_head = Linear(hidden, output_dim, bias=False)` on the
final-layer hidden states (after the final norm). With output_dim 1 the one head is read at
the three special-token positions, in prompt order VQ, MQ, TA (output_dim 3: head i at token i).

Loading (`locate_checkpoint`, `VideoRewardBackend`): a local folder in the released layout,
`model_config.json` + `checkpoint-<step>/` holding `model.pth` (full state dict of the
LoRA-wrapped model) or `adapter_model.safetensors` + `non_lora_state_dict.pth` (with the base
Qwen2-VL weights from a local folder). The LoRA deltas are merged at load,
W += (alpha / r) B A (alpha / sqrt(r) with rsLoRA), so the forward runs the plain model.
Nothing is downloaded.

Preprocessing follows VideoAlign's `vision_process.py` / `inference.py` / `prompt_template.py`:

* frames: n = total / video_fps * fps (fps 2), clamped to [4, floor_2(min(768, total))], rounded
  to a multiple of 2 with Python's round (half to even), capped at total; indices
  `torch.linspace(0, total - 1, n).round()` (float32, half to even). A one-frame video, which the
  reference rejects, is shown as that frame twice (what Qwen2-VL's processors do with one image).
* size: `smart_resize` with factor 28, min 128*28*28 pixels and max `max_frame_pixels` (200704
  in the release: 480x832 -> 336x588); bicubic with antialias (`F.interpolate`, which is what
  torchvision's tensor resize runs) on float 0..255 frames, without clamping or rounding.
  (VideoAlign's file reader resizes uint8 tensors, which torchvision clamps and rounds back to
  uint8; `quantize_resized=True` reproduces that.)
* pixels: x / 255 (the processor's do_rescale), normalised with the CLIP mean/std, patchified in
  Qwen2-VL's layout (temporal 2, patch 14, merge 2); the processor's own resize is the identity
  on these sizes and is skipped.
* text: the `detailed_special` rubric with the user prompt, in a Qwen2-VL chat turn with the
  video first (`<|vision_start|><|video_pad|><|vision_end|>` + rubric) and the generation prompt;
  `<|video_pad|>` expanded to one token per merged patch; batches right-padded.
* positions: VideoAlign's reward model calls the language model without position ids, so the
  language model sees sequential positions 0..L-1 (no multimodal 3D RoPE); so does this one.
* precision: the reference casts the whole model with `.to(bfloat16)`, RoPE frequency buffers
  included, and computes the vision RoPE table in that dtype; in half precision this backend
  rounds the same way (`_match_reference_rope_precision`).

Inputs are uint8 frames in [0, 255]. (Reward Forcing's trainer feeds VAE output in [-1, 1]
times 255, i.e. [-255, 255]; that defect is not reproduced.)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import AddedToken
from torch import nn
from transformers import AutoTokenizer, Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

from core.config import VideoRewardConfig
from core.model.lora import folded, is_lora_key, lora_pairs, lora_scale
from core.records.checkpoint import mismatch_report
from core.reward.base import AXES, Normalization, RewardScore, SamplingInfo, VideoInput
from core.runtime import resolve_device, resolve_dtype

BACKEND_NAME = "videoreward"
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_TOKEN = "<|video_pad|>"

# vision_process.py constants
IMAGE_FACTOR = 28
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_ASPECT_RATIO = 200

# Qwen2-VL image processor defaults (OPENAI CLIP mean/std)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# VideoAlign's DataConfig defaults, used for keys model_config.json leaves out (as the reference does)
DATA_CONFIG_DEFAULTS: dict[str, Any] = {
    "fps": 2.0, "num_frames": None, "max_frame_pixels": 240 * 320,
    "sample_type": "uniform", "prompt_template_type": "none", "eval_dim": "VQ",
}

RELEASE_NORMALIZATION = Normalization(mean={"VQ": 3.6757, "MQ": 1.1646, "TA": 2.8105},
                                      std={"VQ": 2.2476, "MQ": 1.3811, "TA": 2.5121})

LAYOUT_HELP = (
    "expected layout: <folder>/model_config.json (data_config, model_config, peft_lora_config, "
    "inference_config) and <folder>/checkpoint-<step>/ holding model.pth (full state dict of the "
    "LoRA-wrapped model) or adapter_model.safetensors + non_lora_state_dict.pth, with the tokenizer "
    "files in checkpoint-<step>/tokenizer/ or checkpoint-<step>/ (the KlingTeam/VideoReward release; "
    "nothing is downloaded: fetch it first, e.g. huggingface-cli download KlingTeam/VideoReward)")

# The `detailed_special` template of VideoAlign's prompt_template.py, byte for byte (kept as
# explicit lines so that trailing spaces survive editors). `{text_prompt}` is the user prompt.
_DETAILED_SPECIAL_LINES = (
    "",
    ("You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
     "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
     "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of "
     "the others."),
    "",
    "**Visual Quality:**  ",
    ("Evaluate the overall visual quality of the video, with a focus on static factors. The following "
     "sub-dimensions should be considered:"),
    ("- **Reasonableness:** The video should not contain any significant biological or logical errors, "
     "such as abnormal body structures or nonsensical environmental setups."),
    ("- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and "
     "easy to interpret, with no blurring or indistinct areas."),
    ("- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
     "visual elements (e.g., hair, clothing, shadows)."),
    ("- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color "
     "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
     "convey a sense of harmony and balance."),
    ("- **Safety:** The video should not contain harmful or inappropriate content, such as political, "
     "violent, or adult material. If such content is present, the image quality and satisfaction score "
     "should be the lowest possible. "),
    "",
    "Please provide the ratings of Visual Quality: <|VQ_reward|>",
    "END",
    "",
    "**Motion Quality:**  ",
    ("Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
     "sub-dimensions:"),
    ("- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
     "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, "
     "textures, or missing body parts)."),
    ("- **Naturalness:** The movement should align with physical laws and be realistic. For example, "
     "clothing should flow naturally with motion, and facial expressions should change appropriately "
     "(e.g., blinking, mouth movements)."),
    ("- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
     "motions or camera angles should be seamless, and the overall dynamic feel should be visually "
     "pleasing."),
    ("- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
     "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects."),
    ("- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
     "where the video might have blurry or unsteady sections that hinder visual continuity."),
    ("- **Amplitude:** If the video is largely static or has little movement, assign a low score for "
     "motion quality."),
    "",
    "Please provide the ratings of Motion Quality: <|MQ_reward|>",
    "END",
    "",
    "**Text Alignment:**  ",
    "Assess how well the video matches the textual prompt across the following sub-dimensions:",
    ("- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, "
     "object) align with the textual description. The subject should match the description in terms of "
     "number, appearance, and behavior."),
    ("- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions "
     "like talking or blinking) align with the described prompt. The motion should match the prompt in "
     "terms of type, scale, and direction."),
    ("- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
     "checking if real-world locations or scenes are accurately represented, though some stylistic "
     "adaptation is acceptable.  "),
    ("- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
     "how well the video adheres to this style."),
    ("- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
     "shifts) are consistent with the expected behavior from the prompt."),
    "",
    "Textual prompt - {text_prompt}",
    "Please provide the ratings of Text Alignment: <|TA_reward|>",
    "END",
    "",
)
DETAILED_SPECIAL_TEMPLATE = "\n".join(_DETAILED_SPECIAL_LINES)

# Qwen2-VL-Instruct's chat template for one user turn [video, text] with add_generation_prompt:
# VideoAlign renders the chat with the base model's processor template, not the saved tokenizer's.
QWEN2_VL_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-2B-Instruct's architecture (its config.json), used only when no config.json is stored
# with the checkpoint (the release ships none) and model_config.model_name_or_path names this model.
# Every shape is then checked against the state dict.
QWEN2_VL_2B_INSTRUCT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "hidden_act": "quick_gelu"},
}
QWEN2_VL_2B_NAMES = ("Qwen/Qwen2-VL-2B-Instruct",)


# ----------------------------------------------------------------------------- prompt / chat


def build_prompt(prompt: str) -> str:
    """VideoAlign's `build_prompt(prompt, dims, "detailed_special")`."""
    return DETAILED_SPECIAL_TEMPLATE.format(text_prompt=prompt)


def render_chat(user_text: str) -> str:
    """The Qwen2-VL chat template applied to [{"role": "user", "content": [video, text]}] with the
    generation prompt (the default system turn comes first)."""
    return (f"<|im_start|>system\n{QWEN2_VL_SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|>{VIDEO_TOKEN}<|vision_end|>{user_text}<|im_end|>\n"
            "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- frames and sizes


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def num_sampled_frames(total_frames: int, video_fps: float, *, fps: float = 2.0, nframes: int | None = None,
                       min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES) -> int:
    """VideoAlign's `smart_nframes` (uniform sampling). `nframes` (data_config.num_frames) replaces
    the fps rule when set. Raises where the reference raises (fewer than 2 frames)."""
    if nframes is not None:
        n = _round_by(nframes, FRAME_FACTOR)
    else:
        lo = _ceil_by(min_frames, FRAME_FACTOR)
        hi = _floor_by(min(max_frames, total_frames), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = min(max(n, lo), hi)
        n = _round_by(n, FRAME_FACTOR)
    n = min(n, total_frames)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"cannot sample frames: need between {FRAME_FACTOR} and {total_frames} frames, got {n} "
                         f"({total_frames} frames at {video_fps} fps)")
    return int(n)


def sample_frame_indices(total_frames: int, video_fps: float, **kwargs: Any) -> list[int]:
    """Indices of the frames VideoReward looks at: linspace(0, total-1, n).round() in float32.
    A one-frame video gives [0, 0] (the reference raises there)."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    if total_frames == 1:
        return [0, 0]
    n = num_sampled_frames(total_frames, video_fps, **kwargs)
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float32).round().long().tolist()


def smart_resize(height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = 200704) -> tuple[int, int]:
    """VideoAlign's `smart_resize`: sides multiples of `factor`, pixels within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by(height / beta, factor)
        w_bar = _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    if h_bar < factor or w_bar < factor:
        raise ValueError(f"frame {height}x{width} resizes to {h_bar}x{w_bar} under max_pixels {max_pixels}; "
                         f"both sides must be at least {factor}")
    return h_bar, w_bar


def resize_frames(frames: np.ndarray | torch.Tensor, size: tuple[int, int], *, quantize: bool = False,
                  device: torch.device | str | None = None, chunk: int = 16) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, h, w] in 0..255 (not clamped): bicubic with antialias,
    as torchvision's tensor resize on a float tensor (identity when the size already matches).
    `quantize`: clamp to [0, 255] and round, as torchvision does for uint8 input."""
    x = torch.as_tensor(frames)
    out = []
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].to(device=device).permute(0, 3, 1, 2).to(torch.float32)
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        if quantize:
            part = part.clamp(0, 255).round()
        out.append(part)
    return torch.cat(out)


def patchify_video(frames: torch.Tensor, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                   rescale_factor: float = 1 / 255, patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The Qwen2-VL processor's video path on float 0..255 frames [T, C, H, W]: rescale, normalise,
    pad T to the temporal patch by repeating the last frame, and flatten to
    [grid_t * grid_h * grid_w, C * temporal_patch * patch * patch] in merge-window order."""
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frames {h}x{w} must be multiples of patch_size * merge_size = {unit}")
    x = (frames.to(torch.float64) * rescale_factor).to(torch.float32)  # the processor rescales in float64
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    x = (x - m) / s
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ----------------------------------------------------------------------------- checkpoint files


@dataclass(frozen=True)
class VideoRewardFiles:
    """Where the parts of a VideoReward folder are."""

    root: Path
    model_config: Path
    checkpoint_dir: Path
    layout: str  # "full" (model.pth) or "adapter" (adapter_model.safetensors + non_lora_state_dict.pth)
    weights: tuple[Path, ...]
    tokenizer_dir: Path

    @property
    def step(self) -> int:
        return int(self.checkpoint_dir.name.split("-")[-1])


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def locate_checkpoint(root: str | Path, step: int | None = None) -> VideoRewardFiles:
    """Find model_config.json, the newest (or the given) checkpoint-<step>/, its weights and tokenizer."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VideoReward folder {root} does not exist; {LAYOUT_HELP}")
    model_config = root / "model_config.json"
    if not model_config.is_file():
        raise FileNotFoundError(f"{model_config} is missing; {LAYOUT_HELP}")
    ckpts = sorted((d for d in root.glob("checkpoint-*") if d.is_dir() and re.fullmatch(r"checkpoint-\d+", d.name)),
                   key=lambda d: int(d.name.split("-")[-1]))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint-<step>/ folder in {root}; {LAYOUT_HELP}")
    if step is None:
        ckpt = ckpts[-1]
    else:
        named = [d for d in ckpts if int(d.name.split("-")[-1]) == step]
        if not named:
            raise FileNotFoundError(f"{root} has no checkpoint-{step}/ (found {', '.join(d.name for d in ckpts)})")
        ckpt = named[0]
    full, adapter, non_lora = ckpt / "model.pth", ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    if full.is_file():
        layout, weights = "full", (full,)
    elif adapter.is_file() and non_lora.is_file():
        layout, weights = "adapter", (adapter, non_lora)
    else:
        missing = ", ".join(p.name for p in (full, adapter, non_lora) if not p.is_file())
        raise FileNotFoundError(f"{ckpt} holds neither model.pth nor adapter_model.safetensors + "
                                f"non_lora_state_dict.pth (missing: {missing}); {LAYOUT_HELP}")
    candidates = (ckpt / "tokenizer", ckpt, root)
    tok = next((d for d in candidates if _has_tokenizer(d)), None)
    if tok is None:
        raise FileNotFoundError("no tokenizer (tokenizer.json, or vocab.json + merges.txt) in "
                                + ", ".join(str(d) for d in candidates) + f"; {LAYOUT_HELP}")
    return VideoRewardFiles(root, model_config, ckpt, layout, weights, tok)


def find_arch_config(files: VideoRewardFiles, base_dir: Path | None, model_name: str | None) -> tuple[Any, str]:
    """The Qwen2-VL architecture: config.json in checkpoint-<step>/, next to model_config.json or in
    the local base folder; else the built-in Qwen2-VL-2B-Instruct one when the model names it."""
    candidates = [files.checkpoint_dir / "config.json", files.root / "config.json"]
    if base_dir is not None:
        candidates.append(base_dir / "config.json")
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("model_type") != "qwen2_vl":
                raise ValueError(f"{path} describes model_type {data.get('model_type')!r}, expected 'qwen2_vl'")
            return Qwen2VLConfig.from_dict(data), str(path)
    if model_name in QWEN2_VL_2B_NAMES:
        return Qwen2VLConfig.from_dict(QWEN2_VL_2B_INSTRUCT_CONFIG), f"built-in {model_name} architecture"
    raise FileNotFoundError(
        "no Qwen2-VL config.json in " + ", ".join(str(p.parent) for p in candidates)
        + f" and model_config.model_name_or_path ({model_name!r}) is not a known architecture; put the base "
        "model's config.json next to model_config.json or pass base_model=<local Qwen2-VL folder>")


def _read_model_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a JSON object")
    for section in ("data_config", "model_config", "peft_lora_config"):
        if section not in data:
            raise ValueError(f"{path} has no '{section}' section; {LAYOUT_HELP}")
        if not isinstance(data[section], dict):
            raise TypeError(f"{path}: '{section}' must be a JSON object")
    return data


def _normalization_from(inference_config: dict[str, Any] | None, path: Path) -> tuple[Normalization, str]:
    if not inference_config:
        # the reference returns raw rewards when there is no inference_config
        return Normalization(mean={k: 0.0 for k in AXES}, std={k: 1.0 for k in AXES}), "identity (no inference_config)"
    try:
        mean = {k: float(inference_config[f"{k}_mean"]) for k in AXES}
        std = {k: float(inference_config[f"{k}_std"]) for k in AXES}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: inference_config needs numeric VQ/MQ/TA _mean and _std ({e})") from e
    if any(not v > 0 for v in std.values()):
        raise ValueError(f"{path}: inference_config stds must be > 0, got {std}")
    return Normalization(mean=mean, std=std), "inference_config"


# ----------------------------------------------------------------------------- state dicts


def _net_key(key: str) -> str | None:
    """Checkpoint key (VideoAlign under transformers 4.45, peft-wrapped or not, or a transformers 5
    Qwen2-VL layout) -> key of `VideoRewardNet`; None for weights the reward model does not use."""
    for prefix in ("module.", "base_model.model."):
        key = key.removeprefix(prefix)
    key = key.replace(".base_layer.", ".")
    if key.startswith("model.language_model."):
        return "language_model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    if key.startswith("model."):
        return "language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return None  # tied to the embeddings; the reward model has no use for it
    return key


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def _load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"base model folder {folder} has no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def merge_lora_state_dict(sd: dict[str, torch.Tensor], *, r: int, alpha: float, use_rslora: bool = False,
                          dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Fold peft LoRA pairs into their base weights (core.model.lora: W += scale * B @ A, scale alpha / r or
    alpha / sqrt(r) with rsLoRA, summed in float32, cast to `dtype`). Keys are returned in the `VideoRewardNet`
    naming; `lm_head` and peft's `original_module` copies are dropped, `modules_to_save` copies replace their
    originals. Returns (state dict, merged module count)."""
    plain: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if is_lora_key(key) or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            head, _, tail = key.partition(".modules_to_save.")
            target = _net_key(head + "." + tail.split(".", 1)[1])
            if target is not None:
                saved[target] = value
            continue
        target = _net_key(key)
        if target is not None:
            plain[target] = value
    plain.update(saved)
    lora = {k: v for k, v in sd.items() if is_lora_key(k)}
    if not lora:
        return plain, 0
    pairs = lora_pairs(lora, "the VideoReward checkpoint", _net_module)
    scale = lora_scale(alpha, r, use_rslora)
    for module, (a, b) in pairs.items():
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"LoRA rank of {module} is {a.shape[0]}, but peft_lora_config.lora_r is {r}")
        wkey = module + ".weight"
        if wkey not in plain:
            raise ValueError(f"LoRA weights for {module} but no base weight {wkey} in the checkpoint")
        plain[wkey] = folded(plain[wkey], a, b, scale, dtype)
    return plain, len(pairs)


def _net_module(name: str) -> str | None:
    """`_net_key` for a module name (None: a module the reward model does not use)."""
    key = _net_key(name + ".weight")
    return None if key is None else key[: -len(".weight")]


# ----------------------------------------------------------------------------- model


def _match_reference_rope_precision(net: VideoRewardNet, dtype: torch.dtype) -> None:
    """VideoAlign casts the whole model with `.to(dtype)` (RoPE frequency buffers included) and
    builds the vision RoPE angle table and its cos/sin in that dtype. Reproduce that rounding in
    half precision (a no-op in float32)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return
    for rot in (net.language_model.rotary_emb, net.visual.rotary_pos_emb):
        for name in ("inv_freq", "original_inv_freq"):
            buf = getattr(rot, name, None)
            if isinstance(buf, torch.Tensor):
                setattr(rot, name, buf.to(dtype).to(buf.dtype))
    vis_rot = net.visual.rotary_pos_emb

    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (position_ids[..., None].to(dtype) * vis_rot.inv_freq.to(device=x.device, dtype=dtype))
        cos, sin = freqs.cos().float(), freqs.sin().float()
        return vis_rot.recomposition_frequencies(cos), vis_rot.recomposition_frequencies(sin)

    vis_rot.forward = forward


class VideoRewardNet(nn.Module):
    """Qwen2-VL vision tower + language model (no LM head) + `rm_head`, read at the reward tokens."""

    def __init__(self, config: Any, output_dim: int, attn_implementation: str = "sdpa"):
        super().__init__()

        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(
            config.vision_config, attn_implementation=attn_implementation)
        self.language_model = Qwen2VLTextModel._from_config(config.text_config, attn_implementation=attn_implementation)
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        self.output_dim = output_dim
        self.video_token_id = int(config.video_token_id)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                      video_grid_thw: torch.Tensor) -> torch.Tensor:
        """Final-layer (normed) hidden states [B, L, D] with sequential positions, as VideoAlign."""
        embeds = self.language_model.embed_tokens(input_ids)
        vis = self.visual(pixel_values_videos.to(self.rm_head.weight.dtype), grid_thw=video_grid_thw)
        feats = vis if isinstance(vis, torch.Tensor) else vis.pooler_output
        mask = input_ids == self.video_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} video tokens in the text but {feats.shape[0]} video features")
        embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))
        b, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, b, length)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                video_grid_thw: torch.Tensor, reward_positions: torch.Tensor) -> torch.Tensor:
        """Raw rewards [B, 3] (VQ, MQ, TA) in float32."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values_videos, video_grid_thw)
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        logits = self.rm_head(hidden[rows, reward_positions])  # [B, 3, output_dim]
        logits = logits[..., 0] if self.output_dim == 1 else logits.diagonal(dim1=1, dim2=2)
        return logits.float()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- backend


class VideoRewardBackend:
    """VideoReward scores (raw and z-normalised VQ/MQ/TA) for batches of uint8 videos.

    `checkpoint`: the local release folder (see `LAYOUT_HELP`). `step`: a checkpoint-<step>/ to use
    (default: the newest). `base_model`: a local Qwen2-VL folder, needed only for the
    adapter layout (base weights) or when no config.json is stored with the checkpoint and the
    model is not Qwen2-VL-2B-Instruct. `min_pixels` / `max_pixels` override the per-frame pixel range
    (default 128*28*28 and data_config.max_frame_pixels). `quantize_resized`: round and clamp the
    resized frames as VideoAlign's uint8 file reader does. `micro_batch_size`: split larger batches.
    """

    name = BACKEND_NAME

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "bfloat16", step: int | None = None, base_model: str | Path | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, quantize_resized: bool = False,
                 micro_batch_size: int | None = None, attn_implementation: str = "sdpa"):
        self.files = locate_checkpoint(checkpoint, step)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.quantize_resized = bool(quantize_resized)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        self.micro_batch_size = micro_batch_size
        self.base_model = Path(base_model) if base_model is not None else None

        cfg = _read_model_config(self.files.model_config)
        self.model_config_sha256 = _sha256(self.files.model_config)
        self.data_config = {**DATA_CONFIG_DEFAULTS, **cfg["data_config"]}
        self.model_cfg = dict(cfg["model_config"])
        self.lora_cfg = dict(cfg["peft_lora_config"])
        self.normalization, self.normalization_source = _normalization_from(cfg.get("inference_config"),
                                                                            self.files.model_config)
        self._check_supported()

        self.fps = float(self.data_config["fps"])
        self.num_frames = self.data_config.get("num_frames")
        self.min_pixels = int(min_pixels if min_pixels is not None else VIDEO_MIN_PIXELS)
        self.max_pixels = int(max_pixels if max_pixels is not None else self.data_config["max_frame_pixels"])
        if self.min_pixels <= 0 or self.max_pixels <= 0:  # min > max is allowed, as in the reference's rule
            raise ValueError(f"min_pixels ({self.min_pixels}) and max_pixels ({self.max_pixels}) must be > 0")

        self.tokenizer = self._load_tokenizer()
        self.arch_config, self.arch_source = self._load_arch_config()
        self._load_preprocessor_config()
        self.net = self._build_model(attn_implementation)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: VideoRewardConfig, **kwargs: Any) -> VideoRewardBackend:
        """From the `reward:` section (checkpoint, device, dtype)."""
        return cls(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, **kwargs)

    def _check_supported(self) -> None:
        path = self.files.model_config
        tmpl = self.data_config.get("prompt_template_type")
        if tmpl != "detailed_special":
            raise ValueError(f"{path}: data_config.prompt_template_type is {tmpl!r}; this backend implements the "
                             "released VideoReward configuration ('detailed_special', special reward tokens)")
        if self.data_config.get("sample_type", "uniform") != "uniform":
            raise ValueError(f"{path}: data_config.sample_type {self.data_config.get('sample_type')!r} is not "
                             "supported (only 'uniform')")
        if not self.model_cfg.get("use_special_tokens", False):
            raise ValueError(f"{path}: model_config.use_special_tokens must be true (reward read at special tokens)")
        self.output_dim = int(self.model_cfg.get("output_dim", 1))
        if self.output_dim not in (1, 3):
            raise ValueError(f"{path}: model_config.output_dim must be 1 or 3, got {self.output_dim}")

    def _load_tokenizer(self) -> Any:

        folder = self.files.tokenizer_dir
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # re-raised with the folder named
            raise ValueError(f"cannot load the tokenizer from {folder}: {e}") from e
        tok.padding_side = "right"
        ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        if any(i is None or i == tok.unk_token_id for i in ids):
            # as VideoAlign does when it builds the processor from the base model
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
            self.added_special_tokens = True
        else:
            self.added_special_tokens = False
        self.special_token_ids = tuple(int(i) for i in tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        if len(set(self.special_token_ids)) != 3:
            raise ValueError(f"tokenizer in {folder} maps the reward tokens to {self.special_token_ids}")
        video_id = tok.convert_tokens_to_ids(VIDEO_TOKEN)
        if video_id is None or video_id == tok.unk_token_id:
            raise ValueError(f"tokenizer in {folder} has no {VIDEO_TOKEN} token (not a Qwen2-VL tokenizer)")
        self.video_token_id = int(video_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        return tok

    def _base_model_dir(self) -> Path | None:
        if self.base_model is not None:
            if not self.base_model.is_dir():
                raise FileNotFoundError(f"base model folder {self.base_model} does not exist")
            return self.base_model
        name = self.model_cfg.get("model_name_or_path")
        if name and Path(name).is_dir():
            return Path(name)
        return None

    def _load_arch_config(self) -> tuple[Any, str]:
        return find_arch_config(self.files, self._base_model_dir(), self.model_cfg.get("model_name_or_path"))

    def _load_preprocessor_config(self) -> None:
        vc = self.arch_config.vision_config
        self.patch_size = int(vc.patch_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        self.merge_size = int(vc.spatial_merge_size)
        self.factor = IMAGE_FACTOR
        if self.patch_size * self.merge_size != IMAGE_FACTOR:
            raise ValueError(f"vision patch_size * spatial_merge_size is {self.patch_size * self.merge_size}; "
                             f"VideoAlign resizes to multiples of {IMAGE_FACTOR}")
        self.image_mean, self.image_std, self.rescale_factor = CLIP_MEAN, CLIP_STD, 1 / 255
        self.preprocessor_source = "Qwen2-VL defaults"
        base = self._base_model_dir()
        for folder in (self.files.checkpoint_dir, self.files.tokenizer_dir, self.files.root, base):
            path = folder / "preprocessor_config.json" if folder is not None else None
            if path is not None and path.is_file():
                pc = json.loads(path.read_text())
                self.image_mean = tuple(float(v) for v in pc.get("image_mean", CLIP_MEAN))
                self.image_std = tuple(float(v) for v in pc.get("image_std", CLIP_STD))
                self.rescale_factor = float(pc.get("rescale_factor", 1 / 255))
                for key, have in (("patch_size", self.patch_size), ("temporal_patch_size", self.temporal_patch_size),
                                  ("merge_size", self.merge_size)):
                    if key in pc and int(pc[key]) != have:
                        raise ValueError(f"{path}: {key} {pc[key]} disagrees with the vision config ({have})")
                self.preprocessor_source = str(path)
                break

    def _raw_state_dict(self) -> tuple[dict[str, torch.Tensor], str]:
        files = self.files
        if files.layout == "full":
            return _load_torch_file(files.weights[0]), str(files.weights[0])
        base = self._base_model_dir()
        if base is None:
            raise FileNotFoundError(
                f"{files.checkpoint_dir} holds LoRA adapter weights only; the base Qwen2-VL weights must come "
                f"from a local folder: pass base_model=<folder> or set model_config.model_name_or_path to it")
        sd = _load_safetensors_folder(base)
        embed_keys = [k for k in sd if _net_key(k) == "language_model.embed_tokens.weight"]
        non_lora = _load_torch_file(files.weights[1])
        if not any(_net_key(k) == "language_model.embed_tokens.weight" for k in non_lora):
            # the reference resizes the base embeddings to the tokenizer (the kept rows are the base rows)
            n = len(self.tokenizer)
            for k in embed_keys:
                if sd[k].shape[0] < n:
                    raise ValueError(f"base embeddings have {sd[k].shape[0]} rows, the tokenizer {n} tokens, and "
                                     f"{files.weights[1].name} holds no embed_tokens")
                sd[k] = sd[k][:n]
        sd.update(non_lora)
        sd.update(load_file(str(files.weights[0])))
        return sd, f"{files.weights[0]} + {files.weights[1].name} + base {base}"

    def _build_model(self, attn_implementation: str) -> VideoRewardNet:
        raw, source = self._raw_state_dict()
        lora_enabled = bool(self.lora_cfg.get("lora_enable", False))
        has_lora = any(is_lora_key(k) for k in raw)
        if has_lora and not lora_enabled:
            raise ValueError(f"{source} holds LoRA weights but peft_lora_config.lora_enable is false")
        r = int(self.lora_cfg.get("lora_r", 16))
        alpha = float(self.lora_cfg.get("lora_alpha", 32))
        rslora = bool(self.lora_cfg.get("use_rslora", False))
        state, self.merged_modules = merge_lora_state_dict(raw, r=r, alpha=alpha, use_rslora=rslora, dtype=self.dtype)
        del raw
        self.lora_summary = {"enabled": lora_enabled, "r": r, "alpha": alpha, "use_rslora": rslora,
                             "scale": lora_scale(alpha, r, rslora), "merged_modules": self.merged_modules}

        cfg = self.arch_config
        embed = state.get("language_model.embed_tokens.weight")
        vocab = int(embed.shape[0]) if embed is not None else len(self.tokenizer)
        cfg.text_config.vocab_size = vocab
        cfg.vocab_size = vocab
        used = (*self.special_token_ids, self.video_token_id, self.pad_token_id)
        if max(used) >= vocab:
            raise ValueError(f"token id {max(used)} is outside the {vocab}-row embedding of {source} "
                             f"(tokenizer in {self.files.tokenizer_dir} does not belong to these weights)")
        if int(cfg.video_token_id) != self.video_token_id:
            raise ValueError(f"{self.arch_source}: video_token_id {cfg.video_token_id} but the tokenizer maps "
                             f"{VIDEO_TOKEN} to {self.video_token_id}")

        with no_init_weights(), torch.device(self.device):
            net = VideoRewardNet(cfg, self.output_dim, attn_implementation=attn_implementation)
        net.to(dtype=self.dtype)
        report = mismatch_report({k: v.shape for k, v in net.state_dict().items()}, state)
        if report:
            raise ValueError(f"state dict from {source} does not match the VideoReward model:\n  {report}")
        net.load_state_dict(state, strict=True)
        del state
        _match_reference_rope_precision(net, self.dtype)
        return net.eval().requires_grad_(False)

    # ------------------------------------------------------------------ preprocessing

    def sample(self, video: VideoInput) -> tuple[list[int], tuple[int, int]]:
        """Frame indices and the resized (height, width) for one video."""
        t, h, w = video.frames.shape[:3]
        nframes = int(self.num_frames) if self.num_frames is not None else None
        idx = sample_frame_indices(t, float(video.fps), fps=self.fps, nframes=nframes)
        size = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return idx, size

    def preprocess_video(self, video: VideoInput) -> tuple[torch.Tensor, SamplingInfo]:
        """Sampled, resized float frames [n, 3, h, w] in 0..255 and how they were taken."""
        idx, size = self.sample(video)
        frames = resize_frames(video.frames[idx], size, quantize=self.quantize_resized, device=self.device)
        info = SamplingInfo(source_fps=float(video.fps), source_frames=int(video.frames.shape[0]),
                            frames_used=len(idx), resized_hw=(int(size[0]), int(size[1])))
        return frames, info

    def _token_ids(self, prompt: str, n_video_tokens: int) -> list[int]:
        text = render_chat(build_prompt(prompt))
        ids = list(self.tokenizer(text)["input_ids"])
        counts = {t: ids.count(i) for t, i in zip((VIDEO_TOKEN, *SPECIAL_TOKENS), (self.video_token_id, *self.special_token_ids))}
        if any(c != 1 for c in counts.values()):
            bad = [t for t, c in counts.items() if c != 1]
            raise ValueError(f"prompt {prompt[:80]!r} produces {', '.join(bad)} more than once (prompts must not "
                             "contain the model's special tokens)")
        at = ids.index(self.video_token_id)
        return ids[:at] + [self.video_token_id] * n_video_tokens + ids[at + 1:]

    def prepare_batch(self, videos: Sequence[VideoInput]) -> tuple[dict[str, torch.Tensor], list[SamplingInfo]]:
        """Model inputs for a batch (right-padded) and each video's SamplingInfo."""
        patches, grids, seqs, infos = [], [], [], []
        for v in videos:
            frames, info = self.preprocess_video(v)
            p, grid = patchify_video(frames, mean=self.image_mean, std=self.image_std,
                                     rescale_factor=self.rescale_factor, patch_size=self.patch_size,
                                     temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size)
            n_tokens = grid[0] * grid[1] * grid[2] // self.merge_size ** 2
            seqs.append(self._token_ids(v.prompt, n_tokens))
            patches.append(p)
            grids.append(grid)
            infos.append(info)
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        positions = torch.empty((len(seqs), 3), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            attention_mask[i, :len(s)] = 1
            positions[i] = torch.tensor([s.index(t) for t in self.special_token_ids])
        batch = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pixel_values_videos": torch.cat(patches).to(self.device),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
            "reward_positions": positions.to(self.device),
        }
        return batch, infos

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def raw_rewards(self, videos: Sequence[VideoInput]) -> tuple[torch.Tensor, list[SamplingInfo]]:
        """Raw (un-normalised) [B, 3] rewards in the order VQ, MQ, TA, and the sampling records."""
        batch, infos = self.prepare_batch(videos)
        return self.net(**batch).cpu(), infos

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        if not videos:
            return []
        step = self.micro_batch_size or len(videos)
        scores: list[RewardScore] = []
        for start in range(0, len(videos), step):
            raw, infos = self.raw_rewards(videos[start:start + step])
            for i, (row, info) in enumerate(zip(raw.tolist(), infos)):
                if not all(math.isfinite(x) for x in row):
                    raise FloatingPointError(f"VideoReward returned a non-finite reward {row} for video {start + i}")
                scores.append(RewardScore.from_raw(dict(zip(AXES, row)), self.normalization, info))
        return scores

    def info(self) -> dict:
        f = self.files
        return {
            "backend": self.name,
            "checkpoint": {
                "path": str(f.root),
                "checkpoint_dir": f.checkpoint_dir.name,
                "identity": f"{f.checkpoint_dir.name}@{self.model_config_sha256[:12]}",
                "model_config_sha256": self.model_config_sha256,
                "layout": f.layout,
                "weights": [str(p) for p in f.weights],
                "tokenizer": str(f.tokenizer_dir),
                "architecture": self.arch_source,
                "preprocessor": self.preprocessor_source,
            },
            "model": {
                "base": self.model_cfg.get("model_name_or_path"),
                "output_dim": self.output_dim,
                "special_tokens": dict(zip(SPECIAL_TOKENS, self.special_token_ids)),
                "lora": {**self.lora_summary, "merged_at_load": True},
                "positions": "sequential (as VideoAlign's reward forward)",
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
            },
            "normalization": {"mean": dict(self.normalization.mean), "std": dict(self.normalization.std),
                              "source": self.normalization_source, "overall": "VQ + MQ + TA (normalised)"},
            "sampling": {
                "fps": self.fps, "num_frames": self.num_frames, "min_frames": FPS_MIN_FRAMES,
                "max_frames": FPS_MAX_FRAMES, "frame_factor": FRAME_FACTOR,
                "indices": "linspace(0, total-1, n).round()",
                "resize": {"factor": self.factor, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                           "interpolation": "bicubic, antialias",
                           "values": ("float 0..255, clamped and rounded (uint8 reader)" if self.quantize_resized
                                      else "float 0..255, not clamped")},
                "input": "uint8 RGB [T, H, W, 3] in [0, 255]",
                "rescale_factor": self.rescale_factor, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                "patch": {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                          "merge_size": self.merge_size},
            },
            "prompt": {"template": "detailed_special",
                       "template_sha256": hashlib.sha256(DETAILED_SPECIAL_TEMPLATE.encode()).hexdigest(),
                       "chat": "qwen2-vl (system turn, video before text, generation prompt)", "padding": "right"},
        }


__all__ = [
    "BACKEND_NAME", "DETAILED_SPECIAL_TEMPLATE", "RELEASE_NORMALIZATION", "SPECIAL_TOKENS", "VideoRewardBackend",
    "VideoRewardFiles", "VideoRewardNet", "build_prompt", "find_arch_config", "locate_checkpoint", "merge_lora_state_dict",
    "num_sampled_frames", "patchify_video", "render_chat", "resize_frames", "sample_frame_indices", "smart_resize",
]
