"""The shapes world's own feature network: its labels, its training and cache, and its two uses (REPA's teacher with
the iREPA options, and a perceptual loss), in a training run that resumes bit-exactly and in the FLOP count."""

import itertools
import json

import numpy as np
import pytest
import torch

from pixrun.config import ConfigError, load_config
from pixrun.data.shapes import COLOR_RGB, SHAPE_KINDS, ShapesWorld
from pixrun.flops import training_flops
from pixrun.losses import LossInputs, counted_flops, shapes_teacher
from pixrun.losses.repa import REPA, REPAConfig, REPATerm, spatial_norm
from pixrun.losses.shapes_perceptual import ShapesPerceptual, ShapesPerceptualConfig, ShapesPerceptualTerm
from pixrun.losses.shapes_teacher import (
    ShapesFeatures,
    TeacherSpec,
    cell_labels,
    load_teacher,
    train_teacher,
)
from pixrun.model import Denoiser, ModelConfig, RoutePlan
from pixrun.train import Trainer, train
from tests.conftest import TINY_OVERRIDES
from tests.helpers import assert_resumed_as_straight

# trains in about 5 s of one core: enough to learn colours and tell objects from background
TINY_SPEC = TeacherSpec(scenes=64, steps=80, batch_size=8, lr=5e-3, test_scenes=32)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache folder holding the tiny teacher, trained once for this module, and its record."""
    folder = tmp_path_factory.mktemp("teacher_cache")
    network, record = load_teacher(TINY_SPEC, folder)
    return folder, network, record


@pytest.fixture
def tiny_default(tiny_cache, monkeypatch):
    """Runs (REPA's `teacher: shapes`, shapes_perceptual) get the tiny teacher from the module's cache."""
    folder, _, _ = tiny_cache
    monkeypatch.setattr(shapes_teacher, "DEFAULT_SPEC", TINY_SPEC)
    monkeypatch.setattr(shapes_teacher, "cache_root", lambda: folder)


def scenes(count=12):
    world = ShapesWorld(kinds=SHAPE_KINDS, colors=tuple(COLOR_RGB))
    return world, [world.sample_scene(np.random.default_rng([7, i])) for i in range(count)]


def eroded(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` whose 3x3 neighbourhood lies in it."""
    padded = np.pad(mask, 1)
    return np.all([padded[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_label_maps_and_cell_labels_agree_with_the_rendered_image():
    world, drawn = scenes()
    for scene in drawn:
        image = world.render(scene, 64).astype(int)
        labels = world.render_labels(scene, 64)
        assert set(np.unique(labels)) == set(range(len(scene.objects) + 1))
        for i, obj in enumerate(scene.objects, start=1):
            # pixels two pixels inside the object's label are fully covered: exactly its colour
            inside = eroded(eroded(labels == i))
            assert inside.any() and (image[inside] == COLOR_RGB[obj.color]).all()
        kinds, colors, geometry = cell_labels(world, scene, 64)
        palette = np.array(list(COLOR_RGB.values()))
        for row in range(8):
            for col in range(8):
                cell = image[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].reshape(-1, 1, 3)
                exact = (cell == palette).all(-1).any(0)  # which palette colours appear unblended in the cell
                if colors[row, col] == 0:  # background: most of the cell far from every shape colour
                    far = np.abs(cell - palette).sum(-1).min(-1) > 60
                    assert kinds[row, col] == 0 and far.mean() >= 0.5 and (geometry[:, row, col] == 0).all()
                else:  # its colour, and no other, shows unblended; its centre's offset lies in the object's square
                    assert exact.nonzero()[0].tolist() == [colors[row, col] - 1]
                    assert kinds[row, col] > 0 and (np.abs(geometry[:2, row, col]) <= 0.5 + 1 / 16).all()


def test_teacher_learns_the_cells_and_is_cached_and_reloaded_bit_identically(tiny_cache, monkeypatch, capsys):
    folder, network, record = tiny_cache
    assert not record["cached"] and record["train_seconds"] > 0 and record["cpu_seconds"] > 0
    accuracy = record["accuracy"]
    test_kinds = shapes_teacher.rendered_pool(TINY_SPEC, 2, TINY_SPEC.test_scenes)["kinds"]
    background = (test_kinds == 0).float().mean().item()
    assert accuracy["color"] > background + 0.03 and accuracy["color_on_objects"] > 0.5, accuracy
    files = sorted(path.name for path in folder.iterdir())
    assert files == [f"{TINY_SPEC.key()}.json", f"{TINY_SPEC.key()}.safetensors"]  # no pickle
    assert json.loads((folder / f"{TINY_SPEC.key()}.json").read_text())["accuracy"] == accuracy

    def no_training(spec):
        raise AssertionError("trained again")

    monkeypatch.setattr(shapes_teacher, "train_teacher", no_training)
    capsys.readouterr()
    again, record_again = load_teacher(TINY_SPEC, folder)
    said = capsys.readouterr()
    assert said.out == "" and f"shapes teacher {TINY_SPEC.key()} from {folder}" in said.err  # stdout: the caller's
    assert record_again["cached"] and record_again["train_seconds"] == record["train_seconds"]
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())
    assert TeacherSpec(seed=1).key() != TeacherSpec().key() and TeacherSpec().key() == TeacherSpec().key()


def test_teacher_training_is_deterministic_and_leaves_the_callers_random_state_alone():
    spec = TeacherSpec(scenes=8, steps=3, batch_size=4, test_scenes=4)
    torch.manual_seed(123)
    first, record = train_teacher(spec)
    after = torch.rand(3)
    torch.manual_seed(123)
    second, _ = train_teacher(spec)
    assert torch.equal(torch.rand(3), after)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert set(record["accuracy"]) == {"kind", "color", "kind_on_objects", "color_on_objects"}


def test_perceptual_loss_is_zero_for_the_image_itself_and_grows_with_corruption(tiny_cache):
    _, network, _ = tiny_cache
    loss = ShapesPerceptual(network)
    world, drawn = scenes(4)
    x0 = torch.from_numpy(np.stack([world.render(s, 64) for s in drawn])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(loss(x0, x0), torch.zeros(4))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    distances = [loss(x0 + sigma * noise, x0) for sigma in (0.05, 0.2, 0.6)]
    assert all((a < b).all() for a, b in itertools.pairwise(distances)), distances
    x_hat = (x0 + 0.2 * noise).requires_grad_()
    loss(x_hat, x0).sum().backward()
    assert x_hat.grad.abs().sum() > 0 and all(p.grad is None for p in network.parameters())


def test_a_gated_perceptual_term_runs_its_network_on_the_counted_rows_alone_with_the_masked_result(tiny_cache):
    """Below max_t the term's network sees only the rows the gate counts: the same per-sample losses and gradients
    as the network on every row with the others masked to 0, for a fraction of the work."""
    _, network, _ = tiny_cache
    world, drawn = scenes(6)
    x0 = torch.from_numpy(np.stack([world.render(s, 64) for s in drawn])).permute(0, 3, 1, 2).float() / 127.5 - 1
    noisy = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.9, 0.69, 0.71, 1.0, 0.3])
    term = ShapesPerceptualTerm(ShapesPerceptualConfig(weight=1.0, max_t=0.7), ShapesPerceptual(network))
    seen = []
    hook = network.stages[0].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))

    def per_sample(max_t):
        x_hat = noisy.clone().requires_grad_()
        term.config.max_t = max_t
        losses = term(LossInputs(x_hat, x0, t, step=0, pixels_per_token=16))
        (losses * (t <= 0.7)).sum().backward()
        return losses, x_hat.grad

    counted, counted_grad = per_sample(0.7)
    assert seen == [3, 3]  # the target's and the prediction's forward, each on rows 0, 2 and 5
    every, every_grad = per_sample(1.0)
    hook.remove()
    assert seen[2:] == [6, 6]
    mask = t <= 0.7
    assert torch.equal(counted[~mask], torch.zeros(3)) and (counted[mask] > 0).all()
    torch.testing.assert_close(counted[mask], every[mask])
    torch.testing.assert_close(counted_grad, every_grad)


