from pathlib import Path

import pytest
import torch
import transformers

from pixrun.config import load_config
from pixrun.flops import denoiser_flops, text_encoder_flops, training_flops
from pixrun.losses import counted_flops, perceptual_flops
from pixrun.losses.lpips import LPIPS
from pixrun.model import PRESETS, ModelConfig, TokenRouting
from pixrun.text import TextConfig

CONFIGS = Path(__file__).parent.parent / "configs"
TINY = ModelConfig(width=64, depth=3, heads=4, mlp_ratio=2.0, axes_dim=[8, 8], patch_size=8, bottleneck=16,
                   context_dim=48)
# 32 px in 8-px patches: T = 16 image tokens of P = 3·8·8 = 192 values; L = 5 text tokens; width w = 64, MLP hidden
# h = 128, bottleneck b = 16, text width C = 48. A multiply-add is 2 FLOPs.
T, P, L, w, h, b, C = 16, 192, 5, 64, 128, 16, 48


def block_forward(tokens: int) -> int:
    return (
        2 * tokens * w * 3 * w  # image q, k, v
        + 2 * L * w * 2 * w  # text k, v
        + 2 * 2 * tokens * (L + tokens) * w  # q·kᵀ and scores·v, keys = [text; image]
        + 2 * tokens * w * w  # output projection
        + 3 * 2 * tokens * w * h  # gate, up, down
    )


def test_tiny_denoiser_matches_a_hand_count_forward_and_backward():
    patch_embed = 2 * T * (P * b + b * w)
    text_in = 2 * L * C * w
    time_mlp = 2 * (256 * w + w * w)  # once per image
    modulation = 2 * w * 6 * w  # adaLN, once per image per block
    final = 2 * w * 2 * w + 2 * T * w * P
    forward = patch_embed + text_in + time_mlp + 3 * (modulation + block_forward(T)) + final
    assert forward == 5_195_776
    # the backward is the forward twice over, less the input gradients nothing asks for: of the pixels' patch
    # embedding and of the timestep sinusoid, and of the text states unless the text tower trains
    unneeded = 2 * T * P * b + 2 * 256 * w
    assert denoiser_flops(TINY, 32, L) == (forward, 3 * forward - unneeded - text_in)
    assert denoiser_flops(TINY, 32, L, text_trained=True) == (forward, 3 * forward - unneeded)


def test_tread_routes_half_the_tokens_around_the_middle_block():
    # TREAD 50 % over blocks[1:-1] of a 3-block model: block 1 sees 8 of the 16 image tokens, as queries and keys
    dense, _ = denoiser_flops(TINY, 32, L)
    routed, _ = denoiser_flops(TINY, 32, L, TokenRouting(enabled=True, fraction=0.5, start=1, end=-1))
    assert dense - routed == block_forward(T) - block_forward(T // 2)


def test_prx_small_pixel_at_512_px_is_well_under_the_recipe_rule_of_thumb():
    # RECIPE.md's "≈ 2 TFLOP per image" comes from 6 · (block parameters) · tokens; in PRX the adaLN modulation
    # runs once per image and the text K/V on the text tokens, so the count is ≈ 1.22 TFLOP (docs/bench.md)
    forward, training = denoiser_flops(PRESETS["prx-small-pixel"], 512, 64)
    assert 1.15e12 < training < 1.3e12 and training == pytest.approx(3 * forward, rel=1e-3)


def t5gemma_encoder(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ff: int):
    module = transformers.T5GemmaModuleConfig(
        vocab_size=40, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
    )
    return transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=40, is_encoder_decoder=False)


@pytest.mark.parametrize("family", ["t5", "t5gemma"])
def test_any_transformers_text_encoder_is_counted_frozen_or_trained(family):
    tokens = 7
    if family == "t5":  # the small jointly trained encoder: width 32, inner 2 · 16, gated FF 96, 2 layers
        encoder = transformers.T5Config(vocab_size=50, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=96,
                                        feed_forward_proj="gated-gelu")
        per_layer = 2 * tokens * 32 * 3 * 32 + 4 * tokens**2 * 32 + 2 * tokens * 32 * 32 + 3 * 2 * tokens * 32 * 96
        layers = 2
    else:  # T5Gemma's encoder: grouped-query attention (2 query heads, 1 key/value head of 8), gated FF 32
        encoder = t5gemma_encoder(layers=1, hidden=16, heads=2, kv_heads=1, head_dim=8, ff=32)
        per_layer = (2 * tokens * 16 * (16 + 2 * 8) + 4 * tokens**2 * 16 + 2 * tokens * 16 * 16
                     + 3 * 2 * tokens * 16 * 32)
        layers = 1
    assert text_encoder_flops(TextConfig(), encoder, tokens, trained=False) == layers * per_layer
    assert text_encoder_flops(TextConfig(), encoder, tokens, trained=True) == 3 * layers * per_layer


def test_lpips_is_vgg16_forward_on_both_images_and_backward_to_the_prediction():
    with torch.device("meta"):
        lpips = LPIPS(downsample=1.0)
        image = torch.empty(1, 3, 224, 224)
    trunk = counted_flops(lambda: lpips.vgg(image))
    assert trunk == pytest.approx(30.7e9, rel=0.01)  # VGG16's well-known 15.4 GMACs, less its FC head
    assert perceptual_flops(lpips, 224) == 3 * trunk


