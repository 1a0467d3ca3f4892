"""Frozen pretrained encoders of each family and the embedding cache, on tiny random checkpoints that each test
saves to tmp_path and loads back by path, through the code a user runs with a hub id."""

import json
import string

import pytest
import torch
import transformers

from pixrun.text import TextConfig, TextTower
from pixrun.text_cache import TextCache

WORDS = ["a", "photo", "of", "red", "circle", "blue", "square", "left"]
TINY_DECODER = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8,
}


def char_vocab(specials: list[str]) -> dict[str, int]:
    """A character-level BPE vocabulary (no merges) with the byte-level space marker."""
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(string.ascii_lowercase) + ["Ġ", "▁"]:
        vocab.setdefault(c, len(vocab))
    return vocab


def t5gemma(path):
    vocab = char_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    module = transformers.T5GemmaModuleConfig(vocab_size=len(vocab), **TINY_DECODER)
    config = transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=len(vocab))
    full = transformers.T5GemmaForConditionalGeneration(config)  # what the hub holds: encoder and decoder
    transformers.GemmaTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return full, full.model.encoder, "T5GemmaEncoderModel"


def qwen3(path):
    vocab = char_vocab(["<|endoftext|>"])
    full = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=len(vocab), **TINY_DECODER))
    transformers.Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return full, full.model, "Qwen3Model"


def t5_family(config_class, model_class, encoder_class):
    def make(path):
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
        tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
        config = config_class(vocab_size=len(tokenizer), d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32)
        full = model_class(config)
        tokenizer.save_pretrained(path)
        return full, full.encoder, encoder_class

    return make


FAMILIES = {
    "t5gemma": t5gemma,
    "qwen3": qwen3,
    "t5": t5_family(transformers.T5Config, transformers.T5ForConditionalGeneration, "T5EncoderModel"),
    "umt5": t5_family(transformers.UMT5Config, transformers.UMT5ForConditionalGeneration, "UMT5EncoderModel"),
}


def saved_checkpoint(family: str, path):
    torch.manual_seed(0)
    full, encoder, class_name = FAMILIES[family](path)
    full.save_pretrained(path)
    return encoder.eval(), class_name


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_encoder_loads_by_path_frozen_bf16_with_the_right_mask(family, tmp_path):
    reference, class_name = saved_checkpoint(family, tmp_path)
    tower = TextTower.build(TextConfig(encoder=str(tmp_path), max_tokens=8), [])
    assert type(tower.encoder).__name__ == class_name
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in tower.encoder.parameters())
    tower.train()  # what the training loop does; a frozen encoder must not start dropping out
    assert not tower.encoder.training

    prompts = ["a red circle left of a blue square", "red", ""]
    emb, mask = tower(prompts)
    lengths = [min(8, len(ids)) for ids in tower.tokenizer(prompts).input_ids]
    assert lengths[0] == 8 and lengths[1] < 8  # the first prompt is truncated
    assert mask.tolist() == [[i < n for i in range(8)] for n in lengths]
    assert emb.dtype == torch.float32 and not emb.requires_grad and emb.shape == (3, 8, 16)
    assert emb[~mask].abs().max() == 0  # padding is zero, so nothing non-finite can leak through it

    # The short prompt's tokens come out as if it were encoded alone with the checkpoint's own weights.
    ids = tower.tokenizer(prompts[1], return_tensors="pt").input_ids
    with torch.no_grad():
        alone = reference.to(torch.bfloat16)(input_ids=ids).last_hidden_state.float()
    torch.testing.assert_close(emb[1, : lengths[1]], alone[0], atol=2e-2, rtol=2e-2)


