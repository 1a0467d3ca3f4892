"""Loss terms beside the flow loss: LPIPS and P-DINO on x̂₀, REPA on a block's tokens.

Each lives in its own module with its own config section and registers itself here (`register_loss`); this file
holds what they share: the registry and the term's interface (`LossTerm`, `LossConfig`, `LossInputs`), loading
pretrained weights (a local file or a URL) with the one-line error when they are absent, the t-gate, and FLOP
counting on the meta device.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pixrun.errors import WeightsMissingError
from pixrun.model import ModelConfig, RoutePlan


def load_weights(source: str, what: str, config_key: str, random_key: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pth file, or from a URL of one (kept in torch.hub's cache)."""
    demo = f"(or {random_key}=true for a meaningless CPU demo)"
    if source.startswith(("http://", "https://")):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(source).path).name
        if not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(source, str(path), progress=False)
            except OSError as e:  # no DNS, refused, HTTP errors: all OSErrors
                raise WeightsMissingError(
                    f"could not download {what} from {source} ({e.__class__.__name__}): fetch it on a machine with "
                    f"network and put it at {path}, or anywhere and set {config_key}=/path/to/file {demo}"
                ) from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsMissingError(
                f"{what} not found at {path}: download it (docs/losses.md) and put it there, or set {config_key} "
                f"to where it is {demo}"
            )
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def gated_mean(per_sample: torch.Tensor, t: torch.Tensor, max_t: float) -> torch.Tensor:
    """Batch mean of a per-sample loss, counted only where t <= max_t (t = 1 is pure noise); others count as 0."""
    return (per_sample * (t <= max_t).to(per_sample.dtype)).mean()


def counted_rows(t: torch.Tensor, max_t: float) -> torch.Tensor | None:
    """The rows a term gated at `max_t` counts (t <= max_t), for running its network on those alone; None where every
    row counts, or where picking rows would make the host wait for the device (a GPU's nonzero does), so the term runs
    on every row and the gate masks it."""
    if max_t >= 1 or t.device.type != "cpu":
        return None
    return (t <= max_t).nonzero().flatten()


