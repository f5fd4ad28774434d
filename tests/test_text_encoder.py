"""umT5 text encoder: checkpoint layouts, tokenizers, cache (parity with Wan's T5Encoder: tests/test_golden.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5LayerNorm

from core.codecs.text_encoder import (
    ByteTokenizer,
    TextEncoder,
    exact_rms_norms,
    load_tokenizer,
    load_umt5,
    to_wan_state_dict,
)
from core.config import PLUMBING_CONFIG, ConfigError, load_config
from core.records.checkpoint import CheckpointError
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("no_grad")



def run(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def tiny_encoder(*overrides: str, dtype: torch.dtype = torch.float32) -> TextEncoder:
    return TextEncoder.from_config(load_config(PLUMBING_CONFIG, list(overrides)), "cpu", dtype)


def word_tokenizer_folder(folder) -> None:
    """A small Hugging Face tokenizer (word level, `</s>` appended) saved to `folder`: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "a cat dog sits on the mat".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_norms_identical_below_float64(dtype):
    """The float64 norm fix is a no-op (bit for bit) at every precision transformers already handles."""
    stock = tiny_encoder().model.to(dtype)
    for module in stock.modules():  # back to transformers' own norm
        if isinstance(module, UMT5LayerNorm):
            module.__class__ = UMT5LayerNorm
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    expected = run(stock, ids, mask)
    assert torch.equal(run(exact_rms_norms(stock), ids, mask), expected)


# ------------------------------------------------------------------------------------ checkpoints


def test_wan_pth_round_trip(tmp_path):
    enc = tiny_encoder()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_wan_state_dict(enc.model), path)
    loaded = load_umt5(path, torch.float32).requires_grad_(False)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    ids, mask = enc.tokenize(["a red fox jumps", "snow"])
    assert torch.equal(run(loaded, ids, mask), run(enc.model, ids, mask))


def test_hf_folder_round_trip(tmp_path):
    enc = tiny_encoder()
    enc.model.save_pretrained(tmp_path)
    loaded = load_umt5(tmp_path, torch.float32).requires_grad_(False)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    ids, mask = enc.tokenize(["a red fox jumps", "snow"])
    assert torch.equal(run(loaded, ids, mask), run(enc.model, ids, mask))


