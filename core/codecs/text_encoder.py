"""umT5 prompt encoder (docs/reference.md) on `transformers.UMT5EncoderModel`.

Wan's `models_t5_umt5-xxl-enc-bf16.pth` maps one-to-one onto the Hugging Face encoder, so one
model class serves Wan files, Hugging Face folders and the tiny random encoder of the embedded
config. `TextEncoder` follows Wan's wrapper convention: prompts padded to text_len tokens, outputs
past each prompt's length set to zero, and it caches embeddings so repeated prompts (a serving
replica's popular prompts, a learner's prompt list) are encoded once.
"""

from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5LayerNorm

from core.config import Config, ConfigError
from core.records.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

LAYOUTS = ("expected Wan's models_t5_umt5-xxl-enc-bf16.pth (a flat state dict with Wan T5 keys such as "
           "token_embedding.weight, blocks.0.attn.q.weight) or a Hugging Face UMT5 folder (config.json + weights)")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
MAX_DISTANCE = 128  # umT5's relative_attention_max_distance; not recoverable from tensor shapes

# Wan T5Encoder key prefix -> UMT5EncoderModel key prefix. Block entries follow `blocks.N.` / `encoder.block.N.`.
_WAN_TOP = {"token_embedding.": "shared.", "norm.": "encoder.final_layer_norm."}
_WAN_BLOCK = {
    "attn.": "layer.0.SelfAttention.",
    "pos_embedding.embedding.": "layer.0.SelfAttention.relative_attention_bias.",
    "norm1.": "layer.0.layer_norm.",
    "norm2.": "layer.1.layer_norm.",
    "ffn.gate.0.": "layer.1.DenseReluDense.wi_0.",
    "ffn.fc1.": "layer.1.DenseReluDense.wi_1.",
    "ffn.fc2.": "layer.1.DenseReluDense.wo.",
}
_HF_TOP = {v: k for k, v in _WAN_TOP.items()}
_HF_BLOCK = {v: k for k, v in _WAN_BLOCK.items()}
_TIED = "encoder.embed_tokens.weight"  # the same tensor as shared.weight


