import pytest
import torch

import pixrun.model
from pixrun.export import transformer_kwargs
from pixrun.model import (
    PRESETS,
    Denoiser,
    ModelConfig,
    TokenRouting,
    apply_rope,
    attention_bias,
    count_parameters,
    rope_angles,
)

TINY = {"width": 64, "depth": 2, "heads": 4, "axes_dim": [8, 8], "patch_size": 8, "bottleneck": 32, "context_dim": 48}


@pytest.mark.parametrize("bottleneck", [32, None])
@pytest.mark.parametrize(("resolution_embeds", "time_factor", "time_max_period"),
                         [(False, 1000.0, 10000.0), (True, 500.0, 2000.0)])
def test_same_output_as_diffusers_prx_transformer(bottleneck, resolution_embeds, time_factor, time_max_period):
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "bottleneck": bottleneck, "resolution_embeds": resolution_embeds,
                            "time_factor": time_factor, "time_max_period": time_max_period})
    ours = Denoiser(config)
    for p in ours.parameters():  # zero-initialised layers would hide mistakes
        torch.nn.init.normal_(p, std=0.05)
    theirs = PRXTransformer2DModel(**transformer_kwargs(config))  # as `pixrun export` and `pixrun bench` build it
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
    seen = []  # (input image tokens, output) of each block
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 3, 48))
    assert out.abs().max() == 0  # zero-initialised final layer
    assert len(seen) == 2 and seen[0][0].abs().max() > 0
    for tokens, block_out in seen:  # zero-initialised adaLN gates: attention and MLP add nothing yet
        assert torch.equal(block_out, tokens)


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(width=65, heads=4).validate()
    with pytest.raises(ValueError, match="axes_dim"):
        ModelConfig(width=64, heads=4, axes_dim=[8, 6]).validate()


