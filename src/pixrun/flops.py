"""Model FLOPs per image of one training step, counted by torch's FlopCounterMode on the meta device.

Each network of the step is built on the meta device (shapes only: no memory, no arithmetic) and run on one image
under `torch.utils.flop_counter.FlopCounterMode`, forward and, where the step has one, backward, so what is counted
is what autograd runs. The usual conventions for MFU follow from the counter: a multiply-add is 2 FLOPs and only
matmuls count (linear layers, convolutions, attention, batched matmuls); norms, activations, softmax, RoPE,
resizing, the loss arithmetic, the optimizer and EMA do not. Per part:

- the denoiser trains: forward + backward to its weights and to the text states when the text tower trains
  (about 3× its forward); with SPRINT (`tread.fusion: sprint`) its fusion layer counts too;
- the text encoder: forward + backward when it trains jointly, its forward when it is frozen;
- each loss term on at the step counts its own (`LossTerm.flops`): LPIPS's VGG and P-DINO's ViT are frozen but
  differentiated through: forward on x̂₀ and on x₀, backward to x̂₀ without weight gradients (3× one forward, plus
  attention's products once more: their backward needs the gradients of both operands); REPA: its teacher's
  forward on x₀, and the projector's forward + backward on the tokens its block saw; self_align: its projector's,
  and the EMA denoiser's forward up to `self_align.target_block` on all tokens (`LossTerm.ema_blocks`);
- in latent space the denoiser and REPA's token grid are the latents' (resolution / the VAE's factor), and the
  frozen VAE counts where the step runs it: its encoder's forward on x₀ unless the latents come prepared, and its
  decoder's forward + backward to x̂₀ when LPIPS or P-DINO look at the decoded image.
"""

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from pixrun.config import Config
from pixrun.latent import Autoencoder
from pixrun.losses import LOSS_TERMS, counted_flops
from pixrun.losses.auxiliary import terms_on
from pixrun.model import Denoiser, ModelConfig, RoutePlan, TokenRouting
from pixrun.text import TextConfig, encoder_class


@dataclass
class FlopCount:
    """FLOPs per image of one training step, by part (see the module's conventions)."""

    denoiser_forward: int
    denoiser: int  # training: forward + backward
    text_encoder: int
    autoencoder: int = 0  # latent space: the frozen VAE's encode and decode, where the step runs them
    terms: dict[str, int] = field(default_factory=dict)  # every registered loss term's (0 where it is off)

    @property
    def losses(self) -> int:
        return sum(self.terms.values())

    @property
    def total(self) -> int:
        return self.denoiser + self.text_encoder + self.losses + self.autoencoder

    def as_dict(self) -> dict[str, int]:
        return {"denoiser_forward": self.denoiser_forward, "denoiser": self.denoiser,
                "text_encoder": self.text_encoder, **self.terms, "autoencoder": self.autoencoder,
                "losses": self.losses, "total": self.total}


