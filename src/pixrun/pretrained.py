"""Start a run from a released diffusers PRX pipeline: `init: Photoroom/prx-512-t2i` (a hub id or a local folder).

`resolve_init` reads the pipeline's configs (model_index.json, transformer/, scheduler/, tokenizer/, vae/) and
writes that pipeline into the run's config: `model` (every PRXTransformer2DModel setting), `text` (its encoder and
tokenizer, cleaning and token budget as the pipeline encodes prompts), `latent` (its VAE, for PRXPipeline),
`flow.prediction` and noise scale (PRXPipeline predicts the velocity noise - x0 from unscaled noise;
PRXPixelPipeline predicts x0 from `noise_scale` x noise, converted with t clamped at 0.05), and the sampling
settings under which `pixrun sample` computes what the pipeline computes (the scheduler's time grid and shift,
Euler, guidance at every step). The rest stays the run's own: data (and data.resolution: a released model's
`default_sample_size` is only where it was trained last), optimiser, schedule, the frozen encoder's and VAE's
dtypes, guidance scale and steps. `load_init_weights` then copies the transformer's weights into the fresh
denoiser; the text encoder and the VAE come in through the text and latent sections.

Anything pixrun's denoiser or sampler cannot express exactly is refused with a one-line ConfigError.
diffusers is optional: it is imported here, inside the functions.
"""

import copy
import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch

from pixrun.config import Config
from pixrun.errors import ConfigError
from pixrun.latent import AUTOENCODER_CLASSES, LatentConfig