def reference_forward(model: Denoiser, x, t, txt, txt_mask):
    """The forward as it was before the bias and RoPE were made once per forward: angles recomputed and the boolean
    mask rebuilt inside every block (SDPA turns it into -inf itself)."""
    import torch.nn.functional as F

    from pixrun.model import patchify, rope_angles, timestep_embedding, unpatchify

    c, (b, _, h, w) = model.config, x.shape
    img, txt = model.img_in(patchify(x, c.patch_size)), model.txt_in(txt)
    angles = rope_angles(h // c.patch_size, w // c.patch_size, c.axes_dim, c.rope_theta, x.device).float()
    rope = (angles.cos(), angles.sin())
    vec = model.time_in(timestep_embedding(t, 256, c.time_max_period, c.time_factor))
    for block in model.blocks:
        attn, n = block.attention, img.shape[1]
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = block.modulation(vec)
        y = (1 + scale) * block.img_pre_norm(img) + shift
        q, k, v = attn.img_qkv_proj(y).view(b, n, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(attn.norm_q(q), rope), apply_rope(attn.norm_k(k), rope)
        txt_k, txt_v = attn.txt_kv_proj(txt).view(b, txt.shape[1], 2, attn.heads, -1).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([attn.norm_added_k(txt_k), k], dim=2), torch.cat([txt_v, v], dim=2)
        mask = None
        if txt_mask is not None:
            mask = torch.cat([txt_mask, txt_mask.new_ones(b, n)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, -1)
        img = img + gate * attn.to_out[0](out)
        y = (1 + mlp_scale) * block.post_attention_layernorm(img) + mlp_shift
        img = img + mlp_gate * block.down_proj(F.gelu(block.gate_proj(y), approximate="tanh") * block.up_proj(y))
    return unpatchify(model.final_layer(img, vec), c.patch_size, h, w)


def random_model(**overrides) -> Denoiser:
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(**{**TINY, **overrides}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("padded", [True, False])
def test_same_output_as_the_per_block_mask_and_angles(padded):
    model = random_model()
    x, t, txt = torch.randn(3, 3, 32, 40), torch.rand(3), torch.randn(3, 7, 48)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 2:], mask[2, 6:] = False, False
    with torch.no_grad():
        if padded:
            ours, reference = model(x, t, txt, mask), reference_forward(model, x, t, txt, mask)
        else:  # no mask, and a mask with nothing padded, are the same thing
            ours, reference = model(x, t, txt, None), reference_forward(model, x, t, txt, torch.ones_like(mask))
    assert (ours - reference).abs().max() < 1e-5


def recorded(function, calls: list):
    """`function`, appending (args, result) of each call to `calls`."""

    def wrapper(*args):
        calls.append((args, function(*args)))
        return calls[-1][1]

    return wrapper


def test_attention_bias_is_built_once_per_forward_and_shared_by_every_block(monkeypatch):
    model = random_model(depth=4)
    x, t, txt = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    built = []
    monkeypatch.setattr(pixrun.model, "attention_bias", recorded(attention_bias, built))
    seen = []
    for block in model.blocks:
        block.attention.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    with torch.no_grad():
        model(x, t, txt, mask)
    assert len(built) == 1 and len(seen) == 4
    bias = built[0][1]
    assert all(block_bias is bias for block_bias in seen)
    assert bias.shape == (2, 1, 1, 5 + 16) and bias.dtype == torch.float32
    assert bias.stride(0) % 8 == 0  # rows aligned for the memory-efficient kernel
    assert torch.equal(bias[:, 0, 0, :5].isinf(), ~mask) and (bias[..., 5:] == 0).all()
    seen.clear()
    with torch.no_grad():
        model(x, t, txt, None)
    assert seen == [None] * 4  # nothing padded: no mask at all, so the flash kernel may run


def test_routed_blocks_take_a_prefix_of_the_same_bias():
    model = random_model(depth=4)
    x, t, txt = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = model.plan_routing(TokenRouting(fraction=0.5), 16, [torch.Generator().manual_seed(i) for i in (0, 1)], "cpu")
    seen = []
    for block in model.blocks:
        block.attention.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    with torch.no_grad():
        model(x, t, txt, mask, routing=plan)
    assert [bias.shape[-1] for bias in seen] == [5 + 16, 5 + 8, 5 + 8, 5 + 16]
    assert len({bias.data_ptr() for bias in seen}) == 1


def test_rope_is_computed_once_per_grid_and_kept_out_of_the_state_dict(monkeypatch):
    model = random_model()
    x, t, txt = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 5, 48)
    calls = []
    monkeypatch.setattr(pixrun.model, "rope_angles", recorded(rope_angles, calls))
    with torch.no_grad():
        first = model(x, t, txt)
        second = model(x, t, txt)
        model(torch.randn(1, 3, 16, 32), t[:1], txt[:1])
    assert torch.equal(first, second)
    assert [args[:2] for args, _ in calls] == [(4, 4), (2, 4)]  # the second forward on a 4x4 grid hit the cache
    cos, sin = model.rope(4, 4, torch.device("cpu"))
    angles = rope_angles(4, 4, model.config.axes_dim, model.config.rope_theta, "cpu")
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())  # cos, sin in float64
    assert not any("rope" in name for name in model.state_dict())


def test_a_sample_routes_the_same_whichever_batch_it_is_in():
    model = random_model(depth=4)
    routing = TokenRouting(fraction=0.5)

    def seeded(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    alone = model.plan_routing(routing, 64, seeded(7), "cpu").kept_index
    batch = model.plan_routing(routing, 64, seeded(3, 7, 11), "cpu").kept_index
    assert batch.shape == (3, 32) and (batch.diff(dim=1) > 0).all()
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(model.plan_routing(routing, 64, seeded(11, 3), "cpu").kept_index, batch[[2, 0]])


def test_rms_norm_in_fp32_with_bf16_weights_takes_the_fused_kernel_and_the_same_values():
    import warnings

    from pixrun.model import RMSNorm

    norm = RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.rms_norm(x.float(), (64,), norm.weight.bfloat16().float(), 1e-6).bfloat16()
    norm.bfloat16()  # as FSDP2 gathers it under bf16 mixed precision
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when mismatched dtypes send it to the composite kernel
        assert torch.equal(norm(x), expected)
