import sys

import numpy as np
import pytest
import torch
import transformers

from pixrun.data.shapes import SHAPE_KINDS, ShapesWorld
from pixrun.evaluate import evaluation_prompts
from pixrun.text import CLEANERS, TextConfig, TextTower, basic_clean, train_tokenizer, web_clean

CAPTIONS = [
    "A red bicycle leaning against a brick wall.",
    "Two dogs playing in the snow, photographed at dusk.",
    "A bowl of ramen with a soft-boiled egg and scallions",
    "Close-up of a hummingbird feeding from a red flower",
    "An old lighthouse on a rocky coast under a stormy sky",
]


def test_small_tower_tokenizes_words_pads_and_learns():
    tower = TextTower.build(TextConfig(width=32, depth=1, heads=2), ["a", "photo", "of", "red", "circle"])
    emb, mask = tower(["a photo of a red circle", "", "a photo of a Circle"])
    assert emb.shape[:2] == mask.shape and emb.shape[-1] == tower.dim == 32
    assert mask.sum(1).tolist() == [7, 1, 6]  # words + end token; the empty prompt is the end token alone
    assert tower.tokenizer.unk_token_id not in tower.tokenizer("a photo of a Circle").input_ids  # lower-cased
    emb.sum().backward()
    assert all(p.grad is not None for p in tower.encoder.parameters() if p.requires_grad)


def test_shapes_world_words_stay_one_token_each():
    """The default's tokenizer, learnt from the world's words, is word-level there, as it was before it was learnt:
    every word of every training caption and evaluation prompt is one piece."""
    world = ShapesWorld(kinds=SHAPE_KINDS)
    tower = TextTower.build(TextConfig(width=32, depth=1, heads=2), world.vocabulary())
    captions = [world.sample_scene(np.random.default_rng(i)).caption for i in range(300)]
    prompts = [spec.prompt for spec in evaluation_prompts(world, per_task=8)]
    for prompt in captions + prompts:
        ids = tower.tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 1, tower.tokenizer.convert_ids_to_tokens(ids)
    assert len(tower.tokenizer) < 512  # merges stop once every word is one piece: no table of unused rows
    # A vocabulary too small for whole words splits them, but into known pieces.
    small = train_tokenizer(world.vocabulary(), 270)
    ids = small("a photo of two crosses").input_ids
    assert len(ids) > 6 and small.unk_token_id not in ids


def test_tokenizer_learnt_from_captions_encodes_unseen_words_into_known_pieces(tmp_path):
    config = TextConfig(width=32, depth=1, heads=2, vocab_size=300)
    tower = TextTower.build(config, CAPTIONS * 20, run_dir=tmp_path)
    tokenizer = tower.tokenizer
    assert len(tokenizer) == 300  # the captions have more to merge than the vocabulary holds
    assert tokenizer.tokenize("A red") == ["Ġa", "Ġred"]  # the most frequent words became whole pieces
    unseen = tokenizer("a xylophone, Zürich 🦜").input_ids[:-1]
    pieces = tokenizer.convert_ids_to_tokens(unseen)
    assert len(pieces) > 6 and tokenizer.unk_token_id not in unseen
    assert tokenizer.decode(unseen).strip() == "a xylophone, zürich 🦜"  # nothing lost, lower-cased
    again = TextTower.load(config, tmp_path)
    prompts = ["Two dogs on a rocky coast", "a xylophone, Zürich 🦜", ""]
    assert again.tokenizer(prompts).input_ids == tokenizer(prompts).input_ids
    assert TextTower.build(config, CAPTIONS * 20).tokenizer.get_vocab() == tokenizer.get_vocab()  # every rank alike


def test_tokenizer_is_learnt_from_cleaned_captions():
    config = TextConfig(width=32, depth=1, heads=2, vocab_size=4096)
    raw = TextTower.build(config, ["fish &amp; chips"] * 10)
    assert "Ġ&amp;" not in raw.tokenizer.get_vocab() and "Ġ&" in raw.tokenizer.get_vocab()


def test_vocab_size_is_checked():
    with pytest.raises(ValueError, match="text.vocab_size must be at least 259"):
        TextConfig(vocab_size=100).validate()


