import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pixrun.losses import WeightsMissingError, gated_mean
from pixrun.losses.dino import DinoFeatures
from pixrun.losses.lpips import LPIPS, SCALE, SHIFT, LPIPSConfig
from pixrun.losses.pdino import PDino, PDinoConfig
from pixrun.losses.repa import REPA, REPAConfig, load_teacher
from pixrun.losses.vgg import VGG16Features
from pixrun.model import Denoiser, ModelConfig

# torchvision's vgg16 `features` convolutions: index -> (out, in) channels
TORCHVISION_VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
LPIPS_V01_CHANNELS = (64, 128, 256, 512, 512)


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def official_vgg16_state(with_classifier: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {}
    for i, (out, inp) in TORCHVISION_VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out, inp, 3, 3, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.01
    if with_classifier:  # the real file carries the ImageNet head; its shapes, stored as 1-element expands
        for name, shape in [("0", (4096, 25088)), ("3", (4096, 4096)), ("6", (1000, 4096))]:
            state[f"classifier.{name}.weight"] = torch.zeros(1).expand(*shape)
            state[f"classifier.{name}.bias"] = torch.zeros(shape[0])
    return state


def official_lpips_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LPIPS_V01_CHANNELS)}


def assert_one_line_naming(error, *needles):
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# ---- VGG16 and LPIPS -------------------------------------------------------------------------------------------


def test_torchvision_vgg16_state_dict_loads_strictly_from_pth_and_safetensors(tmp_path):
    state = official_vgg16_state(with_classifier=True)
    torch.save(state, tmp_path / "vgg16.pth")
    features_only = {k: v for k, v in state.items() if k.startswith("features.")}
    save_file(features_only, tmp_path / "vgg16.safetensors")
    lin = tmp_path / "lin.pth"
    torch.save(official_lpips_state(), lin)
    for name in ("vgg16.pth", "vgg16.safetensors"):
        lpips = LPIPS.from_config(LPIPSConfig(weight=0.1, vgg_weights=str(tmp_path / name), lin_weights=str(lin)))
        assert torch.equal(lpips.vgg.features[28].bias, state["features.28.bias"])
        assert torch.equal(lpips.vgg.features[0].weight, state["features.0.weight"])
    incomplete = dict(features_only)
    del incomplete["features.28.bias"]
    with pytest.raises(RuntimeError, match="features.28.bias"):
        VGG16Features().load_imagenet(incomplete)