def vit_b14_forward(size: int) -> tuple[int, int]:
    """DINOv2 ViT-B/14 with 4 registers on one size² image, by hand: all of it, and its attention (q·kᵀ, scores·v)."""
    patches, width, mlp = (size // 14) ** 2, 768, 3072
    tokens = 1 + 4 + patches
    attention = 12 * 4 * tokens**2 * width
    linear = 12 * (2 * tokens * width * 4 * width + 2 * 2 * tokens * width * mlp) + 2 * patches * 3 * 14**2 * width
    return linear + attention, attention


def test_the_recipe_losses_count_dinov2_b14_and_follow_the_stage(tmp_path):
    # a DINOv2-B/14 with registers as a local folder holds it: only its config is read, no weights are needed
    transformers.Dinov2WithRegistersConfig(patch_size=14, image_size=518).save_pretrained(tmp_path / "dino")
    config = load_config(CONFIGS / "prx-speedrun-cpu.yaml", [
        f"pdino.source={tmp_path / 'dino'}", "pdino.random_init=false", "pdino.size=224",
        f"repa.teacher={tmp_path / 'dino'}", "repa.random_init=false",
    ])
    first, second = training_flops(config, 0, 8), training_flops(config, 6, 8)
    # forward on x̂₀ and x₀, and a backward to x̂₀: one forward's worth through the frozen weights, but two through
    # attention, whose products need the gradients of both their operands
    forward, attention = vit_b14_forward(224)
    assert first.terms["pdino"] == second.terms["pdino"] == 3 * forward + attention
    # stage 1, 32 px: the teacher sees the 4x4 token grid at 56 px, forward only; the projector (64 -> 64 -> 64 ->
    # 768) trains on the tokens that reached block 1, 8 of 16 under TREAD
    projector = 2 * 8 * (64 * 64 + 64 * 64 + 64 * 768)
    assert first.terms["repa"] == vit_b14_forward(56)[0] + 3 * projector
    assert second.terms["repa"] == 0  # stage 2 runs lpips and pdino only
    with torch.device("meta"):
        lpips = LPIPS(0.5)
    assert (first.terms["lpips"], second.terms["lpips"]) == (perceptual_flops(lpips, 32), perceptual_flops(lpips, 64))
    assert first.denoiser == denoiser_flops(config.model, 32, 8, config.tread, text_trained=True)[1]
    assert first.total == first.denoiser + sum(first.terms.values())  # no text encoder given


def test_routing_losses_and_text_encoder_as_the_config_switches_them(tiny_config):
    config = tiny_config(model__depth=4, repa__weight=0.5, repa__block=2, repa__until_step=100, repa__hidden=64,
                         repa__random_init=True)
    off = training_flops(config, 0, 8)
    assert off.terms["lpips"] == off.terms["pdino"] == 0 and off.text_encoder == 0
    config.tread = TokenRouting(enabled=True, fraction=0.5, start=1, end=-1)
    routed = training_flops(config, 99, 8)
    # the projector sees the kept tokens only
    assert routed.denoiser < off.denoiser and routed.terms["repa"] < off.terms["repa"]
    assert training_flops(config, 100, 8).terms["repa"] == 0  # REPA switched off from until_step on
    encoder = transformers.T5Config(d_model=32, d_kv=16, num_heads=2, num_layers=1, d_ff=96)
    trained = training_flops(config, 0, 8, encoder)
    assert trained.text_encoder == text_encoder_flops(config.text, encoder, 8, trained=True) > 0
    assert trained.total == trained.denoiser + trained.text_encoder + trained.terms["repa"]


def test_latent_space_counts_the_denoiser_on_the_latent_grid_and_the_vae_where_it_runs(tiny_config, tmp_path):
    from pixrun.latent import Autoencoder, LatentConfig
    from tests.test_latent import tiny_kl

    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(tiny_kl(tmp_path / "vae"))))  # 2x, 4 channels
    config = tiny_config(model__patch_size=2, model__in_channels=4, lpips__weight=0.5, lpips__random_init=True)
    resolution = config.data.resolution
    on_the_fly = training_flops(config, 0, 8, autoencoder=autoencoder)
    prepared = training_flops(config, 0, 8, autoencoder=autoencoder, prepared_latents=True)
    assert on_the_fly.denoiser == denoiser_flops(config.model, resolution // 2, 8, text_trained=True)[1]
    # the image losses stay at the pixels' size
    assert on_the_fly.terms["lpips"] == training_flops(config, 0, 8).terms["lpips"]
    # the decoder runs forward and backward to x̂₀ (LPIPS is on); the encoder only where latents are not prepared
    assert 0 < prepared.autoencoder < on_the_fly.autoencoder
    config.lpips.weight = 0.0
    assert training_flops(config, 0, 8, autoencoder=autoencoder, prepared_latents=True).autoencoder == 0
    assert on_the_fly.total == (on_the_fly.denoiser + on_the_fly.terms["lpips"] + on_the_fly.autoencoder)
