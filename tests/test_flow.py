import itertools

import pytest
import torch

from pixrun.flow import SPACES, Flow, FlowConfig, partner_rows, sampling_times, shift_time


def batch(n=4, s=2.0):
    g = torch.Generator().manual_seed(0)
    flow = Flow(FlowConfig(noise_scale=s))
    x0 = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])[:n]
    return flow, x0, eps, t, flow.add_noise(x0, eps, t)


def test_noising_endpoints_and_velocity():
    flow, x0, eps, _, _ = batch()
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert torch.allclose(flow.add_noise(x0, eps, zeros), x0)
    assert torch.allclose(flow.add_noise(x0, eps, ones), 2.0 * eps)
    # v is the time derivative of x_t: a finite difference agrees
    t, dt = torch.full((4,), 0.5), 1e-3
    fd = (flow.add_noise(x0, eps, t + dt) - flow.add_noise(x0, eps, t - dt)) / (2 * dt)
    v = flow.convert(x0, flow.add_noise(x0, eps, t), t, "x", "v")
    assert torch.allclose(fd, v, atol=1e-3)


@pytest.mark.parametrize("src,dst", list(itertools.product(SPACES, SPACES)))
def test_conversions_recover_the_truth(src, dst):
    flow, x0, eps, t, x_t = batch()
    truth = {"x": x0, "eps": eps, "v": 2.0 * eps - x0}
    assert torch.allclose(flow.convert(truth[src], x_t, t, src, dst), truth[dst], atol=1e-5)


def test_x_prediction_v_loss_is_the_recipe_formula():
    flow, x0, eps, _, _ = batch()
    t = torch.tensor([0.01, 0.03, 0.5, 0.9])  # two below the clamp
    x_t = flow.add_noise(x0, eps, t)
    x_hat = x0 + 0.1 * torch.randn_like(x0)
    tc = t.clamp(min=0.05).view(-1, 1, 1, 1)
    expected = (((x_t - x_hat) / tc - (x_t - x0) / tc) ** 2).mean()
    assert torch.allclose(flow.loss(x_hat, x0, eps, x_t, t), expected)


@pytest.mark.parametrize("prediction,loss", list(itertools.product(SPACES, SPACES)))
def test_perfect_prediction_has_zero_loss_and_wrong_has_positive(prediction, loss):
    flow = Flow(FlowConfig(prediction=prediction, loss=loss, noise_scale=2.0))
    _, x0, eps, t, x_t = batch()
    perfect = flow.target(x0, eps)
    assert flow.loss(perfect, x0, eps, x_t, t) < 1e-10
    assert flow.loss(perfect + 0.1, x0, eps, x_t, t) > 1e-4


def test_time_sampling_schedule():
    g = torch.Generator().manual_seed(0)
    flow = Flow(FlowConfig(t_mu=0.0, t_sigma=1.0, t_shift=3.0, uniform_fraction=0.0))
    t = flow.sample_t(20000, g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.75) < 0.01  # sigmoid(0) = 0.5, shifted by 3 -> 0.75
    assert abs(shift_time(torch.tensor(0.5), 3.0).item() - 0.75) < 1e-6
    mixed = Flow(FlowConfig(t_shift=1.0, t_sigma=0.1, uniform_fraction=0.5)).sample_t(20000, g)
    assert 0.27 < ((mixed < 0.3) | (mixed > 0.7)).float().mean() < 0.33  # only the uniform half lands out there


def test_sampling_times_run_from_noise_to_clean():
    times = sampling_times(10, 3.0)
    assert times[0] == 1 and times[-1] == 0 and len(times) == 11
    assert (times[1:] < times[:-1]).all()


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="prediction"):
        Flow(FlowConfig(prediction="score"))
    with pytest.raises(ValueError, match="uniform_fraction"):
        Flow(FlowConfig(uniform_fraction=1.5))


def test_noise_scale_grows_with_resolution_when_based_on_one():
    flow = Flow(FlowConfig(noise_scale=1.0, noise_scale_base=256))
    assert flow.noise_scale(torch.zeros(1, 3, 256, 256)) == 1.0
    assert flow.noise_scale(torch.zeros(1, 3, 512, 512)) == 2.0
    assert flow.noise_scale(torch.zeros(1, 3, 256, 1024)) == 2.0  # by the pixel count, for non-square buckets
    x0, eps, t = torch.rand(2, 3, 512, 512), torch.randn(2, 3, 512, 512), torch.tensor([0.3, 0.8])
    x_t = flow.add_noise(x0, eps, t)
    assert torch.allclose(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * 2.0 * eps)
    assert flow.loss(flow.target(x0, eps), x0, eps, x_t, t) == 0
    assert Flow(FlowConfig(noise_scale=2.0)).noise_scale(torch.zeros(1, 3, 512, 512)) == 2.0


def test_contrastive_flow_matching_subtracts_the_error_against_the_partner_rows_target():
    flow = Flow(FlowConfig(prediction="x", loss="x", contrastive=0.1))
    x0 = torch.arange(5.0)[:, None, None, None].expand(5, 1, 2, 2)  # row i is all i: partners differ by 1
    eps, t = torch.zeros_like(x0), torch.full((5,), 0.5)
    x_t = flow.add_noise(x0, eps, t)
    # a perfect prediction: the flow error is 0; rows 0-1 and 2-3 are 1 apart from their partner, row 4 has none
    assert flow.loss(x0, x0, eps, x_t, t).item() == pytest.approx(-0.1 * 4 / 5)
    wrong = x0 + 1.0
    # error 1 everywhere; against the partner's truth rows 0 and 2 are on it, rows 1 and 3 are 2 off
    assert flow.loss(wrong, x0, eps, x_t, t).item() == pytest.approx(1.0 - 0.1 * (0 + 4 + 0 + 4) / 5)


def test_contrastive_pairs_never_span_two_halves_of_an_even_batch():
    partner, paired = partner_rows(8)
    assert partner.tolist() == [1, 0, 3, 2, 5, 4, 7, 6] and paired.tolist() == [1.0] * 8
    assert (partner[:4] < 4).all() and (partner[4:] >= 4).all()  # a batch split over 2 ranks keeps its pairs
    partner, paired = partner_rows(3)
    assert partner.tolist() == [1, 0, 2] and paired.tolist() == [1.0, 1.0, 0.0]


def test_contrastive_lambda_is_validated():
    with pytest.raises(ValueError, match="contrastive"):
        Flow(FlowConfig(contrastive=1.5))
