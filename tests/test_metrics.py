import dataclasses
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import transformers

from pixrun.data.shapes import ShapesWorld
from pixrun.errors import WeightsMissingError
from pixrun.metrics import (
    MetricsConfig,
    distances,
    generate_batches,
    load_networks,
    mse_by_t,
    quality_metrics,
    shapes_quality_metrics,
    shapes_reference,
)
from pixrun.metrics.distances import (
    fid,
    frechet_distance,
    gaussian_stats,
    kid,
    polynomial_kernel,
    rbf_mmd,
    unbiased_mmd2,
)
from pixrun.metrics.features import build_feature_network, extract_features
from pixrun.metrics.inception import FID_WEIGHTS_URL, FIDInceptionV3, load_fid_inception, tf_avg_pool
from pixrun.metrics.reference import folder_reference, reference_features
from pixrun.pipeline import Pipeline, build_world
from pixrun.text import TextTower


def gaussian_features(n, dim, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


# --- distances ------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_of_commuting_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # = 5 + 4 + 1
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_agrees_with_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T  # s2 is full rank; s1 @ s2 is not symmetric
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_fid_of_identical_sets_is_zero_even_with_singular_covariances():
    x = gaussian_features(10, 64)  # 10 samples in 64 dimensions: covariance of rank 9
    assert abs(fid(x, x)) < 1e-8
    assert abs(frechet_distance(*gaussian_stats(x), *gaussian_stats(x))) < 1e-8
    assert fid(x, x + 1.0) == pytest.approx(64.0, rel=1e-8)  # a pure mean shift adds |shift|²


@pytest.mark.parametrize("n1, n2", [(12, 9), (40, 30)])  # fewer samples than dimensions (SVD path), and more
def test_fid_from_features_equals_the_frechet_distance_of_their_gaussians(n1, n2):
    x, y = gaussian_features(n1, 16, seed=5), gaussian_features(n2, 16, shift=0.4, seed=6) * 1.5
    expected = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert fid(x, y) == pytest.approx(expected, rel=1e-9)
    assert fid(y, x) == pytest.approx(expected, rel=1e-9)


def test_unbiased_mmd2_matches_its_definition():
    x, y = gaussian_features(5, 3, seed=1), gaussian_features(4, 3, shift=0.5, seed=2)
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    within_x = np.mean([k(x[i], x[j]) for i in range(5) for j in range(5) if i != j])
    within_y = np.mean([k(y[i], y[j]) for i in range(4) for j in range(4) if i != j])
    cross = np.mean([k(a, b) for a in x for b in y])
    got = unbiased_mmd2(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert got == pytest.approx(within_x + within_y - 2 * cross, rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_grows_with_a_shift_and_is_symmetric():
    x, y = gaussian_features(300, 16, seed=1), gaussian_features(300, 16, seed=2)
    same, same_std = kid(x, y, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3
    shifts = [kid(x, gaussian_features(300, 16, shift=s, seed=2), subsets=20, subset_size=100)[0] for s in (0.3, 1.0)]
    assert same < shifts[0] < shifts[1]
    # subsets as large as both sets hold all of each: one value, which no longer depends on the draw
    whole, whole_std = kid(x, y, subsets=20, subset_size=300)
    assert whole_std == 0
    full = unbiased_mmd2(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert whole == pytest.approx(full)
    assert kid(y, x, subsets=20, subset_size=300)[0] == pytest.approx(whole)


def test_rbf_mmd_is_zero_for_identical_sets_grows_with_a_shift_and_matches_its_definition(monkeypatch):
    x = gaussian_features(40, 8, seed=3)
    assert rbf_mmd(x, x) == 0.0
    values = [rbf_mmd(x, gaussian_features(40, 8, shift=s, seed=4)) for s in (0.0, 2.0, 6.0)]
    assert 0 < values[0] < values[1] < values[2]
    y = gaussian_features(30, 8, shift=2.0, seed=4)
    sq = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
    kernel_mean = lambda a, b: np.exp(-sq(a, b) / (2 * 10.0**2)).mean()
    expected = 1000 * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))
    monkeypatch.setattr(distances, "KERNEL_ROWS", 7)  # row blocks that do not divide the set sizes
    assert rbf_mmd(x, y) == pytest.approx(expected, rel=1e-10)
    assert rbf_mmd(y, x) == pytest.approx(expected, rel=1e-10)


# --- the FID Inception --------------------------------------------------------------------------------------------

# torchvision's Inception3 layout, which the official pt_inception file uses: (name, in, out, kernel) per conv,
# transcribed independently of pixrun.metrics.inception.
def block_a(p, c, pool):
    return [
        (f"{p}.branch1x1", c, 64, (1, 1)), (f"{p}.branch5x5_1", c, 48, (1, 1)), (f"{p}.branch5x5_2", 48, 64, (5, 5)),
        (f"{p}.branch3x3dbl_1", c, 64, (1, 1)), (f"{p}.branch3x3dbl_2", 64, 96, (3, 3)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3)), (f"{p}.branch_pool", c, pool, (1, 1)),
    ]


def block_c(p, c7):
    return [
        (f"{p}.branch1x1", 768, 192, (1, 1)), (f"{p}.branch7x7_1", 768, c7, (1, 1)),
        (f"{p}.branch7x7_2", c7, c7, (1, 7)), (f"{p}.branch7x7_3", c7, 192, (7, 1)),
        (f"{p}.branch7x7dbl_1", 768, c7, (1, 1)), (f"{p}.branch7x7dbl_2", c7, c7, (7, 1)),
        (f"{p}.branch7x7dbl_3", c7, c7, (1, 7)), (f"{p}.branch7x7dbl_4", c7, c7, (7, 1)),
        (f"{p}.branch7x7dbl_5", c7, 192, (1, 7)), (f"{p}.branch_pool", 768, 192, (1, 1)),
    ]


def block_e(p, c):
    return [
        (f"{p}.branch1x1", c, 320, (1, 1)), (f"{p}.branch3x3_1", c, 384, (1, 1)),
        (f"{p}.branch3x3_2a", 384, 384, (1, 3)), (f"{p}.branch3x3_2b", 384, 384, (3, 1)),
        (f"{p}.branch3x3dbl_1", c, 448, (1, 1)), (f"{p}.branch3x3dbl_2", 448, 384, (3, 3)),
        (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)), (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1)),
        (f"{p}.branch_pool", c, 192, (1, 1)),
    ]