def test_missing_paths(tmp_path):
    missing = tmp_path / "nowhere" / "umt5.pth"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_umt5(missing)
    assert str(missing) in str(err.value) and ".pth" in str(err.value) and "Hugging Face UMT5 folder" in str(err.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_umt5(tmp_path)
    with pytest.raises(CheckpointError, match=f"tokenizer folder {tmp_path / 'tok'} does not exist"):
        load_tokenizer(tmp_path / "tok")


def test_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_umt5(garbage)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        load_umt5(tmp_path / "tensor.pth")
    sd = to_wan_state_dict(tiny_encoder().model)
    torch.save({k: v for k, v in sd.items() if k != "norm.weight"}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing norm\.weight; unexpected none"):
        load_umt5(tmp_path / "missing.pth")
    torch.save({**sd, "head.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"missing none; unexpected head\.weight"):
        load_umt5(tmp_path / "extra.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Wan umT5 encoder state dict"):
        load_umt5(tmp_path / "other.pth")
    folder = tmp_path / "hf"
    tiny_encoder().model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["encoder.final_layer_norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing or mis-shaped encoder\.final_layer_norm\.weight"):
        load_umt5(folder)


# ------------------------------------------------------------------------------------ from_config


def test_from_config_tiny_is_seeded_by_its_own_seed_not_the_runs():
    """The tiny encoder is part of the model a generator was trained with: a run's runtime.seed must not swap it
    (it did, and the toy world's student then read every prompt through an encoder it was not trained with)."""
    prompt = ["a cat sits on the mat"]
    a, b, c = tiny_encoder(), tiny_encoder("runtime.seed=1"), tiny_encoder("text_encoder.tiny_seed=1")
    assert a.dim == 32 and a.text_len == 16 and isinstance(a.tokenizer, ByteTokenizer)
    assert torch.equal(a.encode(prompt), b.encode(prompt))
    assert not torch.equal(a.encode(prompt), c.encode(prompt))


def test_from_config_checkpoint_needs_tokenizer_and_width(tmp_path):
    enc = tiny_encoder()
    torch.save(to_wan_state_dict(enc.model), tmp_path / "t5.pth")
    with pytest.raises(ConfigError, match="holds no tokenizer: set text_encoder.tokenizer"):
        tiny_encoder(f"text_encoder.checkpoint={tmp_path / 't5.pth'}")
    word_tokenizer_folder(tmp_path / "tok")
    # the byte vocabulary (259) is larger than the word tokenizer's, so the tiny weights fit it
    loaded = tiny_encoder(f"text_encoder.checkpoint={tmp_path / 't5.pth'}",
                          f"text_encoder.tokenizer={tmp_path / 'tok'}")
    assert loaded.tokenize(["a cat"])[0][0, :4].tolist() == [3, 4, 1, 0]
    assert loaded.encode(["a cat"]).shape == (1, 16, 32)
    torch.save(to_wan_state_dict(tiny_encoder("model.text_dim=64").model), tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match="64-dim embeddings but model.text_dim is 32"):
        tiny_encoder(f"text_encoder.checkpoint={tmp_path / 'wide.pth'}", f"text_encoder.tokenizer={tmp_path / 'tok'}")


def test_from_config_hf_folder_with_tokenizer(tmp_path):
    enc = tiny_encoder()
    enc.model.save_pretrained(tmp_path)
    word_tokenizer_folder(tmp_path)
    loaded = tiny_encoder(f"text_encoder.checkpoint={tmp_path}")
    ids, mask = loaded.tokenize(["the dog sits"])
    assert ids[0, :4].tolist() == [8, 5, 6, 1] and mask.sum().item() == 4
    assert torch.equal(loaded.encode(["the dog sits"]), enc.encode_tokens(ids, mask))


# ------------------------------------------------------------------------------------ tokenizer, padding, cache


def test_byte_tokenizer():
    tok = ByteTokenizer()
    for text in ["", "a cat", "naïve café 東京"]:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")) + 1 and ids[-1] == tok.eos_token_id
        assert tok.decode(ids) == text
    out = tok(["a cat", "x" * 40], max_length=8)
    assert out["input_ids"].tolist()[0] == tok.encode("a cat") + [0, 0]
    assert out["attention_mask"].sum(1).tolist() == [6, 8]
    assert out["input_ids"][1, -1].item() == tok.eos_token_id and tok.decode(out["input_ids"][1].tolist()) == "x" * 7


def test_padding_zeroed_and_batch_independent():
    enc = tiny_encoder(dtype=torch.float64)
    prompts = ["a cat sits on the mat", "dog"]
    out = enc.encode(prompts)
    for row, prompt in zip(out, prompts):
        n = min(len(prompt.encode()) + 1, enc.text_len)
        assert (row[n:] == 0).all() and (row[:n] != 0).all()
    enc.clear_cache()
    assert_close(enc.encode(prompts[1:])[0], out[1], 1e-12, "valid rows do not depend on the batch")


def test_cache_hits_misses_and_lru():
    enc = tiny_encoder("text_encoder.cache_size=2")
    calls = []
    encode_tokens = enc.encode_tokens
    enc.encode_tokens = lambda ids, mask: calls.append(ids.shape[0]) or encode_tokens(ids, mask)
    first = enc.encode(["a", "b", "a"])
    assert (enc.cache_hits, enc.cache_misses, calls) == (1, 2, [2])  # the duplicate is encoded once
    again = enc.encode(["b", "a"])
    assert (enc.cache_hits, enc.cache_misses, calls) == (3, 2, [2])
    assert torch.equal(again, first[[1, 0]])
    enc.encode(["c"])  # evicts "b", the least recently used
    enc.encode(["a", "b"])
    assert (enc.cache_hits, enc.cache_misses, calls) == (4, 4, [2, 1, 1])
    fresh = tiny_encoder("text_encoder.cache_size=0")
    assert torch.equal(fresh.encode(["a", "b", "a"]), first)
    fresh.encode(["a"])
    assert fresh.cache_misses == 3  # no cache: every call encodes


# ------------------------------------------------------------------------------------ what the model will not read


def test_unknown_words_are_named_and_warned_once_per_prompt(tmp_path, caplog):
    """A word-level tokenizer reads words outside its vocabulary as <unk>: they are named (the exact pieces, case as
    typed), logged when the prompt is first encoded, and a cached prompt is not reported again."""
    enc = tiny_encoder("model.text_len=8")
    enc.model.save_pretrained(tmp_path)
    word_tokenizer_folder(tmp_path)
    words = tiny_encoder(f"text_encoder.checkpoint={tmp_path}", "model.text_len=8")
    assert words.unknown_words("the  Corgi sits, on the corgi mat!") == ["Corgi", ",", "corgi", "!"]
    assert words.unknown_words("the cat sits on the mat") == []
    (unknown,) = words.prompt_warnings("a corgi sits")
    assert "corgi" in unknown and "it knows: a cat dog mat on sits the" in unknown
    (cut,) = words.prompt_warnings("the cat sits on the mat on the mat")
    assert "10 tokens" in cut and "reads 8" in cut  # 9 words and eos: the last two are cut off
    with caplog.at_level("WARNING", logger="core.codecs.text_encoder"):
        words.encode(["a corgi sits", "the cat sits"])
        words.encode(["a corgi sits"])
    assert [r.getMessage().count("corgi") for r in caplog.records] == [2]  # the prompt and the word, once
    # A byte-level tokenizer has no unknown token: nothing to report but truncation.
    assert enc.unknown_words("a corgi ☃") == [] and enc.prompt_warnings("a corgi") == []
    assert "tokens long" in enc.prompt_warnings("x" * 20)[0]
