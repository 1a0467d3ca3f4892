import math
import string

import pytest
import torch
import transformers
from transformers.image_utils import OPENAI_CLIP_STD

from pixrun.errors import WeightsMissingError
from pixrun.metrics import (
    MetricsConfig,
    alignment_scores,
    generate_images,
    load_networks,
    quality_metrics,
    shapes_quality_metrics,
    shapes_reference,
)
from pixrun.metrics.alignment import build_alignment_network, clip_pixel_values
from pixrun.pipeline import Pipeline, build_world
from pixrun.text import TextTower

IMAGE_SIZE = 32
PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a green cross", "an orange diamond above a tree"]


def clip_vocab() -> dict[str, int]:
    """Letters, alone and word-final, with CLIP's special tokens last (the end token is the largest id, as in
    CLIP's own vocabulary)."""
    vocab = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip_model(seed: int = 0) -> transformers.CLIPModel:
    vocab = clip_vocab()
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        # a 16-token context: the longer prompts are truncated, as real ones are at 77
        text_config={"vocab_size": len(vocab), "max_position_embeddings": 16, **special, **tiny},
        vision_config={"image_size": IMAGE_SIZE, "patch_size": 8, **tiny},
        projection_dim=8,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval()


def save_tokenizer(path) -> str:
    transformers.CLIPTokenizer(vocab=clip_vocab(), merges=[]).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_clip(tmp_path):
    """A tiny random CLIPModel with its tokenizer in one folder, as openai/clip-vit-large-patch14 is."""
    path = tmp_path / "clip"
    tiny_clip_model().save_pretrained(path)
    return save_tokenizer(path)


@pytest.fixture
def tiny_pickscore(tmp_path):
    """A tiny random CLIPModel alone, its tokenizer in another folder, as PickScore_v1 and laion's CLIP-H are."""
    tiny_clip_model(seed=1).save_pretrained(tmp_path / "pickscore")
    return str(tmp_path / "pickscore"), save_tokenizer(tmp_path / "processor")


def random_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (count, 3, height, width), generator=g).float() / 127.5 - 1)


# --- preprocessing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, size", [(64, 64, 224), (64, 64, 32), (300, 260, 224), (24, 40, 32)])
def test_pixel_values_match_clip_image_processor(height, width, size):
    images = random_images(2, height, width)
    uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size})
    expected = processor(images=list(uint8), return_tensors="pt")["pixel_values"]
    got = clip_pixel_values(images, size)
    assert got.shape == expected.shape == (2, 3, size, size)
    # PIL's fixed-point arithmetic rounds a few pixels one or two 8-bit levels the other way
    assert (got - expected).abs().max() <= 2 / 255 / min(OPENAI_CLIP_STD) + 1e-5
    assert (got - expected).abs().mean() < 0.05 / 255


# --- closed forms ---------------------------------------------------------------------------------------------------


def fixed_embedding_clip(path, angle: float, logit_scale: float) -> str:
    """A CLIP model whose image embedding is (1, 0, ...) and text embedding (cos angle, sin angle, ...) for any
    input: the final layer norms output their bias alone, which the projections map to those directions."""
    model = tiny_clip_model()
    with torch.no_grad():
        for norm, projection, direction in (
            (model.vision_model.post_layernorm, model.visual_projection, (3.0, 0.0)),
            (model.text_model.final_layer_norm, model.text_projection, (2 * math.cos(angle), 2 * math.sin(angle))),
        ):
            norm.weight.zero_()
            norm.bias.zero_()
            norm.bias[:2] = torch.tensor(direction)
            projection.weight.zero_()
            projection.weight[0, 0] = projection.weight[1, 1] = 1.0
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(path)
    return save_tokenizer(path)


@pytest.mark.parametrize("degrees, clip_score, pick_fraction", [(0, 100.0, 1.0), (60, 50.0, 0.5), (90, 0.0, 0.0),
                                                               (180, 0.0, -1.0)])
def test_scores_of_known_angles(tmp_path, degrees, clip_score, pick_fraction):
    path = fixed_embedding_clip(tmp_path / "clip", math.radians(degrees), math.log(50.0))
    networks = {"clip_score": build_alignment_network("clip_score", path, path),
                "pickscore": build_alignment_network("pickscore", path, path)}
    scores = alignment_scores(random_images(3, 16, 16), PROMPTS[:3], networks, batch_size=2)
    assert scores["clip_score"] == pytest.approx(clip_score, abs=1e-4)  # 100 * max(cos, 0): 0 when opposite
    assert scores["pickscore"] == pytest.approx(50.0 * pick_fraction, abs=1e-4)  # logit_scale.exp() * cos


