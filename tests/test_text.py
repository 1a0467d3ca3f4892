import pytest
import torch
import transformers

from pixrun.text import CLEANERS, TextConfig, TextTower, basic_clean, web_clean, word_tokenizer


def test_small_tower_tokenizes_words_pads_and_learns():
    tower = TextTower.build(TextConfig(width=32, depth=1, heads=2), ["a", "photo", "of", "red", "circle"])
    emb, mask = tower(["a photo of a red circle", "", "a photo of a Circle"])
    assert emb.shape[:2] == mask.shape and emb.shape[-1] == tower.dim == 32
    assert mask.sum(1).tolist() == [7, 1, 6]  # words + end token; the empty prompt is the end token alone
    assert tower.tokenizer.unk_token_id not in tower.tokenizer("a photo of a Circle").input_ids  # lower-cased
    emb.sum().backward()
    assert all(p.grad is not None for p in tower.encoder.parameters() if p.requires_grad)


def test_run_tower_reloads_from_its_saved_definition(tmp_path):
    config = TextConfig(width=32, depth=1, heads=2)
    tower = TextTower.build(config, ["a", "red", "circle"], run_dir=tmp_path)
    again = TextTower.load(config, tmp_path)
    again.load_state_dict(tower.state_dict())
    prompts = ["a red circle", "a circle"]
    assert torch.equal(tower(prompts)[0], again(prompts)[0])


def test_pretrained_encoder_loads_from_a_local_path_and_stays_frozen(tmp_path):
    # What a user does with a hub id, here with a tiny random encoder saved locally.
    tokenizer = word_tokenizer(["a", "red", "circle"])
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
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "red", "</s>"]
    expected = encoder.eval()(input_ids=torch.tensor([ids])).last_hidden_state
    assert torch.allclose(emb[:1], expected, atol=1e-6)


def test_prompt_cleaning_settings():
    assert basic_clean("  Tom &amp;amp; Jerry\u2019s  ") == "Tom & Jerry's"  # as diffusers' PRXPixelPipeline
    assert web_clean("a red  circle https://example.com/x.jpg by @someone\n www.shop.com") == "a red circle by"
    assert CLEANERS["none"]("  kept  ") == "  kept  "
    vocabulary = ["a", "red", "&", "circle"]
    raw = TextTower.build(TextConfig(width=32, depth=1, heads=2, clean="none"), vocabulary)
    cleaned = TextTower.build(TextConfig(width=32, depth=1, heads=2, clean="basic"), vocabulary)
    assert raw.tokenizer.unk_token_id in raw.tokenizer("a red &amp; circle").input_ids
    assert cleaned(["a red &amp; circle"])[1].sum() == 5 and raw(["a red &amp; circle"])[1].sum() == 7
    with pytest.raises(ValueError, match="text.clean"):
        TextConfig(clean="strict").validate()