PREDICTION = {"PRXPipeline": "v", "PRXPixelPipeline": "x"}  # what each pipeline class's transformer outputs
PIXEL_T_CLAMP = 0.05  # PRXPixelPipeline divides by max(t, 0.05)
TRAIN_TIMESTEPS = 1000  # the scheduler's; pixrun's diffusers time grid and the transformer's t assume it
# PRXTransformer2DModel's config -> pixrun's ModelConfig
MODEL_FIELDS = {
    "hidden_size": "width", "depth": "depth", "num_heads": "heads", "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size", "bottleneck_size": "bottleneck", "in_channels": "in_channels",
    "context_in_dim": "context_dim", "axes_dim": "axes_dim", "theta": "rope_theta", "time_factor": "time_factor",
    "time_max_period": "time_max_period", "resolution_embeds": "resolution_embeds",
}
# FlowMatchEulerDiscreteScheduler settings that move its time grid or its step away from pixrun's Euler on the
# shifted grid, with the value that keeps them out of the way
SCHEDULER_NEUTRAL = {
    "use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
UNBOUNDED_TOKENS = 10**6  # above this, a tokenizer's model_max_length is transformers' "no limit" placeholder


def load_configs(init: str, cls, subfolder: str | None = None) -> dict:
    """`cls.load_config` (a diffusers pipeline, model or scheduler class) of a hub id or local folder."""
    try:
        return dict(cls.load_config(init, subfolder=subfolder))
    except (OSError, ValueError) as e:
        where = f"{init}/{subfolder}" if subfolder else init
        raise ConfigError(f"init: cannot read {where}: {str(e).splitlines()[0]}") from None


def model_settings(init: str) -> dict:
    """pixrun's model section for the pipeline's transformer, or ConfigError for a setting it cannot express."""
    from diffusers import PRXTransformer2DModel

    saved = load_configs(init, PRXTransformer2DModel, "transformer")
    if saved.get("_class_name") != "PRXTransformer2DModel":
        raise ConfigError(f"init: {init}'s transformer is a {saved.get('_class_name')}, not PRXTransformer2DModel")
    defaults = {name: p.default for name, p in inspect.signature(PRXTransformer2DModel.__init__).parameters.items()
                if name != "self"}
    unknown = sorted(k for k in saved if not k.startswith("_") and k not in MODEL_FIELDS)
    if unknown:
        raise ConfigError(f"init: {init}'s transformer sets {unknown[0]!r}, which pixrun's denoiser cannot express")
    settings = {**defaults, **{k: v for k, v in saved.items() if k in MODEL_FIELDS}}
    settings["axes_dim"] = settings["axes_dim"] or [32, 32]  # PRXTransformer2DModel's default for None
    model = {MODEL_FIELDS[k]: v for k, v in settings.items()}
    model["axes_dim"] = list(model["axes_dim"])
    for name in ("rope_theta", "time_factor", "time_max_period", "mlp_ratio"):
        model[name] = float(model[name])
    return model


def scheduler_shift(init: str) -> float:
    """The scheduler's shift, or ConfigError when its time grid or step is not plain Euler on the shifted grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    saved = load_configs(init, FlowMatchEulerDiscreteScheduler, "scheduler")
    if saved.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError(f"init: {init}'s scheduler is a {saved.get('_class_name')}, which pixrun cannot sample "
                          "as; it samples as FlowMatchEulerDiscreteScheduler")
    settings = FlowMatchEulerDiscreteScheduler.from_config(saved).config  # with the defaults filled in
    for name, neutral in SCHEDULER_NEUTRAL.items():
        if settings[name] != neutral:
            raise ConfigError(f"init: {init}'s scheduler sets {name}={settings[name]}, which pixrun's sampler "
                              f"does not do (it needs {neutral})")
    if settings["num_train_timesteps"] != TRAIN_TIMESTEPS:
        raise ConfigError(f"init: {init}'s scheduler has num_train_timesteps={settings['num_train_timesteps']}, "
                          f"pixrun's time grid {TRAIN_TIMESTEPS}")
    return float(settings["shift"])


def tokenizer_budget(init: str) -> int:
    """PRXPipeline pads and truncates prompts to its tokenizer's model_max_length."""
    import transformers

    try:
        limit = transformers.AutoTokenizer.from_pretrained(init, subfolder="tokenizer").model_max_length
    except (OSError, ValueError) as e:
        raise ConfigError(f"init: cannot read {init}/tokenizer: {str(e).splitlines()[0]}") from None
    if limit > UNBOUNDED_TOKENS:
        raise ConfigError(f"init: {init}'s tokenizer sets no model_max_length, which PRXPipeline pads prompts to")
    return int(limit)


def latent_channels(init: str, index: dict) -> int | None:
    """The pipeline VAE's latent channels; None for a pipeline without one."""
    import diffusers

    library, name = index.get("vae") or (None, None)
    if name is None:
        return None
    if library != "diffusers" or name not in AUTOENCODER_CLASSES:
        raise ConfigError(f"init: {init}'s vae is a {name}; pixrun takes AutoencoderKL or AutoencoderDC")
    return int(load_configs(init, getattr(diffusers, name), "vae")["latent_channels"])


def pipeline_settings(index: dict, cls) -> dict:
    """The pipeline's own settings (default_sample_size, prompt_max_tokens, noise_scale...): model_index.json's,
    with the class's defaults for those it leaves out."""
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in index.items() if k in defaults}}