def test_vgg16_taps_are_the_five_lpips_layers():
    taps = VGG16Features()(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert all(t.min() >= 0 for t in taps)  # taken after the ReLUs


def test_lpips_v01_layout_loads_strictly(tmp_path):
    lin = official_lpips_state()
    save_file(lin, tmp_path / "lin.safetensors")
    lpips = LPIPS()
    lpips.load_lin(lin)
    assert torch.equal(lpips.lins[4].model[1].weight, lin["lin4.model.1.weight"])
    x, y = images(seed=0), images(seed=1)
    before = lpips(x, y)
    lpips.load_lin({k: 2 * v for k, v in lin.items()})
    assert torch.allclose(lpips(x, y), 2 * before)  # the distance is linear in the loaded channel weights
    with pytest.raises(RuntimeError):
        lpips.load_lin({**lin, "lin5.model.1.weight": torch.zeros(1, 8, 1, 1)})
    config = LPIPSConfig(weight=0.1, lin_weights=str(tmp_path / "lin.safetensors"), random_init=True)
    assert not torch.equal(LPIPS.from_config(config).lins[0].model[1].weight, lin["lin0.model.1.weight"])


def test_lpips_zero_for_identical_positive_for_different_per_sample():
    lpips = LPIPS.from_config(LPIPSConfig(weight=0.1, random_init=True))
    x = images(3)
    assert lpips(x, x).shape == (3,)
    assert lpips(x, x).abs().max() < 1e-6
    y = x.clone()
    y[1] += 0.3 * torch.randn_like(y[1])
    d = lpips(y, x)
    assert d[1] > 1e-3 and d[0].abs() < 1e-6 and d[2].abs() < 1e-6


def test_lpips_scaling_layer_is_imagenet_normalisation():
    # ((x + 1) / 2 - mean) / std = (x - (2 mean - 1)) / (2 std): the official constants are these, to the digit
    assert SHIFT == tuple(round(2 * m - 1, 3) for m in IMAGENET_DEFAULT_MEAN)
    assert SCALE == tuple(round(2 * s, 3) for s in IMAGENET_DEFAULT_STD)
    lpips, x = LPIPS(), images()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    # equal but for float32 rounding: values within ±5, so a few ulps of 5 (4.8e-7 each)
    assert torch.allclose((x - lpips.shift) / lpips.scale, ((x + 1) / 2 - mean) / std, rtol=0, atol=2e-6)


def test_lpips_downsamples_before_vgg_and_stays_frozen_in_eval():
    seen = []
    lpips = LPIPS(downsample=0.5)
    lpips.vgg.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    parent = nn.ModuleDict({"lpips": lpips, "head": nn.Linear(2, 2)})
    parent.train()
    assert not lpips.training and not lpips.lins[0].model[0].training
    lpips(images(seed=0), images(seed=1))
    assert seen == [16, 16]
    assert all(not p.requires_grad for p in lpips.parameters())


def test_lpips_gradient_reaches_a_denoiser_through_the_input():
    lpips = LPIPS.from_config(LPIPSConfig(weight=0.1, random_init=True))
    net = nn.Conv2d(3, 3, 3, padding=1)
    x0 = images()
    loss = lpips(net(x0 + 0.5 * torch.randn_like(x0)), x0).mean()
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert torch.isfinite(net.weight.grad).all()
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_gradient_stays_finite_where_a_tap_is_all_zero():
    lpips = LPIPS()
    nn.init.constant_(lpips.vgg.features[2].bias, -1e3)  # relu1_2 is zero everywhere
    x_hat = images(seed=1).requires_grad_()
    lpips(x_hat, images()).sum().backward()
    assert torch.isfinite(x_hat.grad).all()


def test_lpips_missing_file_and_unreachable_url_give_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(WeightsMissingError) as error:
        LPIPS.from_config(LPIPSConfig(weight=0.1, vgg_weights=str(tmp_path / "vgg16.pth")))
    assert_one_line_naming(error, str(tmp_path / "vgg16.pth"), "lpips.vgg_weights", "lpips.random_init")
    torch.save(official_vgg16_state(with_classifier=False), tmp_path / "vgg16.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    unreachable = "http://127.0.0.1:9/weights/v0.1/vgg.pth"  # port 9 (discard): refused at once
    config = LPIPSConfig(weight=0.1, vgg_weights=str(tmp_path / "vgg16.pth"), lin_weights=unreachable)
    with pytest.raises(WeightsMissingError) as error:
        LPIPS.from_config(config)
    assert_one_line_naming(error, unreachable, "lpips.lin_weights", str(tmp_path / "hub" / "checkpoints" / "vgg.pth"))
    # once the file sits in the cache the URL needs no network
    torch.save(official_lpips_state(), tmp_path / "hub" / "checkpoints" / "vgg.pth")
    assert LPIPS.from_config(config).lins[1].model[1].weight.shape == (1, 128, 1, 1)


def test_gated_mean_counts_only_the_allowed_noise_levels():
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0])
    t = torch.tensor([0.1, 0.7, 0.71, 1.0])
    assert gated_mean(per_sample, t, max_t=0.7) == pytest.approx(3.0 / 4)
    assert gated_mean(per_sample, t, max_t=1.0) == pytest.approx(15.0 / 4)


# ---- DINOv2, P-DINO, REPA --------------------------------------------------------------------------------------


def save_tiny_dino(path, registers: bool):
    config_class, model_class = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    )
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=28)
    model = model_class(config)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("registers", [False, True])