def test_run_tower_reloads_from_its_saved_definition(tmp_path):
    config = TextConfig(width=32, depth=1, heads=2)
    tower = TextTower.build(config, ["a", "red", "circle"], run_dir=tmp_path)
    again = TextTower.load(config, tmp_path)
    again.load_state_dict(tower.state_dict())
    prompts = ["a red circle", "a circle"]
    assert torch.equal(tower(prompts)[0], again(prompts)[0])


def test_pretrained_encoder_loads_from_a_local_path_and_stays_frozen(tmp_path):
    # What a user does with a hub id, here with a tiny random encoder saved locally.
    tokenizer = train_tokenizer(["a red circle"], 300)
    encoder = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, num_heads=3, num_layers=1, d_ff=48)
    )
    tokenizer.save_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    tower = TextTower.build(TextConfig(encoder=str(tmp_path), max_tokens=3, dtype="float32"), [])
    assert not tower.trainable and not any(p.requires_grad for p in tower.parameters())
    emb, mask = tower(["a red circle", "a"])
    assert emb.shape == (2, 3, 24) and mask.tolist() == [[True, True, True], [True, True, False]]  # truncated
    ids = tokenizer("a red circle", truncation=True, max_length=3).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġa", "Ġred", "</s>"]
    expected = encoder.eval()(input_ids=torch.tensor([ids])).last_hidden_state
    assert torch.allclose(emb[:1], expected, atol=1e-6)


def test_prompt_cleaning_settings():
    assert basic_clean("  Tom &amp;amp; Jerry\u2019s  ") == "Tom & Jerry's"  # as diffusers' PRXPixelPipeline
    assert web_clean("a red  circle https://example.com/x.jpg by @someone\n www.shop.com") == "a red circle by"
    assert CLEANERS["none"]("  kept  ") == "  kept  "
    vocabulary = ["a", "red", "&", "circle"]
    raw = TextTower.build(TextConfig(width=32, depth=1, heads=2, clean="none"), vocabulary)
    cleaned = TextTower.build(TextConfig(width=32, depth=1, heads=2, clean="basic"), vocabulary)
    assert raw.tokenizer.tokenize("a red &amp; circle") == ["Ġa", "Ġred", "Ġ&", "a", "m", "p", ";", "Ġcircle"]
    assert cleaned(["a red &amp; circle"])[1].sum() == 5 and raw(["a red &amp; circle"])[1].sum() == 9
    with pytest.raises(ValueError, match="text.clean"):
        TextConfig(clean="strict").validate()


def test_pad_states_right_pads_rows_with_zeros_and_marks_what_was_there():
    from pixrun.text import pad_states

    rows = [torch.ones(3, 2), torch.full((1, 2), 2.0), torch.zeros(0, 2)]
    padded, mask = pad_states(rows)
    assert padded.shape == (3, 3, 2)
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert torch.equal(padded[mask], torch.cat(rows)) and not padded[~mask].any()
    masks, _ = pad_states([torch.tensor([True, False]), torch.tensor([True])])  # 1-D rows: masks of two batches
    assert masks.tolist() == [[True, False], [True, False]]
    only_empty, empty_mask = pad_states([torch.zeros(0, 4)])
    assert only_empty.shape == (1, 1, 4) and not empty_mask.any()  # at least one token, as the tower gives


def test_prx_cleaning_is_diffusers_prx_pipeline_s(monkeypatch):
    from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor

    from pixrun.text import prx_clean, prx_preprocessor

    prompts = ["A <person> at https://example.com/a.png, by @someone #12", "Fish &amp; Chips!!! -- £5 “today”", ""]
    expected = [TextPreprocessor().clean_text(p) for p in prompts]
    assert [prx_clean(p) for p in prompts] == expected and expected[0] == "a person at ., by"
    TextConfig(clean="prx").validate()
    tower = TextTower.build(TextConfig(width=32, depth=1, heads=2, clean="prx"), ["a", "person", "at", "by"])
    assert [tower.clean(p) for p in prompts] == expected

    prx_preprocessor.cache_clear()
    monkeypatch.setitem(sys.modules, "diffusers.pipelines.prx.pipeline_prx", None)  # as if diffusers were missing
    try:
        with pytest.raises(ImportError, match="text.clean=prx .*install diffusers"):
            prx_clean("a prompt")
    finally:
        prx_preprocessor.cache_clear()