def test_encoder_class_follows_model_type_unless_named(tmp_path):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=20, **TINY_DECODER))
    llama.save_pretrained(tmp_path)
    transformers.Qwen2Tokenizer(vocab=char_vocab(["<|endoftext|>"]), merges=[]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'.*text.encoder_class"):
        TextTower.build(TextConfig(encoder=str(tmp_path)), [])
    tower = TextTower.build(TextConfig(encoder=str(tmp_path), encoder_class="LlamaModel", dtype="float32"), [])
    assert type(tower.encoder).__name__ == "LlamaModel" and tower.dim == 16
    assert torch.equal(tower.encoder.norm.weight, llama.model.norm.weight)


class CountingTower:
    """Counts the captions that reach the encoder."""

    def __init__(self, tower):
        self.captions = []
        tower.encoder.register_forward_hook(lambda module, args, kwargs, out: self.captions.append(
            kwargs["input_ids"].shape[0]), with_kwargs=True)


@pytest.mark.parametrize("family", ["t5", "qwen3"])  # qwen3's tokenizer gives the empty caption no token at all
def test_cache_encodes_each_caption_once_and_matches_the_tower(family, tmp_path):
    saved_checkpoint(family, tmp_path / "encoder")
    tower = TextTower.build(TextConfig(encoder=str(tmp_path / "encoder")), [])
    counter = CountingTower(tower)
    captions = ["a red circle", "", "a blue square left of a circle", "a red circle"]
    expected = tower(captions)
    cache = TextCache(tmp_path / "cache", tower)
    counter.captions.clear()

    first = cache(captions)
    assert counter.captions == [3]  # the three distinct captions, the empty one among them
    torch.testing.assert_close(first, expected, atol=1e-2, rtol=1e-2)
    assert torch.equal(first[1], expected[1])
    again = cache(["", "a red circle"])
    assert counter.captions == [3]
    assert torch.equal(again[0], first[0][[1, 0], : again[0].shape[1]])

    cache.flush()
    reopened = TextCache(tmp_path / "cache", tower)
    assert torch.equal(reopened(captions)[0], first[0])
    assert counter.captions == [3]  # the reopened cache encoded nothing
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["0-00000.safetensors", "index-0.json"]
    index = json.loads((folder / "index-0.json").read_text())
    assert index["identity"]["max_tokens"] == 32 and len(index["entries"]) == 3
    other = TextCache(tmp_path / "cache", tower, writer="1")  # another rank: reads rank 0's, writes its own
    other(["a photo of a circle", "a red circle"])
    assert counter.captions == [3, 1]
    other.flush()
    TextCache(tmp_path / "cache", tower)(["a photo of a circle", "a blue square left of a circle"])
    assert counter.captions == [3, 1]  # rank 0's cache now also serves what rank 1 encoded

    only_empty = cache([""])
    assert only_empty[0].shape == (1, 1, 16) and torch.equal(only_empty[1], tower([""])[1])


def test_cache_is_keyed_by_the_tower_settings_and_refuses_a_trained_encoder(tmp_path):
    saved_checkpoint("t5", tmp_path / "encoder")
    config = TextConfig(encoder=str(tmp_path / "encoder"))
    short = TextConfig(encoder=str(tmp_path / "encoder"), max_tokens=2)
    for c in (config, short):
        cache = TextCache(tmp_path / "cache", TextTower.build(c, []))
        assert cache(["a red circle"])[1].sum() == min(c.max_tokens, 4)  # 3 words and </s>
        cache.flush()
    assert len(list((tmp_path / "cache").iterdir())) == 2
    float32 = TextTower.build(TextConfig(encoder=str(tmp_path / "encoder"), dtype="float32"), [])
    before = TextCache(tmp_path / "cache", float32)
    expected = before(["a red circle"])[0]
    before.flush()
    assert torch.equal(TextCache(tmp_path / "cache", float32)(["a red circle"])[0], expected)  # not rounded to bf16
    with pytest.raises(ValueError, match="frozen"):
        TextCache(tmp_path / "cache", TextTower.build(TextConfig(width=32, depth=1, heads=2), ["a"]))
