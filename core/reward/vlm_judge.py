"""VLMJudge: a vision-language model asked a rubric through vLLM (backend "vlm_judge").

Any chat VLM that vLLM serves with multi-image input (Qwen2-VL / Qwen2.5-VL, InternVL, LLaVA-
OneVision, ...) can judge. Per video:

1. `judge_frame_indices`: `reward.max_frames` (8) frames evenly spaced over the whole clip,
   first and last included (indices round(linspace(0, T-1, n)), n = min(T, reward.max_frames)).
2. `resize_for_judge`: each frame shrunk (bicubic, aspect kept) so its long side is at most
   `max_side` (512) px, never enlarged; encoded as lossless PNG data URLs.
3. `build_messages`: one user turn, the frames first as images in time order, then the rubric
   text of `build_judge_prompt` (the generation prompt is embedded JSON-quoted, so it cannot
   break out of its quotes). vLLM's `LLM.chat` applies the model's own chat template, which
   inserts each model's image placeholders: no per-model prompt format lives here.
4. Generation is greedy (temperature 0) and constrained to `JUDGE_JSON_SCHEMA` with vLLM
   structured outputs: `SamplingParams(structured_outputs=StructuredOutputsParams(json=...))`
   on current vLLM, `SamplingParams(guided_decoding=GuidedDecodingParams(json=...))` on the
   older API (the `guided_*` names were removed in vLLM 0.12); with neither the rubric still
   asks for JSON and the parser below stays strict.
5. `parse_judge_output`: the JSON object {"visual_quality", "motion_quality", "text_alignment":
   integers 1-10, "reason": text} -> raw VQ, MQ, TA. Malformed output (not JSON, missing keys,
   non-numbers, out of range) raises `JudgeOutputError` naming the video and quoting the text:
   a failed score is never replaced by a made-up one.
6. Normalisation with `JUDGE_NORMALIZATION`: (score - 5.5) / 2.5 per axis. 5.5 is the middle of
   the 1-10 scale; a uniform 1-10 score has std 2.87, and judges rarely use the extremes, so 2.5
   puts "good" (8) at +1 and "poor" (3) at -1. Calibrate per judge model for serious use.

The model is loaded from the LOCAL folder `reward.checkpoint` (it must exist and hold
`config.json`; HF_HUB_OFFLINE=1 is set unless the environment sets it), never from a hub.

vLLM is the optional `vllm` extra. This module imports without it; constructing `VLMJudge`
without it raises RuntimeError saying how to install it or to use reward.backend=motion. The
pure parts (frame sampling, resizing, prompt, schema, parsing, normalisation) need no vLLM and
are tested; the engine is a small object with `generate(conversations) -> texts`, so tests
drive `score_batch` end to end with a fake engine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from core.config import ConfigError, VLMJudgeConfig
from core.reward.base import AXES, Normalization, RewardScore, SamplingInfo, VideoInput

logger = logging.getLogger(__name__)

PROMPT_VERSION = "judge-rubric-v1"
SCORE_KEYS = {"VQ": "visual_quality", "MQ": "motion_quality", "TA": "text_alignment"}
SCORE_MIN, SCORE_MAX = 1, 10
REASON_MAX_CHARS = 400

JUDGE_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{key: {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX} for key in SCORE_KEYS.values()},
        "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
    },
    "required": [*SCORE_KEYS.values(), "reason"],
    "additionalProperties": False,
}

JUDGE_NORMALIZATION = Normalization(mean={k: 5.5 for k in AXES}, std={k: 2.5 for k in AXES})

INSTALL_HINT = ("install it with `pip install -e '.[vllm]'` on a CUDA machine, or use the pixel scorer "
                "with reward.backend=motion")

_RUBRIC = """\
You are a strict judge of AI-generated videos. The {n} images above are frames sampled evenly \
from one {duration} video ({fps} fps), shown in time order at t = {times}. The video was \
generated from this text prompt (a quoted JSON string):
{prompt}

