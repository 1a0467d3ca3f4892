"""Latent space: a frozen diffusers autoencoder between images and what the denoiser sees.

Pixel space is the default (`latent.vae: ""`). Naming a diffusers `AutoencoderKL` (Flux's VAE: 16 channels, 8x)
or `AutoencoderDC` (DC-AE: 32x) by hub id or local folder makes the flow run on its latents, scaled as diffusers'
PRXPipeline expects them: latents = (z - shift) * scale, with the folder's `shift_factor` and `scaling_factor`
(0.0 and 0.18215 when absent, as PRXPipeline reads them). Encoding takes the posterior's mode (deterministic), so
latents precomputed by `pixrun data prepare` equal those computed in training.

diffusers is an optional dependency: it is imported when an autoencoder is built.
"""

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from pixrun.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
AUTOENCODER_CLASSES = ("AutoencoderKL", "AutoencoderDC")


@dataclass
class LatentConfig:
    vae: str = ""  # "" = pixel space (the default, the recipe); else a hub id or local folder of a diffusers
    # AutoencoderKL (Flux VAE) or AutoencoderDC (DC-AE)
    subfolder: str = ""  # e.g. "vae" when `vae` names a whole pipeline folder or hub repo
    dtype: str = "float32"  # the frozen autoencoder's weights: float32 | bfloat16

    @property
    def enabled(self) -> bool:
        return bool(self.vae)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"latent.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.subfolder and not self.vae:
            raise ValueError("latent.subfolder is set but latent.vae is empty (pixel space)")


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("latent.vae needs diffusers, which is not installed: pip install diffusers") from None
    return diffusers


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor's name, shape, dtype and a spread-out sample of its values: cheap, and it tells
    other weights apart."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.state_dict().items():
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(p.flatten()[:: max(1, p.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


class Autoencoder(nn.Module):
    """A frozen diffusers autoencoder: images in [-1, 1] <-> scaled latents (C, H / factor, W / factor)."""

    def __init__(self, vae: nn.Module, config: LatentConfig):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.config = config
        settings = vae.config
        self.channels = int(settings.latent_channels)
        # As PRXPipeline.vae_scale_factor: DC-AE states its ratio, a KL VAE halves the size per block but the last.
        if hasattr(vae, "spatial_compression_ratio"):
            self.factor = int(vae.spatial_compression_ratio)
        else:
            self.factor = 2 ** (len(settings.block_out_channels) - 1)
        self.scale = float(getattr(settings, "scaling_factor", 0.18215))
        self.shift = float(getattr(settings, "shift_factor", 0.0) or 0.0)  # a KL VAE may store null

    @classmethod
    def from_config(cls, config: LatentConfig) -> "Autoencoder":
        """The autoencoder `config.vae` names (hub id or local folder, with `config.subfolder`), its class read
        from the folder's config (`_class_name`), its weights in `config.dtype`."""
        config.validate()
        if not config.enabled:
            raise ValueError("latent.vae is empty: pixel space has no autoencoder")
        diffusers = import_diffusers()
        subfolder = config.subfolder or None
        where = f"{config.vae!r}" + (f" (subfolder {config.subfolder!r})" if subfolder else "")
        try:
            settings = diffusers.AutoencoderKL.load_config(config.vae, subfolder=subfolder)
        except OSError as error:
            hint = "" if subfolder else "; for a pipeline folder set latent.subfolder (e.g. \"vae\")"
            raise ConfigError(f"latent.vae {where} has no readable autoencoder config ({error}){hint}") from None
        name = settings.get("_class_name")
        if name not in AUTOENCODER_CLASSES:
            raise ConfigError(f"latent.vae {where} is a {name!r}; pixrun takes {' or '.join(AUTOENCODER_CLASSES)}")
        vae = getattr(diffusers, name).from_pretrained(config.vae, subfolder=subfolder, torch_dtype=DTYPES[config.dtype])
        return cls(vae, config)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> "Autoencoder":
        """Frozen: stays in eval mode whatever the training loop asks."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, channels, H / factor, W / factor) scaled latents, float32 on the
        autoencoder's device. A KL posterior gives its mode, not a sample: the same image, the same latents."""
        out = self.vae.encode(images.to(self.device, self.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        return (z.float() - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images, about [-1, 1] and not clamped, float32; differentiable with
        respect to `latents` (the perceptual losses see decoded predictions), never into the frozen weights."""
        z = (latents.float() / self.scale + self.shift).to(self.device, self.dtype)
        return self.vae.decode(z, return_dict=False)[0].float()

    def identity(self) -> dict:
        """What determines the latents: the autoencoder as named, its class, dtype, latent format and a fingerprint
        of its weights. Prepared shards record it; training compares all but the naming (`vae`, `subfolder`)."""
        return {
            "vae": self.config.vae, "subfolder": self.config.subfolder, "dtype": self.config.dtype,
            "class": type(self.vae).__name__, "channels": self.channels, "factor": self.factor,
            "shift": self.shift, "scale": self.scale, "weights": weights_fingerprint(self.vae),
        }