def _preview(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------ key mapping


def _rename(key: str, top: dict[str, str], block: dict[str, str], src_block: str, dst_block: str) -> str | None:
    if key.startswith(src_block):
        index, rest = key[len(src_block):].split(".", 1)
        top, key, head = block, rest, f"{dst_block}{index}."
    else:
        head = ""
    for src, dst in sorted(top.items(), key=lambda item: -len(item[0])):  # longest prefix wins
        if key.startswith(src):
            return head + dst + key[len(src):]
    return None


def wan_to_hf_key(key: str) -> str | None:
    """UMT5EncoderModel name of a Wan T5 key (`blocks.3.ffn.fc1.` -> `encoder.block.3.layer.1.DenseReluDense.wi_1.`);
    None for a key the mapping does not know."""
    return _rename(key, _WAN_TOP, _WAN_BLOCK, "blocks.", "encoder.block.")


def hf_to_wan_key(key: str) -> str | None:
    """Inverse of `wan_to_hf_key`; None for keys Wan does not store (the tied encoder.embed_tokens)."""
    return _rename(key, _HF_TOP, _HF_BLOCK, "encoder.block.", "blocks.")


def to_wan_state_dict(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """The model's weights under Wan T5 key names (the layout of models_t5_umt5-xxl-enc-bf16.pth)."""
    return {wan: v for k, v in model.state_dict().items() if (wan := hf_to_wan_key(k)) is not None}


# ------------------------------------------------------------------------------------ precision


class _RMSNorm(UMT5LayerNorm):
    """UMT5LayerNorm whose variance is taken in *at least* float32 instead of exactly float32.

    transformers casts the input to float32 before the mean of squares so that half-precision
    inputs accumulate in float32. For float16/bfloat16/float32 inputs promote_types(x, float32) is
    float32, so this is the same computation bit for bit; only float64 changes, where transformers
    would round the variance to float32 (~3e-7 output error on the golden case) and this keeps it in
    float64 as the float64 reference does.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        variance = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def exact_rms_norms(model: UMT5EncoderModel) -> UMT5EncoderModel:
    """Switch the model's RMS norms to `_RMSNorm` in place (same weights, same state-dict keys)."""
    for module in model.modules():
        if type(module) is UMT5LayerNorm:
            module.__class__ = _RMSNorm
    return model


# ------------------------------------------------------------------------------------ loading


def umt5_config(vocab_size: int, d_model: int, d_ff: int, num_layers: int, num_heads: int,
                d_kv: int | None = None, num_buckets: int = 32) -> UMT5Config:
    """umT5 encoder config with Wan's fixed choices: gated tanh-GELU FFN, max distance 128, no dropout."""
    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
                      d_kv=d_kv or d_model // num_heads, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=MAX_DISTANCE, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False)


def _config_from_wan(sd: dict[str, torch.Tensor], source: str) -> UMT5Config:
    need = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight")
    if missing := [k for k in need if k not in sd]:
        raise CheckpointError(f"{source} is not a Wan umT5 encoder state dict (no {', '.join(missing)}); it holds "
                              f"{_preview(sorted(sd))}; {LAYOUTS}")
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return umt5_config(vocab, d_model, sd["blocks.0.ffn.fc1.weight"].shape[0], layers, heads,
                       d_kv=sd["blocks.0.attn.q.weight"].shape[0] // heads, num_buckets=buckets)


def umt5_from_wan_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                             source: str = "state dict") -> UMT5EncoderModel:
    """A UMT5EncoderModel holding a Wan T5Encoder state dict; strict: mismatches list the keys.

    The model is built on the meta device and takes the tensors as they are (no random init of
    5.7B parameters before they are overwritten).
    """
    config = _config_from_wan(sd, source)
    renamed = {k: wan_to_hf_key(k) for k in sd}
    unknown = sorted(k for k, hf in renamed.items() if hf is None)
    mapped = {hf: sd[k].to(dtype) for k, hf in renamed.items() if hf is not None}
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        result = model.load_state_dict(mapped, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{source} does not fit the umT5 encoder inferred from its shapes: {e}") from e
    missing = sorted(set(result.missing_keys) - {_TIED})
    if unknown or missing:
        raise CheckpointError(f"{source} does not match the umT5 encoder: missing "
                              f"{_preview([hf_to_wan_key(k) or k for k in missing]) or 'none'}; unexpected "
                              f"{_preview(unknown) or 'none'}")
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assign replaced shared.weight
    return exact_rms_norms(model).eval()


def load_umt5(path: str | Path, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """umT5 encoder from Wan's .pth (flat Wan T5 state dict) or a local Hugging Face UMT5 folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"umT5 checkpoint {path} does not exist; {LAYOUTS}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"folder {path} has no config.json, so it is not a Hugging Face UMT5 folder; "
                                  f"it holds {_preview(sorted(p.name for p in path.iterdir()))}; {LAYOUTS}")
        try:
            model, info = UMT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                           output_loading_info=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the Hugging Face UMT5 folder {path}: {e}") from e
        # transformers would leave missing weights randomly initialised; unexpected keys (a full
        # encoder-decoder folder's decoder) are fine.
        missing = sorted(set(info["missing_keys"]) - {_TIED}) + sorted(str(k[0]) for k in info["mismatched_keys"])
        if missing:
            unexpected = _preview(sorted(info["unexpected_keys"])) or "none"
            raise CheckpointError(f"the weights in {path} do not fit its config.json: missing or mis-shaped "
                                  f"{_preview(missing)}; unexpected {unexpected}")
        return exact_rms_norms(model).eval()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); {LAYOUTS}") from e
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a flat state dict of tensors; {LAYOUTS}")
    return umt5_from_wan_state_dict(sd, dtype, source=str(path))


# ------------------------------------------------------------------------------------ tokenizers


class Tokenizer(Protocol):
    """What TextEncoder needs: the Hugging Face tokenizer call, `encode` (one text's ids, eos included) and `len()`
    (ids in use)."""

    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...

    def encode(self, text: str) -> list[int]: ...

    def __len__(self) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes offset past the special ids (pad 0, eos 1, unk 2), ByT5 style: tiny configs need no files."""

    pad_token_id, eos_token_id, offset = 0, 1, 3

    def __len__(self) -> int:
        return 256 + self.offset

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Byte ids plus eos; truncated to max_length with eos kept last (as HF truncation does)."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        if max_length is not None:
            ids = ids[:max_length - 1]
        return ids + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], *, max_length: int, **_: Any) -> dict[str, torch.Tensor]:
        """The Hugging Face call with padding="max_length", truncation=True, return_tensors="pt"."""
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for row, text in zip(ids, texts):
            tokens = self.encode(text, max_length)
            row[:len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A local tokenizer folder (google/umt5-xxl's files; Wan2.1 ships them as google/umt5-xxl/)."""
    path = Path(path)
    if not _has_tokenizer(path):
        what = "does not exist" if not path.exists() else f"holds none of {', '.join(TOKENIZER_FILES)}"
        raise CheckpointError(f"tokenizer folder {path} {what}; expected a local copy of google/umt5-xxl's "
                              "tokenizer (Wan2.1 folders have it under google/umt5-xxl/)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from e


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: HTML entities unescaped, runs of whitespace collapsed (ftfy not applied)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def unknown_words(tokenizer: Any, prompt: str) -> list[str]:
    """The pieces of `prompt` (after Wan's cleaning) that `tokenizer` maps to its unknown token, each once, in
    order: a model reads them all as the same `<unk>`, so they are lost without a trace unless someone says so. A
    word-level tokenizer (the toy world's) does this to every word or punctuation mark outside its vocabulary;
    umT5's sentencepiece only to characters it has never seen; byte-level tokenizers never. Fast tokenizers name
    the exact piece (from their offsets); others the whitespace-separated words that hold one."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    text = clean_prompt(prompt)
    if getattr(tokenizer, "is_fast", False):
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = (text[a:b] for i, (a, b) in zip(out["input_ids"], out["offset_mapping"]) if i == unk)
    else:
        pieces = (w for w in text.split() if unk in tokenizer.encode(w))
    return list(dict.fromkeys(pieces))


# ------------------------------------------------------------------------------------ encoder


def pad_context(rows: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """[B, text_len, dim] from each prompt's valid rows [tokens, dim], zero past each prompt's length: Wan's
    padded context, bit for bit as `TextEncoder.encode` makes it (it is made here), in the rows' dtype and device.
    A learner rebuilds its samples' contexts with it, so it needs no text encoder."""
    if not rows:
        raise ValueError("pad_context: no rows")
    dims = {tuple(r.shape[1:]) for r in rows}
    if any(r.dim() != 2 for r in rows) or len(dims) != 1:
        raise ValueError(f"pad_context: rows must be [tokens, dim] of one dim, got {[tuple(r.shape) for r in rows]}")
    if too_long := [r.shape[0] for r in rows if r.shape[0] > text_len]:
        raise ValueError(f"pad_context: prompts of {too_long} tokens do not fit text_len {text_len} (model.text_len)")
    out = torch.zeros(len(rows), text_len, rows[0].shape[1], device=rows[0].device, dtype=rows[0].dtype)
    for row, r in zip(out, rows):
        row[:len(r)] = r
    return out



class TextEncoder:
    """Prompts -> [B, text_len, dim] umT5 embeddings, zero past each prompt's length, with an LRU cache.

    The cache keeps only each prompt's valid rows (the rest are zeros by construction), so for
    Wan's 512-token padding a cached prompt of n tokens costs n/512 of a full embedding.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer, text_len: int, cache_size: int = 1024):
        self.model = exact_rms_norms(model).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the text encoder's vocabulary holds "
                              f"{model.config.vocab_size}: they do not belong together")

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str, dtype: torch.dtype) -> "TextEncoder":
        """The encoder cfg.text_encoder describes: a checkpoint + tokenizer, or a tiny seeded random one."""
        tc = cfg.text_encoder
        if tc.checkpoint is None:
            tokenizer = load_tokenizer(tc.tokenizer) if tc.tokenizer else ByteTokenizer()
            if cfg.model.text_dim % tc.tiny_heads:
                raise ConfigError(f"model.text_dim ({cfg.model.text_dim}) must be divisible by "
                                  f"text_encoder.tiny_heads ({tc.tiny_heads})")
            config = umt5_config(len(tokenizer), cfg.model.text_dim, tc.tiny_ffn_dim, tc.tiny_layers, tc.tiny_heads)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc.tiny_seed)
                model = UMT5EncoderModel(config)
        else:
            model = load_umt5(tc.checkpoint, dtype)
            folder = tc.tokenizer or (tc.checkpoint if _has_tokenizer(Path(tc.checkpoint)) else None)
            if folder is None:
                raise ConfigError(f"text_encoder.checkpoint {tc.checkpoint} holds no tokenizer: set "
                                  "text_encoder.tokenizer to a local folder with google/umt5-xxl's tokenizer files "
                                  "(in a Wan2.1 model folder: google/umt5-xxl)")
            tokenizer = load_tokenizer(folder)
        if model.config.d_model != cfg.model.text_dim:
            raise ConfigError(f"the text encoder outputs {model.config.d_model}-dim embeddings but model.text_dim is "
                              f"{cfg.model.text_dim}: use a matching text_encoder.checkpoint or set model.text_dim")
        return cls(model.to(device=device, dtype=dtype), tokenizer, cfg.model.text_len, tc.cache_size)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def vocabulary(self, limit: int = 1000) -> list[str] | None:
        """The words a word-level tokenizer knows (a small world's prompts), sorted; None for sub-word or byte
        tokenizers and for vocabularies over `limit` words, where a word list says nothing useful."""
        vocab = getattr(self.tokenizer, "get_vocab", lambda: None)()
        specials = set(getattr(self.tokenizer, "all_special_tokens", []))
        if vocab is None or len(vocab) > limit or not all(w.isalpha() for w in vocab if w not in specials):
            return None
        return sorted(w for w in vocab if w not in specials)

    def unknown_words(self, prompt: str) -> list[str]:
        """The pieces of `prompt` this encoder's tokenizer reads as unknown (`unknown_words`)."""
        return unknown_words(self.tokenizer, prompt)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What the model will not read of `prompt`, as sentences for a person: words it maps to unknown, and
        tokens past `text_len` that truncation drops. Empty when it reads the whole prompt."""
        warnings = []
        if unknown := self.unknown_words(prompt):
            known = self.vocabulary()
            hint = f"; it knows: {' '.join(known)}" if known is not None else ""
            warnings.append(f"the text encoder's tokenizer does not know {len(unknown)} word(s) of the prompt and "
                            f"reads each as <unk>: {', '.join(unknown)}{hint}")
        tokens = len(self.tokenizer.encode(clean_prompt(prompt)))
        if tokens > self.text_len:
            warnings.append(f"the prompt is {tokens} tokens long but the model reads {self.text_len} "
                            f"(model.text_len): the rest is cut off")
        return warnings

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, text_len], padded (and truncated) to text_len, eos last."""
        out = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output for token ids, zeroed at positions >= each row's length (Wan's wrapper)."""
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        past_end = torch.arange(ids.shape[1], device=ids.device) >= mask.gt(0).sum(dim=1, keepdim=True)
        return out.masked_fill(past_end[..., None], 0.0)

    def encode_valid(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's valid rows [tokens, dim] (its real length, eos included): what a sample carries, so that
        `pad_context` rebuilds `encode`'s output exactly without a text encoder. Each distinct uncached prompt is
        encoded once."""
        unique = list(dict.fromkeys(prompts))
        new = [p for p in unique if p not in self._cache]
        self.cache_misses += len(new)
        self.cache_hits += len(prompts) - len(new)
        rows = {p: self._cache[p] for p in unique if p in self._cache}
        for p in rows:
            self._cache.move_to_end(p)
        for p in new:  # once per prompt the cache does not hold, so a repeated prompt is not re-reported
            for warning in self.prompt_warnings(p):
                logger.warning("prompt %r: %s", p, warning)
        if new:
            ids, mask = self.tokenize(new)
            for p, emb, n in zip(new, self.encode_tokens(ids, mask), mask.gt(0).sum(dim=1).tolist()):
                rows[p] = emb[:n].clone()
                self._remember(p, rows[p])
        return [rows[p] for p in prompts]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, dim] embeddings: `encode_valid`'s rows zero-padded to text_len (`pad_context`)."""
        return pad_context(self.encode_valid(prompts), self.text_len)

    def _remember(self, prompt: str, valid_rows: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self._cache[prompt] = valid_rows
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()
        self.cache_hits = self.cache_misses = 0