def counted_flops(run) -> int:
    """The FLOPs torch's FlopCounterMode counts while `run()` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def perceptual_flops(loss: nn.Module, resolution: int) -> int:
    """A frozen perceptual loss on x̂₀ against x₀ for one resolution² image, backward to x̂₀, on the meta device."""
    with torch.device("meta"):
        x_hat = torch.empty(1, 3, resolution, resolution, requires_grad=True)
        x0 = torch.empty(1, 3, resolution, resolution)
    return counted_flops(lambda: loss(x_hat, x0).sum().backward())


# The registry: every loss term beside the flow loss, by the name of its config section.


@dataclass
class LossConfig:
    """What every loss term's config section has: its weight and its two gates, applied by AuxiliaryLosses."""

    weight: float = 0.0  # λ; 0 switches the term off (it is not even built)
    max_t: float = 1.0  # applied only where t <= max_t (t = 1 is noise); 1 = every noise level
    until_step: int | None = None  # switched off from this step on; None: the whole run

    def validate(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0 < self.max_t <= 1:
            raise ValueError(f"max_t must lie in (0, 1], got {self.max_t}")

    def fits(self, model: ModelConfig) -> None:
        """Raise ValueError when the term, switched on, cannot work with this denoiser."""

    def active(self, step: int) -> bool:
        return self.weight > 0 and (self.until_step is None or step < self.until_step)


@dataclass
class LossInputs:
    """What a training step offers the loss terms (each takes what it declared it needs)."""

    x0_hat: torch.Tensor  # the prediction as x̂₀; an image (decoded in latent space) when a term compares images
    images: torch.Tensor  # the real images, (B, 3, H, W) in [-1, 1]
    t: torch.Tensor  # (B,) noise levels
    step: int
    pixels_per_token: int  # image pixels per side of one denoiser token
    routing: RoutePlan | None = None  # TREAD's plan of this step, None when not routed
    hidden: torch.Tensor | None = None  # the output of the block the terms asked for (`LossTerm.hidden_block`)
    # (t, block) -> the EMA denoiser's output of `block`, all (B, N, width) tokens, without gradient, on this step's
    # x₀ and noise mixed at levels t (self_align's teacher); run only when a term calls it
    ema_hidden: Callable[[torch.Tensor, int], torch.Tensor] | None = None


class LossTerm:
    """One loss term: a file in `losses/` (or anywhere) with a subclass registered by `register_loss`.

    It declares its config section (`name`, `config_class`: a LossConfig), whether it compares x̂₀ with the real
    image as images (`compares_images`: in latent space x̂₀ is then decoded for it), and the denoiser block whose
    output it needs (`hidden_block`) and how many of the EMA denoiser's blocks it runs (`ema_blocks`); it builds its networks (`build`), gives its per-sample loss (`__call__`), its
    trained modules (`trainable`: optimised, EMA'd and checkpointed with the model under their names) and its FLOPs
    per image (`flops`). Weight, t-gate, step gate and per-stage switch are applied by AuxiliaryLosses."""

    name: ClassVar[str]
    config_class: ClassVar[type[LossConfig]]
    compares_images: ClassVar[bool] = False

    def __init__(self, config: LossConfig):
        self.config = config

    @classmethod
    def build(cls, config: LossConfig, width: int, device: torch.device, shared: dict) -> "LossTerm":
        """The term with its networks on `device`; `width`: the denoiser's; `shared`: frozen networks other terms
        built, by a key of their making (a term loading one another already loaded takes it from there)."""
        raise NotImplementedError

    def hidden_block(self) -> int | None:
        """The denoiser block whose output this term needs in `LossInputs.hidden`; None: none."""
        return None

    def trainable(self) -> dict[str, nn.Module]:
        return {}

    @classmethod
    def ema_blocks(cls, config: LossConfig) -> int:
        """How many of the EMA denoiser's first blocks the term runs per step through `LossInputs.ema_hidden`;
        `pixrun.flops` counts that forward (all tokens, with the step's text) as the term's. 0: none."""
        return 0

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        """(B,) per-sample losses."""
        raise NotImplementedError

    @classmethod
    def flops(cls, config: LossConfig, model: ModelConfig, resolution: int, grid: int, routing: RoutePlan | None) -> int:
        """FLOPs per image of one training step (pixrun.flops's conventions), built on the meta device: the image is
        resolution² pixels, the denoiser's token grid `grid` per side, `routing` TREAD's plan for one image."""
        raise NotImplementedError


class ImageDistanceTerm(LossTerm):
    """A term that is a frozen network's distance between x̂₀ and x₀ as images (LPIPS, P-DINO, the shapes world's
    perceptual loss): a subclass builds its network and says how to make one on the meta device for its FLOPs."""

    compares_images = True

    def __init__(self, config: LossConfig, network: nn.Module):
        super().__init__(config)
        self.network = network

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        rows = counted_rows(inputs.t, self.config.max_t)
        if rows is None:
            return self.network(inputs.x0_hat, inputs.images)
        # the network on the rows the gate counts; the others are 0, as the gate would make them
        distances = self.network(inputs.x0_hat[rows], inputs.images[rows])
        return distances.new_zeros(len(inputs.t)).index_put((rows,), distances)

    @classmethod
    def meta_network(cls, config: LossConfig) -> nn.Module:
        """The term's network on the meta device (called under `torch.device("meta")`), for counting FLOPs."""
        raise NotImplementedError

    @classmethod
    def flops(cls, config: LossConfig, model: ModelConfig, resolution: int, grid: int,
              routing: RoutePlan | None) -> int:
        """Its network on every image: what a GPU runs; a CPU runs a term gated below max_t < 1 on fewer
        (`counted_rows`), so there this overstates it."""
        with torch.device("meta"):
            network = cls.meta_network(config)
        return perceptual_flops(network, resolution)


LOSS_TERMS: dict[str, type[LossTerm]] = {}  # name -> term, in the order terms are built and summed


def register_loss(term: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: `term` becomes available as config section `term.name` and stage switch."""
    if term.name in LOSS_TERMS and LOSS_TERMS[term.name] is not term:
        raise ValueError(f"a loss term named {term.name!r} is already registered")
    LOSS_TERMS[term.name] = term
    return term
