"""A tiny VideoReward (VideoAlign) release written the way the real one is laid out, for the backend's tests
and the reward-service benchmark: a random tiny Qwen2-VL with VideoAlign's attribute names (`RefRewardModel`,
also the reference forward the backend is checked against), wrapped by the real `peft` with non-zero LoRA
weights, saved as model_config.json + checkpoint-<step>/model.pth with a word-level tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

from core.reward.videoreward import DETAILED_SPECIAL_TEMPLATE, SPECIAL_TOKENS

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
LORA_EXCLUDE = ["lm_head", "rm_head", "embed_tokens", "visual"]
MIN_PIXELS = 28 * 28 * 2  # test-size frames; the release uses 128*28*28
MAX_FRAME_PIXELS = 56 * 84
STEP = 7
# The release's inference_config, in numbers of this fixture's own: neither the real release's (the backend's
# RELEASE_NORMALIZATION) nor the identity it falls back to without one, so a test can tell they were read.
INFERENCE_CONFIG = {"VQ_mean": 0.8125, "VQ_std": 1.75, "MQ_mean": -0.4375, "MQ_std": 0.625,
                    "TA_mean": 1.5625, "TA_std": 3.25}


def make_tokenizer():
    texts = [DETAILED_SPECIAL_TEMPLATE, "system You are a helpful assistant. user assistant",
             "a red circle moves left across a blue background; the camera pans slowly"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def tiny_qwen2_vl_config(tok) -> dict:
    """A tiny Qwen2-VL config.json in the flat layout transformers 4.45 saved (what VideoAlign stored)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_position_embeddings": 4096,
        "vocab_size": len(tok), "tie_word_embeddings": True, "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2,
                          "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14, "temporal_patch_size": 2,
                          "spatial_merge_size": 2, "hidden_act": "quick_gelu"},
    }


class RefRewardModel(nn.Module):
    """VideoAlign's Qwen2VLRewardModelBT as it runs under transformers 4.45: attributes `visual`,
    `model` (the language model), `lm_head`, `rm_head`; the head on every position, gathered where
    the special tokens are (view(B, 3, -1)); the language model called without position ids."""

    def __init__(self, config, special_token_ids, output_dim=1):
        super().__init__()
        self.config = config
        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.model = Qwen2VLTextModel._from_config(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        self.special_token_ids = special_token_ids
        self.output_dim = output_dim

    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw):
        embeds = self.model.embed_tokens(input_ids)
        feats = self.visual(pixel_values_videos.type(self.rm_head.weight.dtype), grid_thw=video_grid_thw).pooler_output
        mask = (input_ids == self.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        hidden = self.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.rm_head(hidden)
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for i in self.special_token_ids:
            special |= input_ids == i
        pooled = logits[special, ...].view(input_ids.shape[0], 3, -1)
        if self.output_dim == 3:
            pooled = pooled.diagonal(dim1=1, dim2=2)
        return pooled.reshape(input_ids.shape[0], -1)


def model_config(base: str = "Qwen/Qwen2-VL-2B-Instruct", **data) -> dict:
    return {
        "data_config": {"meta_data": "/path/meta.csv", "data_dir": "/path", "meta_data_test": None,
                        "max_frame_pixels": MAX_FRAME_PIXELS, "num_frames": None, "fps": 2.0,
                        "p_shuffle_frames": 0.0, "p_color_jitter": 0.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "add_noise": False, "sample_type": "uniform",
                        "use_tied_data": True, **data},
        "training_args": {"output_dir": "/path/out", "bf16": True},
        "model_config": {"model_name_or_path": base, "model_revision": "main", "output_dim": 1,
                         "use_special_tokens": True, "freeze_vision_tower": True, "freeze_llm": False,
                         "tune_merger": True, "torch_dtype": "bfloat16", "reward_token": "special",
                         "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 4, "lora_alpha": 8,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": LORA_EXCLUDE, "lora_modules_to_save": None,
                             "lora_task_type": "CAUSAL_LM", "use_rslora": False, "num_lora_modules": -1},
        "inference_config": dict(INFERENCE_CONFIG),
    }


class Release:
    def __init__(self, root: Path, tok, peft_model, ref: RefRewardModel):
        self.root, self.tok, self.peft_model, self.ref = root, tok, peft_model, ref
        self.ckpt = root / f"checkpoint-{STEP}"


def write_release(root: Path) -> Release:
    """A tiny random VideoReward release under `root`: the LoRA-wrapped model's state dict in checkpoint-7/model.pth
    (random, non-zero adapters), its tokenizer with the three reward tokens, config.json and model_config.json."""
    torch.manual_seed(0)
    ckpt = root / f"checkpoint-{STEP}"
    tok = make_tokenizer()
    arch = tiny_qwen2_vl_config(tok)  # the Qwen2 part of the vocabulary, before the reward tokens are added
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    arch["vocab_size"] = len(tok)  # resize_token_embeddings(len(tokenizer))
    tok.save_pretrained(str(ckpt / "tokenizer"))
    (root / "config.json").write_text(json.dumps(arch))  # train_reward.py: model.config.save_pretrained(output_dir)
    (root / "model_config.json").write_text(json.dumps(model_config(), indent=2))

    config = Qwen2VLConfig.from_dict(arch)
    ref = RefRewardModel(config, tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    with torch.no_grad():
        ref.rm_head.weight.normal_(0, 1.0)
    targets = [n for n, mod in ref.named_modules()
               if isinstance(mod, (nn.Linear, nn.Embedding)) and not any(e in n for e in LORA_EXCLUDE)]
    assert targets and all(n.startswith("model.layers.") for n in targets)
    pm = peft.get_peft_model(ref, peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.05,
                                                  bias="none"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero; a trained adapter is not
    pm.eval()
    torch.save(pm.state_dict(), ckpt / "model.pth")
    (root / "checkpoint-3").mkdir()  # an older step with a broken file: the newest must be chosen
    (root / "checkpoint-3" / "model.pth").write_bytes(b"not a state dict")
    return Release(root, tok, pm, ref)