Rate the video on three axes, each an integer from 1 (very poor) to 10 (excellent):
- visual_quality: image quality of the frames: sharpness, detail, clean textures and colours; \
no noise, blur, compression artifacts, distorted shapes or washed-out or clipped colours. \
Ignore motion and the prompt.
- motion_quality: quality of the motion across frames: the scene moves where it should, \
smoothly and plausibly; objects keep their shape and identity; no flicker, jitter, sudden jumps, \
morphing or frozen video. Ignore the prompt.
- text_alignment: how well the content matches the prompt: subjects, attributes, counts, \
actions, setting and style.
Anchors for every axis: 1-2 broken or unrecognisable, 3-4 poor, 5-6 acceptable with clear flaws, \
7-8 good with minor flaws, 9-10 excellent.

Answer with one JSON object and nothing else, in this form:
{{"visual_quality": <1-10>, "motion_quality": <1-10>, "text_alignment": <1-10>, "reason": "<one or two sentences>"}}"""

PROMPT_SHA = hashlib.sha256((_RUBRIC + json.dumps(JUDGE_JSON_SCHEMA, sort_keys=True)).encode()).hexdigest()[:12]


class JudgeOutputError(ValueError):
    """The judge model's answer is not the JSON the rubric asks for; the message quotes it."""


# ----------------------------------------------------------------------------- pure parts


def judge_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """n = min(T, max_frames) indices evenly spaced over [0, T-1] (first and last included)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_frames < 1:
        raise ValueError(f"judge_max_frames must be >= 1, got {max_frames}")
    n = min(num_frames, max_frames)
    return np.floor(np.linspace(0, num_frames - 1, n) + 0.5).astype(np.int64)


def judge_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the long side at most max_side, aspect kept, never enlarged."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_for_judge(frame: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] (bicubic, PIL), long side <= max_side."""
    h, w = judge_size(frame.shape[0], frame.shape[1], max_side)
    if (h, w) == frame.shape[:2]:
        return frame
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC))


