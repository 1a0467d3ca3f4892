import pytest
import torch

from pixrun.model import PRESETS, Denoiser, ModelConfig, count_parameters

TINY = {"width": 64, "depth": 2, "heads": 4, "axes_dim": [8, 8], "patch_size": 8, "bottleneck": 32, "context_dim": 48}


def diffusers_twin(c: ModelConfig):
    from diffusers import PRXTransformer2DModel

    return PRXTransformer2DModel(
        in_channels=c.in_channels, patch_size=c.patch_size, context_in_dim=c.context_dim, hidden_size=c.width,
        mlp_ratio=c.mlp_ratio, num_heads=c.heads, depth=c.depth, axes_dim=c.axes_dim, theta=int(c.rope_theta),
        bottleneck_size=c.bottleneck, resolution_embeds=c.resolution_embeds,
    )


@pytest.mark.parametrize("bottleneck", [32, None])
@pytest.mark.parametrize("resolution_embeds", [False, True])
def test_same_output_as_diffusers_prx_transformer(bottleneck, resolution_embeds):
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "bottleneck": bottleneck, "resolution_embeds": resolution_embeds})
    ours = Denoiser(config)
    for p in ours.parameters():  # zero-initialised layers would hide mistakes
        torch.nn.init.normal_(p, std=0.05)
    theirs = diffusers_twin(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    x, t, txt = torch.randn(2, 3, 32, 48), torch.rand(2), torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ours_out = ours(x, t, txt, mask)
        theirs_out = theirs(x, t, txt, mask).sample
    assert ours_out.shape == x.shape
    assert (ours_out - theirs_out).abs().max() < 1e-5


def test_padding_tokens_are_ignored():
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(**TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, txt = torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    garbage = txt.clone()
    garbage[:, 3:] = 100.0
    with torch.no_grad():
        assert torch.allclose(model(x, t, txt, mask), model(x, t, garbage, mask), atol=1e-6)
        assert not torch.allclose(model(x, t, txt, None), model(x, t, garbage, None), atol=1e-3)


def test_prx_small_pixel_preset_is_about_1_2_billion_parameters():
    with torch.device("meta"):
        model = Denoiser(PRESETS["prx-small-pixel"])
    assert 1.1e9 < count_parameters(model) < 1.3e9
    assert model.img_in[0].weight.shape == (256, 3 * 32 * 32)


def test_fresh_model_predicts_zero_and_starts_as_identity_blocks():
    model = Denoiser(ModelConfig(**TINY))
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 3, 48))
    assert out.abs().max() == 0  # zero-initialised final layer


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(width=65, heads=4).validate()
    with pytest.raises(ValueError, match="axes_dim"):
        ModelConfig(width=64, heads=4, axes_dim=[8, 6]).validate()