def resolve_init(config: Config, warn: Callable[[str], None] | None = print) -> Config:
    """A copy of `config` that describes the diffusers PRXPipeline or PRXPixelPipeline `config.init` names (module
    docstring); `config` itself when init is "". Deterministic, and resolving twice changes nothing. Settings the
    user gave (`Config.user_set`) that the pipeline replaces are named in one line to `warn`."""
    if not config.init:
        return config
    import diffusers

    init = config.init
    index = load_configs(init, diffusers.DiffusionPipeline)
    kind = index.get("_class_name")
    if kind not in PREDICTION:
        raise ConfigError(f"init: {init} is a {kind}; pixrun starts from a PRXPipeline or a PRXPixelPipeline")
    settings = pipeline_settings(index, getattr(diffusers, kind))
    model = model_settings(init)
    channels = latent_channels(init, index)
    pixel = kind == "PRXPixelPipeline"
    if not pixel and channels is None:
        raise ConfigError(f"init: {init} is a PRXPipeline without a vae; pixrun's latent space needs one")
    expected = 3 if pixel else channels
    if model["in_channels"] != expected:
        raise ConfigError(f"init: {init}'s transformer takes {model['in_channels']} channels, but its "
                          f"{'images' if pixel else 'vae'} give {expected}")

    out = copy.deepcopy(config)
    out.model = dataclasses.replace(out.model, **model)
    out.text = dataclasses.replace(
        out.text, encoder=init, encoder_class="auto", subfolder="text_encoder", tokenizer_subfolder="tokenizer",
        clean="basic" if pixel else "prx",
        max_tokens=int(settings["prompt_max_tokens"]) if pixel else tokenizer_budget(init),
    )
    out.latent = LatentConfig(vae="" if pixel else init, subfolder="" if pixel else "vae", dtype=out.latent.dtype)
    flow = {"prediction": PREDICTION[kind], "noise_scale": float(settings["noise_scale"]) if pixel else 1.0,
            "noise_scale_base": 0}
    if pixel:
        flow["t_clamp"] = PIXEL_T_CLAMP
    out.flow = dataclasses.replace(out.flow, **flow)
    out.sample = dataclasses.replace(out.sample, time_grid="diffusers", sampler="euler", cfg_interval=[0.0, 1.0],
                                     shift=scheduler_shift(init))
    out.validate()
    replaced = [f"{key}={setting(config, key)!r} (now {setting(out, key)!r})" for key in sorted(config.user_set)
                if setting(config, key) != setting(out, key) and not dataclasses.is_dataclass(setting(config, key))]
    if replaced and warn is not None:
        warn(f"pixrun: warning: init {init} replaces what the config set: {', '.join(replaced)}")
    return out


def setting(config: Config, key: str):
    """The value of dotted setting `key` ("model.width") in `config`."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def transformer_weight_files(init: str) -> list[Path]:
    """The transformer's safetensors files (one, or the shards its index names): from the local folder, or
    downloaded from the hub (only these files)."""
    folder = Path(init) / "transformer"
    if not Path(init).is_dir():
        from huggingface_hub import snapshot_download

        patterns = [f"transformer/{name}" for name in WEIGHT_FILES] + [
            "transformer/diffusion_pytorch_model-*-of-*.safetensors"]
        try:
            folder = Path(snapshot_download(init, allow_patterns=patterns)) / "transformer"
        except (OSError, ValueError) as e:  # unreachable, unknown or gated repo; an invalid repo id
            raise ConfigError(f"init: cannot download {init}'s transformer: {str(e).splitlines()[0]}") from None
    single, index = (folder / name for name in WEIGHT_FILES)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if single.is_file():
        return [single]
    raise ConfigError(f"init: {folder} holds no {WEIGHT_FILES[0]} (pixrun reads safetensors, not variants)")


def load_init_weights(pipeline, config: Config) -> None:
    """Copy the `config.init` pipeline's transformer weights into `pipeline.denoiser` (a fresh, unsharded one): the
    names are diffusers' already. Every weight must be there with its shape, and no other."""
    if not config.init:
        return
    from safetensors import safe_open

    own = pipeline.denoiser.state_dict()
    found = set()
    with torch.no_grad():
        for file in transformer_weight_files(config.init):
            with safe_open(file, "pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                    if name not in own:
                        raise ConfigError(f"init: {config.init}'s transformer has {name}, which pixrun's denoiser "
                                          "does not")
                    tensor = weights.get_tensor(name)
                    if tensor.shape != own[name].shape:
                        raise ConfigError(f"init: {config.init}'s {name} is {tuple(tensor.shape)}, pixrun's denoiser's "
                                          f"{tuple(own[name].shape)}")
                    own[name].copy_(tensor)
                    found.add(name)
    # SPRINT's fusion layer and the pixel head are pixrun's own: they keep their initialisation, under which the
    # prediction is the released model's
    missing = sorted(name for name in set(own) - found if not name.startswith(("sprint_fusion.", "pixel_head.")))
    if missing:
        raise ConfigError(f"init: {config.init}'s transformer lacks {len(missing)} weights, e.g. {missing[0]}")
