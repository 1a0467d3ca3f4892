"""Starting a run from a diffusers PRX pipeline (`init`), fine-tuning it, and exporting it back.

The pipelines are tiny, randomly initialised, saved to tmp_path and loaded by path, through the code a user runs
with a hub id: a PRXPipeline with a Flux-like AutoencoderKL (latent space, v-prediction) and a PRXPixelPipeline
(pixel space, x-prediction)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixrun.errors import ConfigError
from pixrun.export import export_run
from pixrun.pipeline import Pipeline, load_run
from pixrun.pretrained import load_init_weights, resolve_init
from pixrun.text import TextTower
from pixrun.train import train
from tests.helpers_prx import SAMPLE_SIZE, tiny_prx_pipeline, tiny_prx_pixel_pipeline

PROMPTS = ["a photo of a red circle left of a blue square", "a photo of two crosses"]
SAMPLING = {"sample__steps": 6, "sample__cfg_scale": 3.0, "text__dtype": "float32", "train__precision": "fp32"}
SEED = 7
KINDS = ["PRXPipeline", "PRXPixelPipeline"]


def saved_pipeline(kind: str, path):
    """The tiny pipeline, its transformer's zero-initialised weights (the blocks' adaLN modulation) made random:
    with their gates at 0 every block is the identity, the text changes nothing and guidance does nothing."""
    folder = tiny_prx_pipeline(path, vae=True) if kind == "PRXPipeline" else tiny_prx_pixel_pipeline(path)
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(0)
    weights = {k: 0.1 * torch.randn(v.shape, generator=g) if not v.any() else v for k, v in load_file(file).items()}
    save_file(weights, file, metadata={"format": "pt"})
    return folder


def diffusers_images(folder, prompts=PROMPTS, seed=SEED, **call) -> np.ndarray:
    """(B, H, W, 3) in [0, 1]; one prompt a call: with guidance on, diffusers 0.42.1's PRX pipelines pass two
    timesteps whatever the batch. Image i from seed + i, as pixrun draws it."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    return np.concatenate([
        pipe(prompt, generator=torch.Generator().manual_seed(seed + i), output_type="np", **call).images
        for i, prompt in enumerate(prompts)
    ])


