import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pixrun.flops import (
    DINOV2_BASE_REGISTERS,
    VGG16_LPIPS_LAYERS,
    rule_of_thumb_training_flops,
    t5_encoder_forward_flops,
    t5_shape,
    training_flops,
    vgg16_lpips_forward_flops,
    vit_forward_flops,
)
from pixrun.model import PRESETS, Denoiser, ModelConfig, TokenRouting

TINY = ModelConfig(width=64, depth=3, heads=4, mlp_ratio=2.0, axes_dim=[8, 8], patch_size=8, bottleneck=16,
                   context_dim=48)


def counted_by_torch(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_tiny_denoiser_matches_a_hand_count():
    # 32 px in 8-px patches: T = 16 image tokens of P = 3·8·8 = 192 values; L = 5 text tokens; width w = 64,
    # MLP hidden h = 128, bottleneck b = 16, text width C = 48. A multiply-add is 2 FLOPs.
    T, P, L, w, h, b, C, depth = 16, 192, 5, 64, 128, 16, 48, 3
    patch_embed = 2 * T * (P * b + b * w)
    text_in = 2 * L * C * w
    time_mlp = 2 * (256 * w + w * w)  # once per image
    block = (
        2 * w * 6 * w  # adaLN modulation, once per image
        + 2 * T * w * 3 * w  # image q, k, v
        + 2 * L * w * 2 * w  # text k, v
        + 2 * 2 * T * (L + T) * w  # q·kᵀ and scores·v, keys = [text; image]
        + 2 * T * w * w  # output projection
        + 3 * 2 * T * w * h  # gate, up, down
    )
    final = 2 * w * 2 * w + 2 * T * w * P
    forward = patch_embed + text_in + time_mlp + depth * block + final
    assert forward == 5_195_776

    count = training_flops(TINY, 32, L)
    assert count.denoiser_forward == forward
    assert count.denoiser == 3 * forward
    assert count.total == 3 * forward  # no text tower, no losses asked for


def test_tread_hand_count_routes_half_the_tokens_around_the_middle_blocks():
    # TREAD 50 % over blocks[1:-1] of a 3-block model: block 1 sees 8 of the 16 image tokens.
    T, n, L, w, h = 16, 8, 5, 64, 128
    dense_block = 2 * T * w * 3 * w + 2 * 2 * T * (L + T) * w + 2 * T * w * w + 3 * 2 * T * w * h
    routed_block = 2 * n * w * 3 * w + 2 * 2 * n * (L + n) * w + 2 * n * w * w + 3 * 2 * n * w * h
    dense = training_flops(TINY, 32, L).denoiser_forward
    routed = training_flops(TINY, 32, L, routing=TokenRouting(enabled=True, fraction=0.5, start=1, end=-1))
    assert dense - routed.denoiser_forward == dense_block - routed_block
    disabled = TokenRouting(enabled=False, fraction=0.5, start=1, end=-1)
    assert training_flops(TINY, 32, L, routing=disabled).denoiser_forward == dense


def test_count_equals_torch_flop_counter_on_the_real_forward_dense_and_routed():
    with torch.device("meta"):  # shapes only; meta's attention kernel reports its FLOPs to the counter
        model = Denoiser(TINY)
        x, t, txt = torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 5, 48)
    assert counted_by_torch(lambda: model(x, t, txt)) == training_flops(TINY, 32, 5).denoiser_forward
    routing = TokenRouting(enabled=True, fraction=0.5, start=1, end=-1)
    plan = model.plan_routing(routing, 16, [torch.Generator().manual_seed(0)], "meta")
    routed = counted_by_torch(lambda: model(x, t, txt, routing=plan))
    assert routed == training_flops(TINY, 32, 5, routing=routing).denoiser_forward


