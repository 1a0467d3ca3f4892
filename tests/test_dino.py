"""DINOv3 ViT beside DINOv2 in the one DINO wrapper: loaded by path as a hub id would be, its registers dropped, its
patch 16 and its image processor's normalisation, and REPA and P-DINO on it."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel, ViTConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pixrun.errors import ConfigError
from pixrun.losses.dino import DinoFeatures
from pixrun.losses.pdino import PDino, PDinoConfig
from pixrun.losses.repa import REPA, REPAConfig, load_teacher
from pixrun.model import Denoiser, ModelConfig

REGISTERS = 4
SATELLITE_MEAN, SATELLITE_STD = [0.430, 0.411, 0.296], [0.213, 0.156, 0.143]  # not ImageNet's: DINOv3's satellite


def images(n, height, width, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def save_tiny_dinov3(path, processor: dict | None = None) -> DINOv3ViTModel:
    """A tiny random DINOv3 ViT/16 with registers, saved as a hub folder is (config, weights, image processor)."""
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=16, num_register_tokens=REGISTERS, image_size=32)
    torch.manual_seed(0)
    model = DINOv3ViTModel(config)
    with torch.no_grad():  # registers unlike CLS and the patches, so that taking the wrong tokens shows
        model.embeddings.register_tokens.normal_(0, 3)
    model.save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return model.eval()


@pytest.fixture
def dinov3_dir(tmp_path):
    path = tmp_path / "dinov3-vits16"
    save_tiny_dinov3(path, {"image_processor_type": "DINOv3ViTImageProcessorFast", "image_mean": IMAGENET_DEFAULT_MEAN,
                            "image_std": IMAGENET_DEFAULT_STD, "size": {"height": 224, "width": 224}})
    return path


def test_dinov3_loads_by_path_and_gives_its_patch_tokens_without_cls_and_registers(tmp_path):
    saved = save_tiny_dinov3(tmp_path / "sat", {"image_mean": SATELLITE_MEAN, "image_std": SATELLITE_STD})
    dino = DinoFeatures.load(str(tmp_path / "sat"), False, "repa.teacher", "repa.random_init")
    assert type(dino.model) is DINOv3ViTModel and not dino.model.training
    assert (dino.dim, dino.patch_size, dino.prefix) == (32, (16, 16), 1 + REGISTERS)
    x = images(2, 32, 48)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (SATELLITE_MEAN, SATELLITE_STD))
    with torch.no_grad():
        by_hand = saved(pixel_values=((x + 1) / 2 - mean) / std)
        tokens = dino(x, (32, 48))
        assert tokens.shape == (2, 2 * 3, 32)
        assert torch.allclose(tokens, by_hand.last_hidden_state[:, 1 + REGISTERS :], atol=1e-5)
        assert not torch.allclose(tokens, by_hand.last_hidden_state[:, 1 : 1 + 6], atol=1e-2)  # registers dropped
        assert torch.allclose(dino.cls_embedding(x, (32, 48)), F.normalize(by_hand.pooler_output, dim=-1), atol=1e-5)
        # a (rows, cols) token grid: the image resized to grid x 16
        assert dino.grid_tokens(images(1, 32, 32), (3, 5)).shape == (1, 15, 32)


def test_without_an_image_processor_file_the_normalisation_is_imagenet(tmp_path):
    save_tiny_dinov3(tmp_path / "bare")
    dino = DinoFeatures.load(str(tmp_path / "bare"), False, "pdino.source", "pdino.random_init")
    assert torch.equal(dino.mean.flatten(), torch.tensor(IMAGENET_DEFAULT_MEAN))
    assert torch.equal(dino.std.flatten(), torch.tensor(IMAGENET_DEFAULT_STD))


def test_a_checkpoint_that_is_not_dino_is_refused_naming_the_key(tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match=r"repa.teacher=.* is a vit model, not a DINOv2 or DINOv3 ViT"):
        load_teacher(REPAConfig(weight=0.5, teacher=str(tmp_path / "vit")))


def test_repa_with_a_dinov3_teacher_matches_the_denoiser_grid_and_trains_the_denoiser_side_only(dinov3_dir):
    config = REPAConfig(weight=0.5, block=0, hidden=16, teacher=str(dinov3_dir))
    teacher = load_teacher(config)
    model_config = ModelConfig(width=32, depth=2, heads=2, axes_dim=[8, 8], patch_size=8, bottleneck=16, context_dim=8)
    denoiser = Denoiser(model_config)
    repa = REPA(model_config.width, teacher.dim, config.hidden)
    captured = []
    denoiser.blocks[config.block].register_forward_hook(lambda module, args, out: captured.append(out))
    x0 = images(2, 32, 32)
    denoiser(x0 + torch.randn_like(x0), torch.full((2,), 0.5), torch.randn(2, 3, 8))
    with torch.no_grad():  # the denoiser's 4x4 grid of patch 8: the teacher sees x0 at 64 px, 4x4 patches of 16
        target = teacher.grid_tokens(x0, (32 // 8, 32 // 8))
    assert target.shape == (2, 16, teacher.dim) and captured[0].shape[1] == 16
    loss = repa(captured[0], target)
    assert torch.isfinite(loss).all() and (loss > -1).all() and (loss < 1).all()
    (config.weight * loss.mean()).backward()
    assert denoiser.img_in[0].weight.grad.abs().sum() > 0
    assert repa.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_pdino_on_dinov3_is_zero_for_identical_images_and_trains_the_prediction_only(dinov3_dir):
    pdino = PDino.from_config(PDinoConfig(weight=0.01, size=32, source=str(dinov3_dir)))
    x0 = images(3, 32, 32)
    assert pdino(x0, x0).abs().max() < 1e-5
    net = nn.Conv2d(3, 3, 3, padding=1)
    loss = pdino(net(x0 + 0.5 * torch.randn_like(x0)), x0)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 1e-4).all()
    loss.mean().backward()
    assert net.weight.grad.abs().sum() > 0 and torch.isfinite(net.weight.grad).all()
    assert all(p.grad is None for p in pdino.parameters())
    with pytest.raises(ConfigError, match="pdino.size 15 is smaller than one patch"):
        PDino(pdino.dino, size=15)


def test_a_training_step_runs_repa_and_pdino_on_one_shared_dinov3(tiny_config, dinov3_dir):
    from pixrun.train import Trainer

    config = tiny_config(repa__weight=0.5, repa__block=0, repa__hidden=16, repa__teacher=str(dinov3_dir),
                         pdino__weight=0.01, pdino__size=32, pdino__source=str(dinov3_dir))
    trainer = Trainer(config)
    terms = trainer.state.aux.terms
    teacher = terms["repa"].teacher
    assert isinstance(teacher.model, DINOv3ViTModel) and terms["pdino"].network.dino is teacher  # loaded once
    metrics = trainer.step(0)
    assert torch.isfinite(metrics["repa"]) and torch.isfinite(metrics["pdino"]) and metrics["pdino"] > 0