def test_dino_loads_from_a_local_dir_and_returns_patch_tokens_only(tmp_path, registers):
    saved = save_tiny_dino(tmp_path / "dino", registers).eval()
    dino = DinoFeatures.load(str(tmp_path / "dino"), False, "pdino.source", "pdino.random_init")
    assert type(dino.model) is type(saved)
    assert dino.dim == 32 and dino.prefix == (5 if registers else 1)
    x = images(2, 28)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    with torch.no_grad():
        expected = saved(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state[:, dino.prefix :]
        tokens = dino(x, (28, 28))
    assert tokens.shape == (2, 4, 32)
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert dino(x, (224, 224)).shape == (2, 256, 32)


def test_dino_missing_gives_one_clear_line_and_random_init_works(tmp_path):
    with pytest.raises(WeightsMissingError) as error:
        PDino.from_config(PDinoConfig(weight=0.01, source=str(tmp_path / "dinov2")))
    assert_one_line_naming(error, str(tmp_path / "dinov2"), "pdino.source", "pdino.random_init")
    Dinov2WithRegistersConfig(patch_size=14).save_pretrained(tmp_path / "config-only")  # a download cut short
    with pytest.raises(WeightsMissingError) as error:
        load_teacher(REPAConfig(weight=0.5, teacher=str(tmp_path / "config-only")))
    assert_one_line_naming(error, "repa.teacher", "repa.random_init")
    teacher = load_teacher(REPAConfig(weight=0.5, teacher=str(tmp_path / "dinov2"), random_init=True))
    assert teacher.grid_tokens(images(1, 32), (2, 2)).shape == (1, 4, teacher.dim)


def test_pdino_zero_for_identical_positive_for_different_and_gradient_flows():
    pdino = PDino.from_config(PDinoConfig(weight=0.01, size=56, random_init=True))
    x0 = images(3)
    assert pdino(x0, x0).shape == (3,)
    assert pdino(x0, x0).abs().max() < 1e-5
    net = nn.Conv2d(3, 3, 3, padding=1)
    loss = pdino(net(x0 + 0.5 * torch.randn_like(x0)), x0)
    assert (loss > 1e-4).all()
    loss.mean().backward()
    assert net.weight.grad.abs().sum() > 0 and torch.isfinite(net.weight.grad).all()
    assert all(p.grad is None for p in pdino.parameters())


def test_perceptual_losses_take_bf16_predictions_under_autocast():
    x0 = images()
    x_hat = (x0 + 0.3 * torch.randn_like(x0)).requires_grad_()
    losses = [LPIPS(), PDino(DinoFeatures.load("unused", True, "pdino.source", "pdino.random_init"), 56)]
    for loss_fn in losses:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(x_hat.to(torch.bfloat16), x0)
        assert loss.dtype == torch.float32 and (loss > 0).all()
        loss.mean().backward()
        assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0


def test_repa_is_minus_one_when_aligned_and_gathers_the_kept_tokens():
    g = torch.Generator().manual_seed(0)
    teacher_tokens = torch.randn(2, 16, 8, generator=g)
    repa = REPA(width=8, teacher_dim=8, hidden=4)
    repa.projector = nn.Identity()  # so the tokens we pass are the projected tokens
    assert torch.allclose(repa(3 * teacher_tokens, teacher_tokens), torch.full((2,), -1.0))
    kept_index = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    kept_tokens = torch.stack([teacher_tokens[b, kept_index[b]] for b in range(2)])
    assert torch.allclose(repa(kept_tokens, teacher_tokens, kept_index), torch.full((2,), -1.0))
    assert (repa(kept_tokens, teacher_tokens, kept_index.flip(1)) > -0.9).all()


def test_repa_config_switches_off_at_until_step():
    assert REPAConfig(weight=0.5, until_step=10).active(9)
    assert not REPAConfig(weight=0.5, until_step=10).active(10)
    assert REPAConfig(weight=0.5).active(10**6)
    assert not REPAConfig(weight=0.0).active(0)


def test_repa_teacher_grid_matches_the_token_grid_and_gradient_reaches_the_denoiser():
    config = REPAConfig(weight=0.5, block=0, hidden=16, random_init=True)
    teacher = load_teacher(config)
    assert teacher.grid_tokens(images(1, 48), (3, 5)).shape == (1, 15, teacher.dim)
    model_config = ModelConfig(width=32, depth=2, heads=2, axes_dim=[8, 8], patch_size=8, bottleneck=16, context_dim=8)
    denoiser = Denoiser(model_config)
    repa = REPA(model_config.width, teacher.dim, config.hidden)
    captured = []
    denoiser.blocks[config.block].register_forward_hook(lambda module, args, out: captured.append(out))
    x0 = images(2, 32)
    denoiser(x0 + torch.randn_like(x0), torch.full((2,), 0.5), torch.randn(2, 3, 8))
    grid = (32 // 8, 32 // 8)
    with torch.no_grad():
        target = teacher.grid_tokens(x0, grid)
    assert target.shape[1] == captured[0].shape[1] == 16
    loss = repa(captured[0], target)
    assert loss.shape == (2,) and (loss > -1).all() and (loss < 1).all()
    (config.weight * loss.mean()).backward()
    assert denoiser.img_in[0].weight.grad.abs().sum() > 0
    assert repa.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