def meta_denoiser(
    model: ModelConfig, resolution: int, routing: TokenRouting | None, sprint_span: range | None = None
) -> tuple[Denoiser, RoutePlan | None]:
    """The denoiser on the meta device (with SPRINT's fusion after `sprint_span`), and a TREAD plan for one image
    (None: not routed)."""
    with torch.device("meta"):
        denoiser = Denoiser(model, sprint_span)
    if routing is None:
        return denoiser, None
    tokens = (resolution // model.patch_size) ** 2
    return denoiser, denoiser.plan_routing(routing, tokens, [torch.Generator()], "meta")


def denoiser_flops(
    model: ModelConfig, resolution: int, text_tokens: int, routing: TokenRouting | None = None,
    text_trained: bool = False, sprint_span: range | None = None,
) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one resolution² image through the denoiser, with text padded to
    `text_tokens`; with `routing`, TREAD's routed tokens skip its blocks; with `sprint_span`, SPRINT's fusion
    runs after those blocks. `text_trained`: the backward also reaches the text states."""
    denoiser, plan = meta_denoiser(model, resolution, routing, sprint_span)
    with torch.device("meta"):
        x, t = torch.empty(1, model.in_channels, resolution, resolution), torch.empty(1)
        txt = torch.empty(1, text_tokens, model.context_dim, requires_grad=text_trained)
    counter = FlopCounterMode(display=False)
    with counter:
        out = denoiser(x, t, txt, routing=plan)
        forward = counter.get_total_flops()
        out.sum().backward()
    return forward, counter.get_total_flops()


def ema_forward_flops(model: ModelConfig, resolution: int, text_tokens: int, blocks: int,
                      sprint_span: range | None = None) -> int:
    """The EMA denoiser's forward through its first `blocks` blocks on one resolution² image, all tokens, without
    gradient (self_align's teacher); 0 for no block."""
    if blocks == 0:
        return 0
    denoiser, _ = meta_denoiser(model, resolution, None, sprint_span)
    with torch.device("meta"):
        x, t = torch.empty(1, model.in_channels, resolution, resolution), torch.empty(1)
        txt = torch.empty(1, text_tokens, model.context_dim)
    with torch.no_grad():
        return counted_flops(lambda: denoiser(x, t, txt, hidden_at=blocks - 1, stop_at_hidden=True))


def text_encoder_flops(text: TextConfig, encoder: PretrainedConfig, text_tokens: int, trained: bool) -> int:
    """A transformers text encoder (the class pixrun's text tower uses for `encoder`) on `text_tokens` tokens:
    forward + backward when it trains, else its forward."""
    with torch.device("meta"):
        model = encoder_class(text, encoder.model_type)(encoder)
        ids = torch.zeros(1, text_tokens, dtype=torch.long)
        # ready-made and 4-D, so transformers uses it as it is: making one from a 2-D mask reads its values, which
        # meta tensors do not have
        mask = torch.ones(1, 1, 1, text_tokens, dtype=torch.bool)
    if trained:
        return counted_flops(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward())
    with torch.no_grad():
        return counted_flops(lambda: model(input_ids=ids, attention_mask=mask))


def training_flops(
    config: Config, step: int, text_tokens: int, text_encoder: PretrainedConfig | None = None,
    autoencoder: Autoencoder | None = None, prepared_latents: bool = False,
) -> FlopCount:
    """FLOPs per image of training step `step` of `config`: at its stage's resolution, with the TREAD routing and
    the loss terms that stage runs at that step. `text_encoder`: the transformers config of the text tower's
    encoder, counted as trained or frozen as `config.text` says; None leaves the tower uncounted (its states come
    precomputed).
    `autoencoder`: the run's VAE in latent space (its encoder uncounted when the latents are `prepared_latents`)."""
    stage, _ = config.stage_at(step)
    resolution, trained_text = stage.resolution, config.text.trainable
    grid_resolution = resolution // (autoencoder.factor if autoencoder is not None else 1)
    routing = config.tread if stage.routes(config.tread) else None
    sprint_span = config.tread.sprint_span(config.model.depth)
    forward, training = denoiser_flops(config.model, grid_resolution, text_tokens, routing, trained_text,
                                       sprint_span)

    on = terms_on(config.losses, stage, step)
    grid = grid_resolution // config.model.patch_size
    plan = meta_denoiser(config.model, grid_resolution, routing)[1] if on else None

    def term_flops(name: str) -> int:
        term, section = LOSS_TERMS[name], config.losses[name]
        return (term.flops(section, config.model, resolution, grid, plan)
                + ema_forward_flops(config.model, grid_resolution, text_tokens, term.ema_blocks(section),
                                    sprint_span))

    terms = {name: term_flops(name) if name in on else 0 for name in config.losses}
    text = 0
    if text_encoder is not None:
        text = text_encoder_flops(config.text, text_encoder, text_tokens, trained_text)
    vae = 0
    if autoencoder is not None:
        vae = autoencoder_flops(autoencoder, resolution, encode=not prepared_latents,
                                decode=any(LOSS_TERMS[name].compares_images for name in on))
    return FlopCount(forward, training, text, vae, terms)


def autoencoder_flops(autoencoder: Autoencoder, resolution: int, encode: bool, decode: bool) -> int:
    """The frozen VAE on one image: its encoder's forward (`encode`), its decoder's forward and backward to the
    latents (`decode`: no weight gradients)."""
    with torch.device("meta"):
        meta = Autoencoder(type(autoencoder.vae).from_config(autoencoder.vae.config), autoencoder.config)
        image = torch.empty(1, 3, resolution, resolution)
        side = resolution // autoencoder.factor
        latents = torch.empty(1, autoencoder.channels, side, side, requires_grad=True)

    def step():
        if encode:
            meta.encode(image)
        if decode:
            meta.decode(latents).sum().backward()

    return counted_flops(step)
