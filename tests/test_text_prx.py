"""The text tower of diffusers' PRX pipelines: Qwen3-VL's text model as a frozen encoder, and a tower read from a
saved PRXPipeline / PRXPixelPipeline folder that encodes prompts exactly as the pipeline's encode_prompt does. Tiny
random models, saved to tmp_path and loaded by path."""

import shutil

import pytest
import torch
import transformers

from pixrun import text
from pixrun.text import TextConfig, TextTower
from tests.helpers_prx import TOKENS, qwen3_vl, qwen_tokenizer, tiny_prx_pipeline, tiny_prx_pixel_pipeline

pytest.importorskip("diffusers")

PROMPTS = [
    "A red circle left of a blue square, photographed at dusk",  # longer than the token budget: truncated
    "Tom &amp;amp; Jerry\u2019s   ",  # entities, a curly quote and trailing spaces: cleaned
    "",  # the negative prompt of guidance
    "see www.example.com/x.jpg by @someone #1",  # what only PRXPipeline's cleaning removes
]


def pipeline_config(folder, clean: str) -> TextConfig:
    return TextConfig(encoder=str(folder), subfolder="text_encoder", tokenizer_subfolder="tokenizer", clean=clean,
                      max_tokens=TOKENS, dtype="float32")


def assert_same_encoding(states, mask, pipeline_states, pipeline_mask):
    """Same real tokens with the same states in the same order, whatever side and length each pads to."""
    assert pipeline_mask.shape == (len(PROMPTS), TOKENS) and mask.shape[1] <= TOKENS
    assert mask.sum(1).tolist() == pipeline_mask.sum(1).tolist()
    assert mask[0].all() and mask.shape[1] == TOKENS  # the long prompt fills the budget
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(states[row][mask[row]], pipeline_states[row][pipeline_mask[row]], atol=1e-5, rtol=0)
    assert not states[~mask].any()


@pytest.mark.parametrize("saved", ["Qwen3VLForConditionalGeneration", "Qwen3VLModel"])
def test_qwen3_vl_checkpoint_loads_its_text_model_only(saved, tmp_path):
    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    full = qwen3_vl(len(tokenizer))
    (full if saved == "Qwen3VLForConditionalGeneration" else full.model).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tower = TextTower.build(TextConfig(encoder=str(tmp_path), dtype="float32", max_tokens=8), [])
    assert type(tower.encoder) is transformers.Qwen3VLTextModel and tower.dim == 16
    reference = full.model.language_model.eval()
    for name, weight in reference.state_dict().items():  # every weight from the checkpoint, none left random
        assert torch.equal(tower.encoder.state_dict()[name], weight), name
    assert not any(p.requires_grad for p in tower.encoder.parameters())

    prompts = ["a red circle left of a blue square", "red", ""]
    states, mask = tower(prompts)
    assert mask.sum(1).tolist() == [8, 3, 0]  # truncated; Qwen's tokenizer gives "" no token
    for row, prompt in enumerate(prompts[:2]):
        ids = tokenizer(prompt, truncation=True, max_length=8, return_tensors="pt").input_ids
        with torch.no_grad():
            alone = reference(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(states[row][mask[row]], alone, atol=1e-5, rtol=0)


def test_an_encoder_missing_from_the_checkpoint_is_refused(tmp_path, monkeypatch):
    qwen3_vl(40).save_pretrained(tmp_path)
    qwen_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(text, "LANGUAGE_MODEL_KEYS", {})  # the text model's weights no longer found under their prefix
    with pytest.raises(ValueError, match="holds no weights for 24 of Qwen3VLTextModel's .*text.encoder_class"):
        TextTower.build(TextConfig(encoder=str(tmp_path)), [])


def test_tower_encodes_as_prx_pixel_pipeline(tmp_path):
    from diffusers import PRXPixelPipeline

    folder = tiny_prx_pixel_pipeline(tmp_path / "pipeline")
    pipeline = PRXPixelPipeline.from_pretrained(folder)
    pipeline_states, pipeline_mask, _, _ = pipeline.encode_prompt(PROMPTS, "cpu", do_classifier_free_guidance=False)
    config = pipeline_config(folder, clean="basic")
    tower = TextTower.build(config, [], run_dir=tmp_path / "run")
    assert type(tower.encoder) is transformers.Qwen3VLTextModel
    states, mask = tower(PROMPTS)
    assert_same_encoding(states, mask, pipeline_states, pipeline_mask)
    assert torch.equal(mask, pipeline_mask[:, : mask.shape[1]])  # both pad on the right

    again = TextTower.load(config, tmp_path / "run")  # a resumed run's tower
    assert torch.equal(again(PROMPTS)[0], states)


def test_tower_encodes_as_prx_pipeline_with_its_cleaning(tmp_path):
    from diffusers import PRXPipeline

    folder = tiny_prx_pipeline(tmp_path / "pipeline", vae=False)
    pipeline = PRXPipeline.from_pretrained(folder)
    pipeline_states, pipeline_mask, _, _ = pipeline.encode_prompt(PROMPTS, "cpu", do_classifier_free_guidance=False)
    assert not pipeline_mask[:, 0].all()  # Gemma's tokenizer pads on the left, the tower on the right
    tower = TextTower.build(pipeline_config(folder, clean="prx"), [])
    assert type(tower.encoder).__name__ == "T5GemmaEncoder" and tower.dim == 16
    states, mask = tower(PROMPTS)
    assert_same_encoding(states, mask, pipeline_states, pipeline_mask)
    assert mask[2].sum() == 1  # the empty prompt is <bos> alone

    # The light cleaning keeps what PRXPipeline's removes, so it would condition on other tokens.
    basic = TextTower.build(pipeline_config(folder, clean="basic"), [])
    assert basic(PROMPTS)[1].sum(1).tolist() != pipeline_mask.sum(1).tolist()


def test_subfolders_are_in_the_identity_only_when_set(tmp_path):
    folder = tiny_prx_pixel_pipeline(tmp_path)
    identity = TextTower.build(pipeline_config(folder, clean="basic"), []).identity()
    assert identity["subfolder"] == "text_encoder" and identity["tokenizer_subfolder"] == "tokenizer"
    # The encoder folder alone, its tokenizer beside it: the same identity but for the naming, and without the
    # subfolders, as identities were before they existed (caches and prepared shards made then still match).
    shutil.copytree(folder / "tokenizer", folder / "text_encoder", dirs_exist_ok=True)
    alone = TextConfig(encoder=str(folder / "text_encoder"), max_tokens=TOKENS, dtype="float32")
    alone_identity = TextTower.build(alone, []).identity()
    unplaced = {k: v for k, v in identity.items() if k not in ("subfolder", "tokenizer_subfolder")}
    assert alone_identity == {**unplaced, "encoder": alone.encoder}
    with pytest.raises(ValueError, match="text.subfolder"):
        TextConfig(subfolder="text_encoder").validate()
