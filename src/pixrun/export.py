"""A trained run as a diffusers pipeline folder: `PRXPixelPipeline` for a pixel-space run, `PRXPipeline` (with
its VAE) for a latent one; `DiffusionPipeline.from_pretrained(OUT)` loads either.

    OUT/
        model_index.json
        transformer/        PRXTransformer2DModel with the run's (EMA) denoiser weights, names unchanged
        scheduler/          FlowMatchEulerDiscreteScheduler with the run's sampling shift
        text_encoder/       the run's text encoder: the jointly trained small T5 or the frozen pretrained one, fp32
        tokenizer/          its tokenizer, padding on the right
        vae/                latent runs: the run's frozen autoencoder, fp32
        pixrun_export.json  where it came from, and the pipeline call that reproduces `pixrun sample`

Both pipelines sample with Euler on the scheduler's time grid and guidance at every step; PRXPixelPipeline takes
the output as x0 (guided on x0, x0 -> v with t clamped at 0.05) from noise `randn * noise_scale`, PRXPipeline as
the velocity noise - x0 (guided on v) from unscaled noise, then decodes. pixrun computes the same with
`sample.time_grid=diffusers`, `sample.sampler=euler`, `sample.cfg_interval=[0,1]` and the pipeline's prompt
cleaning (docs/export.md). A run the pipeline cannot express exactly is refused with an ExportError.
"""

import json
from pathlib import Path

import torch

from pixrun.checkpoint import latest_good_checkpoint
from pixrun.config import Config
from pixrun.errors import ConfigError
from pixrun.model import ModelConfig
from pixrun.pipeline import load_run, load_run_config

DIFFUSERS_T_CLAMP = 0.05  # PRXPixelPipeline divides by max(t, 0.05), whatever the run trained with
DIFFUSERS_TRAIN_TIMESTEPS = 1000
# the default sizes each pipeline has aspect-ratio bins for
BINNED_RESOLUTIONS = {"PRXPixelPipeline": (1024,), "PRXPipeline": (256, 512, 1024)}


class ExportError(ConfigError):
    """The run cannot be exported as asked; the message is one line, for `pixrun: error: ...`."""


def transformer_kwargs(model: ModelConfig) -> dict:
    """PRXTransformer2DModel's arguments for pixrun's denoiser config."""
    return {
        "in_channels": model.in_channels, "patch_size": model.patch_size, "context_in_dim": model.context_dim,
        "hidden_size": model.width, "mlp_ratio": model.mlp_ratio, "num_heads": model.heads, "depth": model.depth,
        "axes_dim": list(model.axes_dim), "theta": int(model.rope_theta), "time_factor": model.time_factor,
        "time_max_period": int(model.time_max_period), "bottleneck_size": model.bottleneck,
        "resolution_embeds": model.resolution_embeds,
    }


def pipeline_class(config: Config) -> str:
    return "PRXPipeline" if config.latent.enabled else "PRXPixelPipeline"


