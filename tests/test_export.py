import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixrun.checkpoint import list_checkpoints
from pixrun.export import ExportError, export_run
from pixrun.flow import sampling_times
from pixrun.pipeline import load_run
from pixrun.sampler import diffusers_times
from pixrun.train import train
from tests.test_text_pretrained import saved_checkpoint

PROMPTS = ["a photo of a red circle left of a blue square", "a photo of two crosses"]
PARITY = [
    "sample.time_grid=diffusers", "sample.sampler=euler", "sample.cfg_scale=3.0", "sample.steps=6",
    "flow.noise_scale=2.0", "train.precision=fp32",
]


def tiny_run(tiny_config, *overrides) -> Path:
    """A one-step run whose checkpoint then gets random weights: a fresh model's zero-initialised layers would
    make every image the same and every comparison pass."""
    config = tiny_config(**dict(o.replace(".", "__", 1).split("=", 1) for o in ["train.steps=1", *overrides]))
    run_dir = train(config)
    checkpoint = list_checkpoints(run_dir)[-1]
    g = torch.Generator().manual_seed(0)
    for name in ("weights", "ema"):
        file = checkpoint / f"{name}.safetensors"
        tensors = load_file(file)
        save_file({k: 0.1 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}, file)
    return Path(run_dir)


