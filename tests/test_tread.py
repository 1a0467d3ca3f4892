import pytest
import torch

from pixrun.model import Denoiser, ModelConfig, RoutePlan, TokenRouting

TINY = {"width": 64, "depth": 4, "heads": 4, "axes_dim": [8, 8], "patch_size": 8, "bottleneck": 32, "context_dim": 48}


def generators(batch: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def random_model(**overrides) -> Denoiser:
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(**{**TINY, **overrides}))
    for p in model.parameters():  # zero-initialised layers would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(batch=2, height=32, width=32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, height, width, generator=gen)
    t, txt = torch.rand(batch, generator=gen), torch.randn(batch, 5, 48, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, txt, mask


def test_recipe_routes_from_the_second_to_the_penultimate_block():
    assert TokenRouting().blocks(16) == range(1, 15)
    with pytest.raises(ValueError, match="no block"):
        TokenRouting(start=3, end=-1).blocks(4)
    with pytest.raises(ValueError, match="fraction"):
        TokenRouting(fraction=1.0).blocks(4)


def test_kept_index_is_sorted_distinct_per_sample_and_reproducible():
    model = random_model()
    plan = model.plan_routing(TokenRouting(fraction=0.5), 16, generators(8, 3), "cpu")
    assert plan.kept_index.shape == (8, 8)
    assert (plan.kept_index.diff(dim=1) > 0).all()  # sorted, hence distinct
    assert len({tuple(row.tolist()) for row in plan.kept_index}) > 1  # chosen per sample
    again = model.plan_routing(TokenRouting(fraction=0.5), 16, generators(8, 3), "cpu")
    assert torch.equal(plan.kept_index, again.kept_index)


def test_fraction_zero_equals_dense():
    model = random_model()
    x, t, txt, mask = inputs()
    plan = model.plan_routing(TokenRouting(fraction=0.0), 16, generators(2, 0), "cpu")
    with torch.no_grad():
        assert torch.allclose(model(x, t, txt, mask, routing=plan), model(x, t, txt, mask), atol=1e-6)


def test_routed_tokens_skip_the_routed_blocks_and_come_back_in_place():
    model = random_model()  # depth 4: blocks 1 and 2 are routed
    x, t, txt, mask = inputs()
    plan = model.plan_routing(TokenRouting(fraction=0.5), 16, generators(2, 0), "cpu")
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.update(before=out))
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.update(routed_in=args[0], rope=args[3]))
    model.blocks[3].register_forward_pre_hook(lambda m, args: seen.update(after=args[0]))
    with torch.no_grad():
        out = model(x, t, txt, mask, routing=plan)
    assert out.shape == x.shape
    assert seen["routed_in"].shape == (2, 8, 64)
    cos, sin = model.rope(4, 4, torch.device("cpu"))
    routed_cos, routed_sin = seen["rope"]
    assert torch.equal(routed_cos[:, 0], cos[plan.kept_index]) and torch.equal(routed_sin[:, 0], sin[plan.kept_index])
    for b in range(2):
        kept = torch.zeros(16, dtype=torch.bool)
        kept[plan.kept_index[b]] = True
        assert torch.equal(seen["after"][b, ~kept], seen["before"][b, ~kept])  # untouched, at their positions
        assert not torch.allclose(seen["after"][b, kept], seen["before"][b, kept])


def test_kept_tokens_see_only_each_other_at_their_own_positions():
    # Routing through every block and keeping the top half of the grid must give, there, exactly what the
    # dense model gives on the top half of the image: same tokens, same RoPE positions, same keys.
    model = random_model(depth=3)
    x, t, txt, mask = inputs(height=32, width=32)
    plan = RoutePlan(torch.arange(8).expand(2, 8), range(3))
    with torch.no_grad():
        routed = model(x, t, txt, mask, routing=plan)
        cropped = model(x[:, :, :16], t, txt, mask)
    assert torch.allclose(routed[:, :, :16], cropped, atol=1e-5)


def test_gradients_reach_every_parameter_through_a_routed_forward():
    model = random_model()
    x, t, txt, mask = inputs()
    plan = model.plan_routing(TokenRouting(fraction=0.5), 16, generators(2, 0), "cpu")
    model(x, t, txt, mask, routing=plan).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plan_tells_which_tokens_each_block_sees():
    model = random_model()
    plan = model.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu")
    assert plan.tokens_at(0) is None and plan.tokens_at(3) is None
    assert plan.tokens_at(1) is plan.kept_index and plan.tokens_at(2) is plan.kept_index


@pytest.mark.parametrize("block", [0, 1, 2, 3])
@pytest.mark.parametrize("routed", [False, True])
def test_the_hidden_state_asked_for_is_the_blocks_output_and_leaves_the_prediction_alone(block, routed):
    model = random_model()
    x, t, txt, mask = inputs()
    plan = model.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu") if routed else None
    seen = []
    hook = model.blocks[block].register_forward_hook(lambda module, args, output: seen.append(output))
    out, hidden = model(x, t, txt, mask, routing=plan, hidden_at=block)
    hook.remove()
    assert torch.equal(hidden, seen[0])
    tokens = 16 if plan is None or plan.tokens_at(block) is None else plan.kept_index.shape[1]
    assert hidden.shape == (2, tokens, model.config.width)
    assert torch.equal(out, model(x, t, txt, mask, routing=plan))