def pixrun_images(pipeline, prompts=PROMPTS, seed=SEED) -> np.ndarray:
    return ((pipeline.generate(prompts, seed=seed) + 1) / 2).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_an_imported_pipeline_samples_as_diffusers_does(tiny_config, tmp_path, kind):
    folder = saved_pipeline(kind, tmp_path / "prx")
    config = resolve_init(tiny_config(init=str(folder), **SAMPLING))
    assert config.latent.enabled == (kind == "PRXPipeline")
    assert config.flow.prediction == ("v" if kind == "PRXPipeline" else "x")
    pipeline = Pipeline.from_config(config, TextTower.build(config.text, []))
    load_init_weights(pipeline, config)
    ours = pixrun_images(pipeline.eval())
    call = {"num_inference_steps": 6, "guidance_scale": 3.0, "height": SAMPLE_SIZE, "width": SAMPLE_SIZE,
            "use_resolution_binning": False}
    theirs = diffusers_images(folder, **call)
    assert theirs.shape == ours.shape == (2, SAMPLE_SIZE, SAMPLE_SIZE, 3)
    assert np.abs(theirs - ours).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.1  # the images depend on the prompt: the check has teeth
    assert np.abs(diffusers_images(folder, **{**call, "guidance_scale": 1.0}) - theirs).max() > 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_fine_tune_resume_and_export_give_the_image_pixrun_samples(tiny_config, tmp_path, kind):
    folder = saved_pipeline(kind, tmp_path / "prx")
    settings = {"init": str(folder), **SAMPLING, "optim__warmup_steps": 1, "train__checkpoint_every": 2}
    train(tiny_config(**settings, train__steps=2))
    run_dir = train(tiny_config(**settings, train__steps=4), resume="auto")
    out = export_run(run_dir, tmp_path / "export")
    provenance = json.loads((out / "pixrun_export.json").read_text())
    assert provenance["pipeline"] == kind and provenance["init"] == str(folder)
    assert provenance["checkpoint"].endswith("4") and provenance["differences_from_pixrun_sample"] == []
    model_index = json.loads((out / "model_index.json").read_text())
    assert model_index["_class_name"] == kind and (model_index.get("vae", [None])[0] is not None) == (
        kind == "PRXPipeline")
    fine_tuned = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert fine_tuned.keys() == original.keys()
    assert any(not torch.equal(fine_tuned[k], original[k]) for k in original)  # the steps changed the weights
    theirs = diffusers_images(out, **provenance["call"])
    ours = pixrun_images(load_run(run_dir))  # what `pixrun sample` runs
    assert np.abs(theirs - ours).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_import_then_export_reproduces_the_original_pipeline(tiny_config, tmp_path, kind):
    folder = saved_pipeline(kind, tmp_path / "prx")
    # one step whose EMA never updates: the exported (EMA) weights are the imported ones
    run_dir = train(tiny_config(init=str(folder), **SAMPLING, train__steps=1, ema__every=1000))
    out = export_run(run_dir, tmp_path / "export")
    for part in ("transformer", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            continue
        ours, theirs = (load_file(next((f / part).glob("*.safetensors"))) for f in (out, folder))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, part
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    call = {"num_inference_steps": 6, "guidance_scale": 3.0, "height": SAMPLE_SIZE, "width": SAMPLE_SIZE,
            "use_resolution_binning": False}
    assert np.abs(diffusers_images(out, **call) - diffusers_images(folder, **call)).max() <= 1e-5


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "part, changes, message",
    [
        ("transformer/config.json", {"in_channels": 8}, "takes 8 channels, but its vae give 4"),
        ("transformer/config.json", {"qk_layernorm": True}, "sets 'qk_layernorm', which pixrun's denoiser cannot"),
        ("scheduler/scheduler_config.json", {"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": 500}, "num_train_timesteps=500"),
        ("model_index.json", {"vae": [None, None]}, "PRXPipeline without a vae"),
        ("model_index.json", {"_class_name": "FluxPipeline"}, "is a FluxPipeline"),
    ],
)
def test_init_refuses_what_pixrun_cannot_express(tiny_config, tmp_path, part, changes, message):
    folder = tiny_prx_pipeline(tmp_path / "prx", vae=True)
    edit_json(folder / part, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_init(tiny_config(init=str(folder)))
    assert "\n" not in str(info.value)


def test_init_describes_the_pipeline_and_keeps_the_run_own_settings(tiny_config, tmp_path):
    folder = tiny_prx_pixel_pipeline(tmp_path / "prx")
    edit_json(folder / "scheduler" / "scheduler_config.json", shift=2.5)
    edit_json(folder / "model_index.json", noise_scale=1.5)
    config = tiny_config(init=str(folder), **SAMPLING, optim__lr=1e-5, sample__time_grid="linear")
    warnings = []
    resolved = resolve_init(config, warn=warnings.append)
    # what the user set and the pipeline replaces is named, in one line; what it leaves (optim.lr) is not
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "model.patch_size=8 (now 4)" in warnings[0] and "sample.time_grid='linear' (now 'diffusers')" in warnings[0]
    assert "optim.lr" not in warnings[0] and "model.width" not in warnings[0]  # kept, or set to what it was
    assert resolved.model.width == 32 and resolved.model.patch_size == 4 and resolved.model.resolution_embeds
    assert (resolved.text.encoder, resolved.text.subfolder, resolved.text.clean) == (str(folder), "text_encoder",
                                                                                     "basic")
    assert resolved.flow.noise_scale == 1.5 and resolved.sample.shift == 2.5
    assert resolved.sample.time_grid == "diffusers" and config.sample.time_grid == "linear"  # a copy
    assert resolved.optim.lr == 1e-5 and resolved.sample.steps == 6 and resolved.text.dtype == "float32"
    assert resolve_init(resolved) == resolved  # deterministic: a resumed run compares equal
    assert resolve_init(tiny_config()) == tiny_config()  # no init: unchanged