OFFICIAL_CONVS = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)), ("Conv2d_2b_3x3", 32, 64, (3, 3)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1)), ("Conv2d_4a_3x3", 80, 192, (3, 3)),
    *block_a("Mixed_5b", 192, 32), *block_a("Mixed_5c", 256, 64), *block_a("Mixed_5d", 288, 64),
    ("Mixed_6a.branch3x3", 288, 384, (3, 3)), ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)), ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3)),
    *block_c("Mixed_6b", 128), *block_c("Mixed_6c", 160), *block_c("Mixed_6d", 160), *block_c("Mixed_6e", 192),
    ("Mixed_7a.branch3x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
    ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
    ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)), ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3)),
    *block_e("Mixed_7b", 1280), *block_e("Mixed_7c", 2048),
]


def official_layout_state_dict(with_batch_counter: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, c_in, c_out, kernel in OFFICIAL_CONVS:
        fan_in = c_in * kernel[0] * kernel[1]
        state[f"{name}.conv.weight"] = torch.randn(c_out, c_in, *kernel, generator=g) * (2 / fan_in) ** 0.5
        state[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(c_out, generator=g)
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(c_out, generator=g)
        state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(c_out, generator=g)
        state[f"{name}.bn.running_var"] = 1 + torch.rand(c_out, generator=g)
        if with_batch_counter:
            state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    return state


def test_inception_has_the_official_size():
    model = FIDInceptionV3()
    assert len(OFFICIAL_CONVS) == 94
    # torchvision's Inception-v3 has 27,161,264 parameters; without its aux classifier (3,326,696) and with 1008
    # classes instead of 1000 (+16,392): 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


@pytest.mark.parametrize("with_batch_counter", [True, False])
def test_a_state_dict_with_the_official_names_loads_strictly(tmp_path, with_batch_counter):
    state = official_layout_state_dict(with_batch_counter)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    model = load_fid_inception(str(path))
    loaded = model.state_dict()
    assert torch.equal(loaded["Mixed_6e.branch7x7dbl_5.conv.weight"], state["Mixed_6e.branch7x7dbl_5.conv.weight"])
    assert torch.equal(loaded["Mixed_7c.branch_pool.bn.running_var"], state["Mixed_7c.branch_pool.bn.running_var"])
    with torch.no_grad():
        features = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and torch.isfinite(features).all() and (features >= 0).all()

    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, path)
    with pytest.raises(RuntimeError, match="AuxLogits"):
        load_fid_inception(str(path))


def test_average_pools_ignore_the_padding_as_tensorflow_does():
    constant = torch.full((1, 2, 5, 5), 3.0)
    assert torch.equal(tf_avg_pool(constant), constant)  # zero padding would darken the border


def test_missing_inception_weights_name_what_to_download(tmp_path):
    with pytest.raises(WeightsMissingError, match="pt_inception-2015-12-05-6726825d.pth") as info:
        load_fid_inception(str(tmp_path / "absent.pth"))
    assert FID_WEIGHTS_URL in str(info.value) and "\n" not in str(info.value)


# --- feature networks ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_networks(tmp_path):
    """Tiny random CLIP and DINOv2 vision models saved as transformers folders: loaded by path like real ones."""
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    ))
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
    ))
    clip.save_pretrained(tmp_path / "clip")
    dino.save_pretrained(tmp_path / "dino")
    return str(tmp_path / "clip"), str(tmp_path / "dino")


