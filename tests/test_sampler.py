from itertools import pairwise

import pytest
import torch

from pixrun.flow import Flow, FlowConfig, sampling_times
from pixrun.sampler import SAMPLERS, guided_fn


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_an_exact_denoiser_lands_on_its_clean_image(name):
    flow = Flow(FlowConfig(noise_scale=2.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = 2.0 * torch.randn(2, 3, 8, 8, generator=g)
    out = SAMPLERS[name](lambda x, t: x0, noise, sampling_times(7, 3.0), flow)
    assert torch.allclose(out, x0, atol=1e-5)


class EchoModel(torch.nn.Module):
    """Outputs the mean of its text embedding everywhere: conditional and unconditional differ visibly."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, txt, mask):
        self.calls.append(x.shape[0])
        value = (txt * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return value.mean(-1).view(-1, 1, 1, 1).expand_as(x)


def test_guidance_on_x0_and_its_interval():
    model = EchoModel()
    cond = (torch.full((1, 2, 4), 3.0), torch.ones(1, 2, dtype=torch.bool))
    uncond = (torch.full((1, 1, 4), 1.0), torch.ones(1, 1, dtype=torch.bool))
    x = torch.zeros(1, 3, 4, 4)
    guided = guided_fn(model, cond, uncond, cfg_scale=4.0, cfg_interval=[0.2, 0.8])
    assert torch.allclose(guided(x, torch.tensor([0.5])), torch.full_like(x, 1 + 4 * (3 - 1)))
    assert model.calls == [2]  # one batched call for both branches
    assert torch.allclose(guided(x, torch.tensor([0.9])), torch.full_like(x, 3.0))  # outside: conditional only
    assert model.calls == [2, 1]
    plain = guided_fn(model, cond, uncond, cfg_scale=1.0, cfg_interval=[0.0, 1.0])
    assert torch.allclose(plain(x, torch.tensor([0.5])), torch.full_like(x, 3.0))


def test_tread_self_guidance_extrapolates_from_the_routed_model():
    from pixrun.model import Denoiser, ModelConfig, TokenRouting
    from pixrun.sampler import self_guided

    torch.manual_seed(0)
    model = Denoiser(ModelConfig(width=32, depth=4, heads=2, axes_dim=[8, 8], patch_size=4, bottleneck=8,
                                 context_dim=8))
    for p in model.parameters():  # the zero-initialised output layers would hide every difference
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.7])
    txt, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    routing = TokenRouting(enabled=True, fraction=0.5, start=1, end=-1)
    dense = model(x, t, txt, mask)
    assert torch.allclose(self_guided(model, routing, 1.0, seed=0)(x, t, txt, mask), dense, atol=1e-6)
    plan = model.plan_routing(routing, 16, [torch.Generator().manual_seed(i) for i in range(2)], "cpu")
    routed = model(x, t, txt, mask, routing=plan)
    assert not torch.allclose(routed, dense, atol=1e-3)
    guided = self_guided(model, routing, 2.5, seed=0)(x, t, txt, mask)
    assert torch.allclose(guided, routed + 2.5 * (dense - routed), atol=1e-5)
    assert torch.equal(guided, self_guided(model, routing, 2.5, seed=0)(x, t, txt, mask))  # the same tokens each call


def test_a_velocity_model_steps_exactly_as_diffusers_scheduler():
    """v-prediction, guided on v, Euler on FlowMatchEulerDiscreteScheduler's grid: what PRXPipeline computes. The
    velocity is used as it is, also below flow.t_clamp (the grid's last steps), never through x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pixrun.sampler import diffusers_times

    flow = Flow(FlowConfig(prediction="v"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return torch.sin(3 * x + t.view(-1, 1, 1, 1)) - x

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(6)
    theirs = x.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t.view(1) / 1000), t, theirs).prev_sample
    times = diffusers_times(6, 1.0)
    assert times[-2] < flow.config.t_clamp  # the last step is one the x0 round trip would change
    ours = SAMPLERS["euler"](model, x, times, flow)
    assert torch.allclose(ours, theirs, atol=1e-5)
    through_x0 = x
    for t, t_next in pairwise(times):
        tb = t.view(1)
        x0 = flow.to_x0(model(through_x0, tb), through_x0, tb)
        through_x0 = through_x0 + (t_next - t) * flow.to_v(x0, through_x0, tb)
    assert not torch.allclose(through_x0, theirs, atol=1e-3)