def test_pickscore_follows_the_reference_recipe(tiny_pickscore):
    """PickScore's published code: processor and tokenizer, get_*_features, normalised, logit_scale.exp() * dot."""
    model_path, processor_path = tiny_pickscore
    images = random_images(4, 48, 48, seed=3)
    network = build_alignment_network("pickscore", model_path, processor_path)
    ours = network(images, PROMPTS)

    model = transformers.CLIPModel.from_pretrained(model_path).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(processor_path)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        image_embs = model.get_image_features(**processor(images=list(uint8), return_tensors="pt")).pooler_output
        text_inputs = tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text_embs = model.get_text_features(**text_inputs).pooler_output
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp() * (image_embs * text_embs).sum(-1)
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)
    assert expected.std() > 1e-2  # the pairs score differently: the comparison is not of one constant


# --- loading, and the metrics' entry points ------------------------------------------------------------------------


def test_missing_models_and_tokenizers_say_what_to_download(tmp_path, tiny_pickscore):
    model_path, processor_path = tiny_pickscore
    with pytest.raises(WeightsMissingError, match="PickScore network") as info:
        build_alignment_network("pickscore", str(tmp_path / "absent"), processor_path)
    assert "\n" not in str(info.value)
    # a model folder without a tokenizer: transformers would make a 3-token one there without a word
    with pytest.raises(WeightsMissingError, match="metrics.pickscore_processor"):
        build_alignment_network("pickscore", model_path, model_path)
    with pytest.raises(WeightsMissingError, match="metrics.clip_score"):
        build_alignment_network("clip_score", model_path, model_path)


def test_quality_metrics_score_images_against_their_captions(tiny_clip, tiny_pickscore):
    model_path, processor_path = tiny_pickscore
    config = MetricsConfig(metrics=["clip_score", "pickscore"], clip_score=tiny_clip, pickscore=model_path,
                           pickscore_processor=processor_path, batch_size=3)
    networks = load_networks(config)
    assert set(networks) == {"clip_score", "pickscore"}
    images = random_images(4, 32, 32, seed=5)
    scores = quality_metrics(images, images, config, networks, PROMPTS)
    assert set(scores) == {"clip_score", "pickscore"}
    per_pair = {name: network(images, PROMPTS) for name, network in networks.items()}
    assert scores == pytest.approx({name: values.double().mean().item() for name, values in per_pair.items()})
    other_order = quality_metrics(images, images, config, networks, PROMPTS[::-1])
    assert other_order["pickscore"] != pytest.approx(scores["pickscore"])  # the captions are the images' own

    with pytest.raises(ValueError, match="pass their captions"):
        quality_metrics(images, images, config, networks)
    with pytest.raises(ValueError, match="4 images for 3 prompts"):
        quality_metrics(images, images, config, networks, PROMPTS[:3])


def test_shapes_quality_metrics_score_the_generated_images_against_their_prompts(tiny_pickscore, tiny_config):
    model_path, processor_path = tiny_pickscore
    config = MetricsConfig(metrics=["pickscore"], pickscore=model_path, pickscore_processor=processor_path,
                           num_images=3, batch_size=2)
    pipeline_config = tiny_config()
    torch.manual_seed(0)
    world = build_world(pipeline_config)
    text_tower = TextTower.build(pipeline_config.text, world.vocabulary())
    pipeline = Pipeline.from_config(pipeline_config, text_tower).eval()
    with torch.no_grad():  # the final layer starts at zero; random values make the images differ
        for p in pipeline.denoiser.final_layer.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    networks = load_networks(config)
    scores = shapes_quality_metrics(pipeline, world, config, networks)

    captions = shapes_reference(world, pipeline.resolution, config.num_images, config.seed).captions
    generated = generate_images(pipeline, captions, config.seed, config.batch_size)
    expected = alignment_scores(generated, captions, networks)
    assert scores == pytest.approx(expected) and scores["pickscore"] != 0
    other_prompts = alignment_scores(generated, captions[1:] + captions[:1], networks)
    assert other_prompts["pickscore"] != pytest.approx(scores["pickscore"])