def test_prx_small_pixel_at_512_px_against_the_recipe_figure():
    config = PRESETS["prx-small-pixel"]
    with torch.device("meta"):
        model = Denoiser(config)
        x, t, txt = torch.randn(1, 3, 512, 512), torch.rand(1), torch.randn(1, 64, config.context_dim)
    count = training_flops(config, 512, 64)
    assert counted_by_torch(lambda: model(x, t, txt)) == count.denoiser_forward
    # RECIPE.md: "≈ 2 TFLOP per image" from 6 · (block parameters) · tokens + attention. That rule charges the
    # adaLN modulation (6w² of each block's 22.5w² parameters) and the text K/V to every image token; in PRX the
    # modulation runs once per image and the text K/V on the text tokens, so the exact count is ≈ 1.23 TFLOP.
    assert 1.7e12 < rule_of_thumb_training_flops(config, 512, 512, 64) < 2.1e12
    assert 1.15e12 < count.denoiser < 1.3e12
    assert 4.5e12 < training_flops(config, 1024, 64).denoiser < 5.5e12  # 4× tokens, attention grows faster


def test_vgg16_lpips_count_matches_torch_on_the_conv_trunk():
    layers, channels = [], 3
    for layer in VGG16_LPIPS_LAYERS:
        if layer == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, layer, 3, padding=1), nn.ReLU()]
            channels = layer
    with torch.device("meta"):
        trunk, image = nn.Sequential(*layers), torch.randn(1, 3, 224, 224)
    trunk_flops = counted_by_torch(lambda: trunk(image))
    assert trunk_flops == pytest.approx(30.7e9, rel=0.01)  # VGG16's well-known 15.4 GMACs, less its FC head
    scoring = 2 * (64 * 224**2 + 128 * 112**2 + 256 * 56**2 + 512 * 28**2 + 512 * 14**2)  # five 1x1 convs to 1
    assert vgg16_lpips_forward_flops(224) == trunk_flops + scoring


def test_dinov2_count_matches_torch_on_the_transformers_model():
    vit = DINOV2_BASE_REGISTERS
    hf = transformers.Dinov2WithRegistersConfig(
        hidden_size=vit.width, num_hidden_layers=vit.depth, num_attention_heads=12, mlp_ratio=vit.mlp_dim // vit.width,
        patch_size=vit.patch, num_register_tokens=vit.registers, image_size=518,
    )
    with torch.device("meta"):
        model = transformers.Dinov2WithRegistersModel(hf)
        pixels = torch.randn(1, 3, 224, 224)
    assert counted_by_torch(lambda: model(pixel_values=pixels)) == vit_forward_flops(224)


def test_t5_count_matches_torch_on_the_small_text_encoder():
    hf = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=96,
                               feed_forward_proj="gated-gelu")
    encoder = transformers.T5EncoderModel(hf)
    ids = torch.randint(0, 50, (1, 7))
    assert counted_by_torch(lambda: encoder(input_ids=ids)) == t5_encoder_forward_flops(t5_shape(hf), 7)
    assert t5_shape(transformers.BertConfig()) is None


def test_loss_networks_follow_the_stated_conventions():
    routing = TokenRouting(enabled=True, fraction=0.5, start=1, end=-1)
    config = PRESETS["prx-small-pixel"]
    count = training_flops(config, 512, 64, routing=routing, lpips_size=256, pdino_size=224, repa_block=7)
    assert count.lpips == 3 * vgg16_lpips_forward_flops(256)  # x̂₀ forward + backward to x̂₀, x₀ forward
    assert count.pdino == 3 * vit_forward_flops(224)
    # REPA at 512 px: teacher at 16·14 = 224 px, forward only; the projector trains on the 128 kept tokens.
    w, hidden, d = config.width, 2048, DINOV2_BASE_REGISTERS.width
    assert count.repa == vit_forward_flops(224) + 3 * 2 * 128 * (w * hidden + hidden * hidden + hidden * d)
    assert count.losses == count.lpips + count.pdino + count.repa
    assert count.total == count.denoiser + count.losses
    assert count.as_dict()["total"] == count.total