def test_spatial_norm_centres_and_scales_each_channel_over_the_tokens():
    tokens = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]]])  # (1 image, 3 tokens, 2 channels)
    a, b = (8 / 3) ** 0.5, 200 ** 0.5  # per-channel root-mean-square deviations
    expected = torch.tensor([[[-2 / a, -10 / b], [0.0, -10 / b], [2 / a, 20 / b]]])
    assert torch.allclose(spatial_norm(tokens), expected, atol=1e-5)
    shifted = 3 * tokens + torch.tensor([5.0, -7.0])  # per-image, per-channel offsets and scales drop out
    assert torch.allclose(spatial_norm(shifted), expected, atol=1e-5)


@pytest.mark.parametrize("projector, norm", [("mlp", False), ("conv", True)])
def test_repa_with_the_shapes_teacher_reaches_denoiser_and_projector(tiny_default, projector, norm):
    config = REPAConfig(weight=0.5, block=0, hidden=16, teacher="shapes", projector=projector, spatial_norm=norm)
    term = REPATerm.build(config, 32, torch.device("cpu"), {})
    assert isinstance(term.teacher, ShapesFeatures) and term.teacher.dim == TINY_SPEC.widths[-1]
    model = ModelConfig(width=32, depth=2, heads=2, axes_dim=[8, 8], patch_size=8, bottleneck=16, context_dim=8)
    denoiser = Denoiser(model)
    captured = []
    denoiser.blocks[0].register_forward_hook(lambda module, args, out: captured.append(out))
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    denoiser(x0 + torch.randn_like(x0), torch.full((2,), 0.5), torch.randn(2, 3, 8))
    inputs = LossInputs(x0_hat=x0, images=x0, t=torch.full((2,), 0.5), step=0, pixels_per_token=8,
                        hidden=captured[0])
    loss = term(inputs)
    assert loss.shape == (2,) and (loss > -1).all() and (loss < 1).all()
    loss.mean().backward()
    assert denoiser.img_in[0].weight.grad.abs().sum() > 0
    first = term.projector.projector if projector == "conv" else term.projector.projector[0]
    assert isinstance(first, torch.nn.Conv2d if projector == "conv" else torch.nn.Linear)
    assert first.weight.grad.abs().sum() > 0 and all(p.grad is None for p in term.teacher.parameters())
    if projector == "conv":  # TREAD's kept tokens are not a grid: refused in one line
        routing = RoutePlan(kept_index=torch.tensor([[0, 2, 5], [1, 3, 4]]), blocks=range(1))
        with pytest.raises(ConfigError, match="repa.projector conv needs the whole token grid"):
            term(LossInputs(x0, x0, inputs.t, 0, 8, routing=routing, hidden=captured[0][:, :3]))