def test_clip_and_dino_features_are_unit_embeddings_loaded_from_a_folder(tiny_networks):
    clip_path, dino_path = tiny_networks
    images = torch.rand(5, 3, 24, 24) * 2 - 1
    for name, path, dim in (("clip", clip_path, 16), ("dino", dino_path, 32)):
        network = build_feature_network(name, path)
        assert network.key == path
        features = extract_features(network, images, batch_size=2)
        assert features.dtype == np.float64 and features.shape == (5, dim)
        assert np.allclose(np.linalg.norm(features, axis=1), 1.0)
        assert np.allclose(features, extract_features(network, images, batch_size=5), atol=1e-6)
        assert not np.allclose(features[0], features[1])


def test_missing_clip_weights_give_one_clear_line(tmp_path):
    with pytest.raises(WeightsMissingError, match="CMMD network") as info:
        build_feature_network("clip", str(tmp_path / "no-such-model"))
    assert "\n" not in str(info.value)


# --- reference sets, the cache and the top-level call -------------------------------------------------------------


class ColourStats(torch.nn.Module):
    """A stand-in feature network: per-channel mean and std. Counts the images it sees."""

    key = "colour-stats"

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1) + self.anchor


def test_reference_features_are_cached_per_network_and_set(tmp_path):
    world = ShapesWorld()
    network = ColourStats()
    reference = shapes_reference(world, resolution=16, count=6, seed=5)
    first = reference_features(reference, network, tmp_path)
    assert network.images_seen == 6
    again = reference_features(shapes_reference(world, resolution=16, count=6, seed=5), network, tmp_path)
    assert network.images_seen == 6 and np.array_equal(first, again)
    (sidecar,) = tmp_path.glob("*.json")
    record = json.loads(sidecar.read_text())
    assert record["network"] == "colour-stats" and record["count"] == 6 and record["shape"] == [6, 6]

    reference_features(shapes_reference(world, resolution=16, count=6, seed=6), network, tmp_path)
    assert network.images_seen == 12 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_folder_reference_reads_and_resizes_images(tmp_path):
    from PIL import Image

    for i, size in enumerate((16, 20, 16)):
        Image.new("RGB", (size, size), (255 * (i % 2), 0, 0)).save(tmp_path / f"{i}.png")
    images = folder_reference(tmp_path, count=3, resolution=16).load()
    assert images.shape == (3, 3, 16, 16)
    assert images[0, 0].max() == -1 and images[1, 0].min() == 1
    with pytest.raises(FileNotFoundError, match="has 3 images, 4 are needed"):
        folder_reference(tmp_path, count=4, resolution=16)


def test_quality_metrics_score_identical_sets_zero_and_noise_worse(tiny_networks, tmp_path):
    clip_path, dino_path = tiny_networks
    config = MetricsConfig(clip=clip_path, dino=dino_path, random_init=True, batch_size=3, kid_subsets=5)
    torch.manual_seed(0)
    networks = load_networks(config)
    assert set(networks) == {"inception", "clip", "dino"}
    shapes = shapes_reference(ShapesWorld(), resolution=32, count=3, seed=1).load()
    same = quality_metrics(shapes, shapes, config, networks)
    assert set(same) == {"fid", "kid", "kid_std", "cmmd", "dino_mmd"}
    assert abs(same["fid"]) < 1e-9 and same["cmmd"] == 0 and same["dino_mmd"] == 0
    noise = quality_metrics(torch.rand(3, 3, 32, 32) * 2 - 1, shapes, config, networks)
    for metric in ("fid", "kid", "cmmd", "dino_mmd"):
        assert noise[metric] > same[metric] + 1e-6, metric


def test_shapes_quality_metrics_generates_for_the_reference_captions_and_caches(tiny_networks, tiny_config, tmp_path):
    clip_path, dino_path = tiny_networks
    config = MetricsConfig(
        metrics=["cmmd", "dino_mmd"], clip=clip_path, dino=dino_path, num_images=4, batch_size=3,
        cache_dir=str(tmp_path / "cache"),
    )
    pipeline_config = tiny_config()
    torch.manual_seed(0)
    world = build_world(pipeline_config)
    text_tower = TextTower.build(pipeline_config.text, world.vocabulary())
    pipeline = Pipeline.from_config(pipeline_config, text_tower).eval()
    networks = load_networks(config)
    scores = shapes_quality_metrics(pipeline, world, config, networks)
    assert set(scores) == {"cmmd", "dino_mmd"} and all(v > 0 for v in scores.values())
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one per network
    assert shapes_quality_metrics(pipeline, world, config, networks) == pytest.approx(scores)


