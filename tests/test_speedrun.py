"""The 24-hour recipe as a config, and its CPU twin run end to end: stages, LPIPS, P-DINO, REPA, TREAD, Muon."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_tensors
from pixrun.cli import main
from pixrun.config import load_config
from pixrun.model import Denoiser, count_parameters
from pixrun.train import train
from tests.test_faults import assert_identical

CONFIGS = Path(__file__).parent.parent / "configs"


def test_the_speedrun_config_is_the_recipe():
    config = load_config(CONFIGS / "prx-speedrun.yaml")
    with torch.device("meta"):
        denoiser = Denoiser(config.model)
    assert 1.1e9 < count_parameters(denoiser) < 1.3e9
    first, second = config.stage_plan()
    assert (first.resolution, first.until_step, first.batch_size) == (512, 100_000, 1024)
    assert (second.resolution, second.until_step - first.until_step, second.batch_size) == (1024, 20_000, 512)
    assert first.until_step * first.batch_size == 102_400_000  # the recipe's 102 M samples at 512 px
    assert "repa" not in second.losses and config.repa.until_step == first.until_step
    assert (config.lpips.weight, config.pdino.weight, config.repa.weight, config.repa.block) == (0.1, 0.01, 0.5, 7)
    assert config.tread.enabled and config.optim.name == "muon" and config.optim.grad_clip == 0.2
    assert (config.ema.decay, config.ema.every, config.flow.caption_dropout) == (0.999, 10, 0.1)
    assert config.model.patch_dim == 3 * 32 * 32 and config.model.bottleneck == 256


def test_the_cpu_twin_runs_every_part_and_resumes_across_its_stages(tmp_path):
    straight = load_config(CONFIGS / "prx-speedrun-cpu.yaml", [f"run_dir={tmp_path / 'straight'}",
                                                              "train.keep_checkpoints=5", "train.precision=fp32"])
    train(straight)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())}
    assert {"flow_loss", "lpips", "pdino", "repa"} <= set(records[6])  # stage 1: every loss
    assert {"lpips", "pdino"} <= set(records[7]) and "repa" not in records[7]  # stage 2: REPA off
    for r in records.values():  # every term the step computed went into the loss it optimised, and all are finite
        terms = [r["flow_loss"]] + [r[name] for name in ("lpips", "pdino", "repa") if name in r]
        assert all(map(math.isfinite, [r["loss"], *terms])) and r["loss"] == pytest.approx(sum(terms), rel=1e-5)
    weights = load_tensors(list_checkpoints(tmp_path / "straight")[-1], "weights")
    assert any(k.startswith("repa_projector.") for k in weights)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(list_checkpoints(resumed)[-1])  # stopped at step 4, in the first stage
    config = load_config(CONFIGS / "prx-speedrun-cpu.yaml", [f"run_dir={resumed}", "train.keep_checkpoints=5",
                                                            "train.precision=fp32"])
    train(config, resume="auto")
    assert_identical(list_checkpoints(tmp_path / "straight")[-1], list_checkpoints(resumed)[-1])


def test_a_loss_whose_weights_are_missing_stops_with_what_to_download(tmp_path, capsys):
    code = main(["train", str(CONFIGS / "prx-speedrun-cpu.yaml"), f"run_dir={tmp_path / 'r'}",
                 "lpips.random_init=false", f"lpips.vgg_weights={tmp_path / 'vgg16.pth'}"])
    err = capsys.readouterr().err
    assert code == 2 and "lpips.vgg_weights" in err and len(err.strip().splitlines()) == 1