def as_diffusers_saves_it(encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder with the config diffusers' PRX pipelines load it with. Their T5Gemma encoder is saved under
    the whole encoder-decoder's config, whose `encoder` part diffusers' T5GemmaEncoder wrapper reads; pixrun loads
    it with that part alone, which saved as it is would load back as a default-sized T5Gemma."""
    import transformers

    if isinstance(encoder.config, transformers.T5GemmaModuleConfig):
        part = encoder.config.to_dict()
        whole = transformers.T5GemmaConfig(encoder=part, decoder=part, is_encoder_decoder=False,
                                           vocab_size=encoder.config.vocab_size)
        whole.architectures = [type(encoder).__name__]
        encoder.config = whole
    return encoder


def check_exportable(config: Config) -> None:
    """Raise ExportError (one line) for a run whose model the diffusers pipeline would run differently."""
    flow = config.flow
    if config.latent.enabled:
        if flow.prediction != "v":
            raise ExportError(f"the run predicts {flow.prediction!r}, but PRXPipeline treats the output as the "
                              "velocity noise - x0 (flow.prediction=v)")
        if flow.noise_scale != 1 or flow.noise_scale_base:
            raise ExportError("PRXPipeline starts from unscaled noise, but the run scales it (flow.noise_scale=1 "
                              "and flow.noise_scale_base=0 are needed)")
    else:
        if flow.prediction != "x":
            raise ExportError(
                f"the run predicts {flow.prediction!r}, but PRXPixelPipeline treats the output as the clean image "
                "(flow.prediction=x)"
            )
        if flow.t_clamp != DIFFUSERS_T_CLAMP:
            raise ExportError(f"flow.t_clamp is {flow.t_clamp}, but PRXPixelPipeline clamps t at {DIFFUSERS_T_CLAMP}")
    if config.tread.fusion == "sprint":
        raise ExportError("the run fuses its routed tokens with SPRINT (tread.fusion=sprint), whose fusion layer also "
                          "runs at inference, and PRXTransformer2DModel has no such layer")
    if config.model.pixel_head:
        raise ExportError(f"the run refines its output with a pixel head (model.pixel_head={config.model.pixel_head}), "
                          "and PRXTransformer2DModel has no such layer")
    for name in ("rope_theta", "time_max_period"):
        value = getattr(config.model, name)
        if value != int(value):
            raise ExportError(f"model.{name} is {value}, but PRXTransformer2DModel takes an integer")


def parity_notes(config: Config) -> list[str]:
    """Where the exported pipeline, called as pixrun_export.json says, samples differently from `pixrun sample`
    with the run's own settings."""
    s, notes = config.sample, []
    if s.sampler != "euler":
        notes.append(f"diffusers samples with Euler; the run's sample.sampler is {s.sampler}")
    if s.time_grid != "diffusers":
        notes.append(f"diffusers uses its scheduler's time grid; the run's sample.time_grid is {s.time_grid}")
    if list(s.cfg_interval) != [0.0, 1.0]:
        notes.append(f"diffusers guides at every step; the run's sample.cfg_interval is {s.cfg_interval}")
    if s.cfg_scale < 1:
        notes.append(f"diffusers accepts guidance_scale >= 1 only; the run's sample.cfg_scale is {s.cfg_scale}")
    if config.latent.enabled and config.text.clean not in ("prx", "basic"):
        notes.append("PRXPipeline cleans prompts as text.clean=prx (basic with skip_text_cleaning=True); the run's "
                     f"text.clean is {config.text.clean}")
    if not config.latent.enabled and config.text.clean != "basic":
        notes.append(f"diffusers cleans prompts as text.clean=basic; the run's text.clean is {config.text.clean}")
    return notes


def pipeline_call(config: Config) -> dict:
    """The pipeline's __call__ arguments that match the run's sampling settings."""
    res = config.data.resolution
    call = {
        "num_inference_steps": config.sample.steps,
        "guidance_scale": max(1.0, config.sample.cfg_scale),
        "height": res,
        "width": res,
        "use_resolution_binning": res in BINNED_RESOLUTIONS[pipeline_class(config)],
    }
    if config.latent.enabled:
        call["skip_text_cleaning"] = config.text.clean == "basic"
    return call


def export_run(run_dir: str | Path, out_dir: str | Path, weights: str = "ema") -> Path:
    """Write the run's latest checkpoint (`weights`: ema or weights) as a PRXPipeline (latent run) or
    PRXPixelPipeline (pixel run) folder at `out_dir`."""
    try:  # here: diffusers is optional, and slow to import
        from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXPixelPipeline, PRXTransformer2DModel
    except ImportError:
        raise ExportError("export needs diffusers >= 0.42 (pip install 'diffusers>=0.42')") from None

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; export into a new folder")
    config = load_run_config(run_dir)
    check_exportable(config)
    run = load_run(run_dir, weights=weights, device="cpu")

    transformer = PRXTransformer2DModel(**transformer_kwargs(run.denoiser.config))
    try:
        missing, unexpected = transformer.load_state_dict(run.denoiser.state_dict(), strict=False)
    except RuntimeError as e:  # same names, other shapes
        detail = str(e).splitlines()[-1].strip()
        raise ExportError(f"the denoiser does not fit PRXTransformer2DModel: {detail}") from None
    if missing or unexpected:
        which = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which diffusers does not"
        raise ExportError(f"the denoiser cannot be expressed as PRXTransformer2DModel: it {which}")

    tower = run.text_tower
    parts = {
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=DIFFUSERS_TRAIN_TIMESTEPS, shift=config.sample.shift
        ),
        # bf16 -> fp32 is exact; load with torch_dtype for bf16
        "text_encoder": as_diffusers_saves_it(tower.encoder.to(torch.float32).eval()),
        "tokenizer": tower.tokenizer,
        "default_sample_size": config.data.resolution,
    }
    if run.autoencoder is not None:
        # PRXPipeline truncates prompts to the tokenizer's model_max_length; init_kwargs is what gets saved
        tower.tokenizer.model_max_length = tower.tokenizer.init_kwargs["model_max_length"] = config.text.max_tokens
        pipe = PRXPipeline(**parts, vae=run.autoencoder.vae.to(torch.float32).eval())
        if pipe.vae_scale_factor != run.autoencoder.factor:
            raise ExportError(f"PRXPipeline would take the VAE's factor as {pipe.vae_scale_factor}, the run as "
                              f"{run.autoencoder.factor}")
    else:
        pipe = PRXPixelPipeline(
            **parts,
            prompt_max_tokens=config.text.max_tokens,
            noise_scale=run.flow.noise_scale(torch.empty(config.data.resolution, config.data.resolution)),
        )
    pipe.save_pretrained(out_dir)
    checkpoint = latest_good_checkpoint(run_dir, optimizer=False)
    provenance = {
        "run": str(run_dir.resolve()),
        "init": config.init,
        "pipeline": pipeline_class(config),
        "checkpoint": checkpoint.name,
        "weights": weights,
        "call": pipeline_call(config),
        "differences_from_pixrun_sample": parity_notes(config),
    }
    (out_dir / "pixrun_export.json").write_text(json.dumps(provenance, indent=1))
    return out_dir