def test_unknown_metrics_and_networks_not_loaded_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        MetricsConfig(metrics=["fid", "is"]).validate()
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="need the clip network"):
        quality_metrics(images, images, MetricsConfig(metrics=["cmmd"]), networks={"inception": ColourStats()})


# --- MSE in t-bins -----------------------------------------------------------------------------------------------


class Passthrough(torch.nn.Module):
    """Predicts x̂₀ = x_t: its error grows with the noise level, (x_t - x₀)² = t² (s·ε - x₀)²."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, txt, mask):
        return x + self.anchor


@pytest.fixture
def tiny_pipeline(tiny_config):
    config = tiny_config()
    torch.manual_seed(0)
    return Pipeline.from_config(config, TextTower.build(config.text, build_world(config).vocabulary())).eval()


def test_mse_by_t_reports_each_bin_seeded_and_independent_of_batch_size(tiny_pipeline, tiny_config):
    world = build_world(tiny_config())
    reference = shapes_reference(world, resolution=32, count=5, seed=3)
    images, captions = reference.load(), reference.captions
    untrained = mse_by_t(tiny_pipeline, images, captions, seed=7, batch_size=2)
    assert list(untrained) == ["mse_t0.0-0.3", "mse_t0.3-0.6", "mse_t0.6-1.0"]
    # the final layer starts at zero: x̂₀ = 0 at every t, so every bin measures the images' mean square
    assert list(untrained.values()) == pytest.approx([images.pow(2).mean().item()] * 3, rel=1e-6)
    with torch.no_grad():
        for p in tiny_pipeline.denoiser.final_layer.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    scores = mse_by_t(tiny_pipeline, images, captions, seed=7, batch_size=2)
    assert len(set(scores.values())) == 3
    again = mse_by_t(tiny_pipeline, images, captions, seed=7, batch_size=5)
    assert again == pytest.approx(scores, rel=1e-5)
    assert mse_by_t(tiny_pipeline, images, captions, seed=8, batch_size=5) != pytest.approx(scores, rel=1e-5)
    assert not tiny_pipeline.denoiser.training


def test_mse_by_t_grows_with_noise_for_a_passthrough_denoiser(tiny_pipeline):
    tiny_pipeline.denoiser = Passthrough()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    scores = list(mse_by_t(tiny_pipeline, images, ["a photo of a circle"] * 8, seed=0).values())
    assert scores[0] < scores[1] < scores[2]
    # E[(s·ε - x₀)²] = s² + E[x₀²] = 1 + 1/3 for uniform x₀; E[t²] over [0, 0.3) is 0.03
    assert scores[0] == pytest.approx(0.03 * (1 + 1 / 3), rel=0.3)


class HalvingAutoencoder:
    """A stand-in for pixrun.latent.Autoencoder: 4 latent channels at half the resolution, scaled."""

    def __init__(self):
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(images, 2)
        return 1.5 * torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def test_mse_by_t_in_latent_space_noises_the_encoded_images(tiny_pipeline):
    tiny_pipeline.denoiser = Passthrough()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    captions = ["a photo of a circle"] * 5
    tiny_pipeline.autoencoder = HalvingAutoencoder()
    latent = mse_by_t(tiny_pipeline, images, captions, seed=3, batch_size=2)
    assert tiny_pipeline.autoencoder.calls == 3
    latents = HalvingAutoencoder().encode(images)
    tiny_pipeline.autoencoder = None
    # the same draws on the latents themselves, the mean taken over their 4 x 16 x 16 elements
    assert latent == pytest.approx(mse_by_t(tiny_pipeline, latents, captions, seed=3, batch_size=5), rel=1e-6)
    assert latent != pytest.approx(mse_by_t(tiny_pipeline, images, captions, seed=3), rel=1e-2)


def test_generated_batches_follow_the_seed_not_the_batch_size_and_take_the_sampling_settings(tiny_pipeline):
    with torch.no_grad():  # the final layer starts at zero; random values make images differ by prompt and seed
        for p in tiny_pipeline.denoiser.final_layer.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a circle", "a photo of a red square", "a photo of two crosses"]
    batches = list(generate_batches(tiny_pipeline, prompts, seed=4, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    assert torch.equal(batches[1][0], tiny_pipeline.generate(prompts[2:], seed=6)[0])  # image 2: seed 4 + 2
    (whole,) = generate_batches(tiny_pipeline, prompts, seed=4, batch_size=3)
    torch.testing.assert_close(whole, torch.cat(batches), atol=1e-5, rtol=0)
    one_step = dataclasses.replace(tiny_pipeline.sample, steps=1)
    (other,) = generate_batches(tiny_pipeline, prompts, seed=4, batch_size=3, sample=one_step)
    assert (other - whole).abs().max() > 1e-3