def test_conv_projector_is_minus_one_when_it_passes_aligned_tokens_through():
    repa = REPA(width=4, teacher_dim=4, kind="conv")
    with torch.no_grad():
        repa.projector.weight.zero_()
        repa.projector.bias.zero_()
        repa.projector.weight[:, :, 1, 1] = torch.eye(4)  # the centre tap only: each token maps to itself
    teacher = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(repa(2 * teacher, teacher, grid=(2, 3)), torch.full((2,), -1.0))


def teacher_config(tmp_path, run, *overrides):
    return load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / run}", "repa.weight=0.5", "repa.teacher=shapes",
                              "repa.block=1", "repa.hidden=16", "repa.projector=conv", "repa.spatial_norm=true",
                              "shapes_perceptual.weight=0.2", "train.checkpoint_every=2", "train.sample_every=2",
                              *overrides])


def test_a_run_with_the_shapes_teacher_trains_resumes_bit_exactly_and_counts_flops(tiny_default, tmp_path):
    train(teacher_config(tmp_path, "straight", "train.steps=4"))
    train(teacher_config(tmp_path, "resumed", "train.steps=2"))
    resumed = Trainer(teacher_config(tmp_path, "resumed", "train.steps=4"), resume="auto")
    resumed.run()
    resumed.close()
    assert_resumed_as_straight(tmp_path / "straight", tmp_path / "resumed", "repa_projector.")
    logs = [[json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert [(r["repa"], r["shapes_perceptual"]) for r in logs[0]] == [
        (r["repa"], r["shapes_perceptual"]) for r in logs[1]]
    assert all(r["shapes_perceptual"] > 0 and -0.5 <= r["repa"] < 0.5 for r in logs[0])

    config = teacher_config(tmp_path, "flops")
    flops = training_flops(config, 0, 8)
    with torch.device("meta"):
        network = ShapesFeatures(TINY_SPEC.widths, TINY_SPEC.resolution)
        x = torch.empty(1, 3, 32, 32)
    forward = counted_flops(lambda: network.taps(x))
    width, teacher_dim = config.model.width, TINY_SPEC.widths[-1]
    conv_projector = 3 * 2 * 16 * width * teacher_dim * 9  # forward, and backward to its weight and its input
    assert flops.terms["repa"] == forward + conv_projector
    assert flops.terms["shapes_perceptual"] == 3 * forward  # x₀ and x̂₀ forward, backward to x̂₀ only
    assert flops.losses == flops.terms["repa"] + flops.terms["shapes_perceptual"] > 0


def test_the_default_switches_both_terms_on_and_counts_them():
    config = load_config()
    assert config.repa.teacher == "shapes" and config.repa.projector == "conv" and config.repa.spatial_norm
    assert config.repa.weight > 0 and config.shapes_perceptual.weight > 0 and config.repa.block < config.model.depth
    flops = training_flops(config, 0, 16)
    assert flops.terms["repa"] > 0 and flops.terms["shapes_perceptual"] > 0
    assert flops.losses < 0.5 * flops.denoiser  # the network is small beside the denoiser it teaches