def test_diffusers_pipeline_draws_the_same_images_as_pixrun(tiny_config, tmp_path):
    from diffusers import PRXPixelPipeline

    run_dir = tiny_run(tiny_config, *PARITY, "model.resolution_embeds=true")
    out = export_run(run_dir, tmp_path / "export")
    pipe = PRXPixelPipeline.from_pretrained(out)
    call = json.loads((out / "pixrun_export.json").read_text())["call"]
    assert call == {"num_inference_steps": 6, "guidance_scale": 3.0, "height": 32, "width": 32,
                    "use_resolution_binning": False}
    seed = 7

    def diffusers_images(**changes):
        # One prompt a call: diffusers 0.42.1's PRXPixelPipeline passes 2 timesteps for any batch under guidance.
        kwargs = {**call, **changes, "output_type": "np"}
        return np.concatenate([
            pipe(prompt, generator=torch.Generator().manual_seed(seed + i), **kwargs).images
            for i, prompt in enumerate(PROMPTS)
        ])

    theirs = diffusers_images()
    ours = ((load_run(run_dir).generate(PROMPTS, seed=seed) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert theirs.shape == ours.shape == (2, 32, 32, 3)
    assert np.abs(theirs - ours).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.1  # the images depend on the prompt: the check has teeth
    assert np.abs(diffusers_images(guidance_scale=1.0) - theirs).max() > 0.01  # guidance was on


def test_a_run_with_a_frozen_t5gemma_encoder_exports_with_it(tiny_config, tmp_path):
    from diffusers import PRXPixelPipeline

    saved_checkpoint("t5gemma", tmp_path / "t5gemma")  # stands in for a hub id, through the same code
    run_dir = tiny_run(tiny_config, *PARITY, f"text.encoder={tmp_path / 't5gemma'}", "text.dtype=float32")
    pipe = PRXPixelPipeline.from_pretrained(export_run(run_dir, tmp_path / "export"))
    assert type(pipe.text_encoder).__name__ == "T5GemmaEncoderModel" and pipe.tokenizer.padding_side == "right"
    generator = torch.Generator().manual_seed(3)
    theirs = pipe(PROMPTS[0], generator=generator, output_type="np", num_inference_steps=6, guidance_scale=3.0,
                  use_resolution_binning=False).images
    ours = ((load_run(run_dir).generate(PROMPTS[:1], seed=3) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - ours).max() <= 1e-3


def test_export_carries_the_run_settings_and_notes_differences(tiny_config, tmp_path):
    from diffusers import PRXPixelPipeline

    run_dir = tiny_run(tiny_config, "sample.sampler=heun", "text.clean=none", "flow.noise_scale=1.5")
    out = export_run(run_dir, tmp_path / "export", weights="weights")
    pipe = PRXPixelPipeline.from_pretrained(out)
    assert pipe.config.noise_scale == 1.5 and pipe.config.prompt_max_tokens == 32
    assert pipe.scheduler.config.shift == 3.0 and pipe.transformer.config.patch_size == 8
    ours = load_run(run_dir, weights="weights").denoiser.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in pipe.transformer.state_dict().items())
    notes = json.loads((out / "pixrun_export.json").read_text())["differences_from_pixrun_sample"]
    assert [n.split(";")[0] for n in notes] == [
        "diffusers samples with Euler", "diffusers uses its scheduler's time grid",
        "diffusers cleans prompts as text.clean=basic",
    ]


@pytest.mark.parametrize(
    "override, message",
    [("flow.prediction=eps", "treats the output as the clean image"), ("flow.t_clamp=0.1", "clamps t at 0.05")],
)
def test_export_refuses_what_diffusers_cannot_express(tiny_config, tmp_path, override, message):
    run_dir = tiny_run(tiny_config, override)
    with pytest.raises(ExportError, match=message) as info:
        export_run(run_dir, tmp_path / "export")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()


def test_export_never_writes_into_a_folder_in_use(tiny_config, tmp_path):
    run_dir = tiny_run(tiny_config)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        export_run(run_dir, tmp_path / "export")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("steps, shift", [(2, 1.0), (6, 3.0), (28, 3.0), (50, 1.0)])
def test_diffusers_time_grid_is_the_scheduler_one(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    assert torch.equal(diffusers_times(steps, shift), scheduler.sigmas)
    assert not torch.allclose(diffusers_times(steps, shift), sampling_times(steps, shift))  # not the default grid


LATENT_PARITY = ["sample.time_grid=diffusers", "sample.sampler=euler", "sample.cfg_scale=3.0", "sample.steps=6",
                 "train.precision=fp32", "flow.prediction=v"]


def saved_vae(path) -> str:
    from tests.helpers_prx import tiny_vae

    torch.manual_seed(0)
    tiny_vae().save_pretrained(path)
    return str(path)


def test_a_latent_run_exports_as_prx_pipeline_with_its_vae(tiny_config, tmp_path):
    from diffusers import PRXPipeline

    vae = saved_vae(tmp_path / "vae")
    run_dir = tiny_run(tiny_config, *LATENT_PARITY, f"latent.vae={vae}")
    out = export_run(run_dir, tmp_path / "export")
    pipe = PRXPipeline.from_pretrained(out)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and pipe.vae_scale_factor == 2
    assert pipe.tokenizer.model_max_length == 32  # text.max_tokens: PRXPipeline truncates prompts to it
    provenance = json.loads((out / "pixrun_export.json").read_text())
    assert provenance["pipeline"] == "PRXPipeline" and provenance["differences_from_pixrun_sample"] == []
    call = provenance["call"]
    assert call == {"num_inference_steps": 6, "guidance_scale": 3.0, "height": 32, "width": 32,
                    "use_resolution_binning": False, "skip_text_cleaning": True}
    theirs = np.concatenate([
        pipe(prompt, generator=torch.Generator().manual_seed(5 + i), output_type="np", **call).images
        for i, prompt in enumerate(PROMPTS)
    ])
    ours = ((load_run(run_dir).generate(PROMPTS, seed=5) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert theirs.shape == ours.shape == (2, 32, 32, 3)
    assert np.abs(theirs - ours).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.1


@pytest.mark.parametrize(
    "override, message",
    [("flow.prediction=x", "treats the output as the velocity"), ("flow.noise_scale=2.0", "unscaled noise")],
)
def test_latent_export_refuses_what_prx_pipeline_cannot_express(tiny_config, tmp_path, override, message):
    run_dir = tiny_run(tiny_config, "flow.prediction=v", f"latent.vae={saved_vae(tmp_path / 'vae')}", override)
    with pytest.raises(ExportError, match=message):
        export_run(run_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()