def frame_data_url(frame: np.ndarray) -> str:
    """Lossless PNG data URL of one uint8 [H, W, 3] frame (what vLLM's chat `image_url` takes)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_judge_prompt(prompt: str, *, num_frames: int, fps: float, source_frames: int,
                       times: list[float]) -> str:
    """The rubric text that follows the frames in the user turn."""
    duration = source_frames / fps
    return _RUBRIC.format(n=num_frames, duration=f"{duration:.1f}-second", fps=f"{fps:g}",
                          times=", ".join(f"{t:.2f} s" for t in times),
                          prompt=json.dumps(prompt, ensure_ascii=False))


def build_messages(video: VideoInput, max_frames: int, max_side: int) -> tuple[list[dict], SamplingInfo]:
    """One chat conversation (OpenAI message format, as `LLM.chat` takes it) and how the video was sampled."""
    idx = judge_frame_indices(video.frames.shape[0], max_frames)
    frames = [resize_for_judge(video.frames[i], max_side) for i in idx]
    content: list[dict] = [{"type": "image_url", "image_url": {"url": frame_data_url(f)}} for f in frames]
    text = build_judge_prompt(video.prompt, num_frames=len(idx), fps=video.fps,
                              source_frames=video.frames.shape[0], times=[float(i) / video.fps for i in idx])
    content.append({"type": "text", "text": text})
    sampling = SamplingInfo(source_fps=float(video.fps), source_frames=int(video.frames.shape[0]),
                            frames_used=len(idx), resized_hw=tuple(int(s) for s in frames[0].shape[:2]))
    return [{"role": "user", "content": content}], sampling


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def _quote(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _score_value(obj: dict, key: str, text: str) -> float:
    value = obj[key]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JudgeOutputError(f"{key!r} is not a number ({value!r}) in {_quote(text)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JudgeOutputError(f"{key!r} must be a number from {SCORE_MIN} to {SCORE_MAX}, got {value!r} in {_quote(text)}")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise JudgeOutputError(f"{key!r} = {value} is outside {SCORE_MIN}..{SCORE_MAX} in {_quote(text)}")
    return float(value)


def parse_judge_output(text: str) -> tuple[dict[str, float], str]:
    """The judge's answer -> (raw {"VQ", "MQ", "TA"}, reason); JudgeOutputError when malformed.

    Accepts the bare JSON object, optionally inside a ``` fence or with text around it (models
    asked without structured outputs do that); everything else is an error that quotes the text.
    """
    if not isinstance(text, str):
        raise JudgeOutputError(f"expected the judge's text, got {type(text).__name__}")
    body = text.strip()
    if not body:
        raise JudgeOutputError("the judge returned empty text (did generation stop at max_new_tokens 0 or a stop token?)")
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        obj = None
        if 0 <= start < end:
            try:
                obj = json.loads(body[start:end + 1])
            except json.JSONDecodeError:
                pass
        if obj is None:
            hint = " (truncated? raise reward.max_new_tokens)" if start >= 0 and end < start else ""
            raise JudgeOutputError(f"the judge's output is not a JSON object{hint}: {_quote(text)}") from None
    if not isinstance(obj, dict):
        raise JudgeOutputError(f"the judge's output is JSON but not an object: {_quote(text)}")
    missing = [k for k in SCORE_KEYS.values() if k not in obj]
    if missing:
        raise JudgeOutputError(f"the judge's output lacks {', '.join(map(repr, missing))}: {_quote(text)}")
    raw = {axis: _score_value(obj, key, text) for axis, key in SCORE_KEYS.items()}
    reason = obj.get("reason", "")
    return raw, reason if isinstance(reason, str) else json.dumps(reason)


def check_model_folder(checkpoint: str | os.PathLike | None) -> Path:
    """The judge's local model folder, or ConfigError saying what is wrong (nothing is downloaded)."""
    if not checkpoint:
        raise ConfigError("reward.backend 'vlm_judge' needs reward.checkpoint: a local model folder "
                          "(a Hugging Face model directory with config.json; fetch it beforehand)")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise ConfigError(f"reward.checkpoint {str(checkpoint)!r} is not a local folder (the judge loads only "
                          "local model folders, nothing is downloaded at run time; fetch it first, e.g. "
                          "`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR`)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"reward.checkpoint {str(path)!r} holds no config.json: not a Hugging Face model folder")
    return path.resolve()


# ----------------------------------------------------------------------------- the engine


class JudgeEngine(Protocol):
    structured_output: str

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """One text answer per conversation, in order."""
        ...


def _import_vllm():
    try:
        from vllm import LLM, SamplingParams  # optional: the vllm extra, needed only by this backend
    except ImportError as e:
        raise RuntimeError(f"reward.backend 'vlm_judge' needs vLLM, which is not importable here ({e}); "
                           f"{INSTALL_HINT}") from e
    return LLM, SamplingParams


def judge_sampling_params(SamplingParams, max_new_tokens: int) -> tuple[Any, str]:
    """Greedy SamplingParams constrained to JUDGE_JSON_SCHEMA with the structured-output API this
    vLLM has: (params, which API)."""
    common = {"temperature": 0.0, "max_tokens": max_new_tokens}
    try:
        from vllm.sampling_params import StructuredOutputsParams  # optional: vllm extra, newer releases
    except ImportError:
        pass
    else:
        return SamplingParams(**common, structured_outputs=StructuredOutputsParams(json=JUDGE_JSON_SCHEMA)), \
            "structured_outputs"
    try:
        from vllm.sampling_params import GuidedDecodingParams  # optional: vllm extra, older releases
    except ImportError:
        pass
    else:
        return SamplingParams(**common, guided_decoding=GuidedDecodingParams(json=JUDGE_JSON_SCHEMA)), "guided_decoding"
    logger.warning("this vLLM has no structured-output API; the judge is asked for JSON by the prompt only")
    return SamplingParams(**common), "none"


class VLLMEngine:
    """vllm.LLM over a local model folder; greedy, JSON-constrained chat generation."""

    def __init__(self, model_dir: Path, *, max_images: int, max_new_tokens: int, dtype: str, seed: int = 0,
                 **llm_kwargs):
        LLM, SamplingParams = _import_vllm()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub; never fall back to it
        kwargs = {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": dtype, "seed": seed,
                  "limit_mm_per_prompt": {"image": max_images}}
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.sampling_params, self.structured_output = judge_sampling_params(SamplingParams, max_new_tokens)

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        outputs = self.llm.chat(conversations, sampling_params=self.sampling_params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


# ----------------------------------------------------------------------------- the backend


class VLMJudge:
    """Rubric scores from a local VLM through vLLM (see the module docstring)."""

    name = "vlm_judge"

    def __init__(self, checkpoint: str | os.PathLike, *, max_frames: int = 8, max_new_tokens: int = 256,
                 dtype: str = "bfloat16", max_side: int = 512, seed: int = 0,
                 normalization: Normalization = JUDGE_NORMALIZATION, engine: JudgeEngine | None = None,
                 **llm_kwargs):
        if max_frames < 1:
            raise ConfigError(f"reward.max_frames must be >= 1, got {max_frames}")
        if max_new_tokens < 32:
            raise ConfigError(f"reward.max_new_tokens must be >= 32 to hold the JSON answer, got {max_new_tokens}")
        if max_side < 28:
            raise ConfigError(f"max_side must be >= 28 px, got {max_side}")
        self.checkpoint = check_model_folder(checkpoint)
        self.max_frames, self.max_new_tokens, self.dtype = max_frames, max_new_tokens, dtype
        self.max_side, self.seed, self.normalization = max_side, seed, normalization
        if engine is None:
            engine = VLLMEngine(self.checkpoint, max_images=max_frames, max_new_tokens=max_new_tokens,
                                dtype=dtype, seed=seed, **llm_kwargs)
        self.engine = engine

    @classmethod
    def from_config(cls, cfg: VLMJudgeConfig, **kwargs) -> VLMJudge:
        """From the `reward:` section (checkpoint, dtype, max_frames, max_new_tokens)."""
        return cls(cfg.checkpoint, max_frames=cfg.max_frames, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                   **kwargs)

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        if not videos:
            return []
        built = [build_messages(v, self.max_frames, self.max_side) for v in videos]
        texts = self.engine.generate([messages for messages, _ in built])
        if len(texts) != len(videos):
            raise RuntimeError(f"the judge engine returned {len(texts)} answers for {len(videos)} videos")
        scores, errors = [], []
        for i, (text, (_, sampling)) in enumerate(zip(texts, built)):
            try:
                raw, reason = parse_judge_output(text)
            except JudgeOutputError as e:
                errors.append(f"video {i}: {e}")
                continue
            logger.debug("judge video %d: %s (%s)", i, raw, reason)
            scores.append(RewardScore.from_raw(raw, self.normalization, sampling,
                                               {f"judge_{SCORE_KEYS[a]}": raw[a] for a in AXES}))
        if errors:
            raise JudgeOutputError(f"{len(errors)} of {len(videos)} judge answers are malformed "
                                   "(no score is made up for them):\n  " + "\n  ".join(errors))
        return scores

    def info(self) -> dict:
        return {
            "backend": self.name,
            "checkpoint": str(self.checkpoint),
            "prompt_version": PROMPT_VERSION,
            "prompt_sha256": PROMPT_SHA,
            "structured_output": getattr(self.engine, "structured_output", "unknown"),
            "output_schema": JUDGE_JSON_SCHEMA,
            "axes": {a: f"{SCORE_KEYS[a]} ({SCORE_MIN}-{SCORE_MAX})" for a in AXES},
            "normalization": {"mean": dict(self.normalization.mean), "std": dict(self.normalization.std)},
            "sampling": {"frames": "evenly spaced over the clip, first and last included",
                         "max_frames": self.max_frames, "max_side": self.max_side, "resample": "bicubic",
                         "encoding": "png", "decoding": "greedy", "max_new_tokens": self.max_new_tokens},
            "dtype": self.dtype,
        }
