"""The loss terms beside the flow loss, as the training step uses them: built from config only when switched on,
gated by t, switched per stage, each reported on its own so its share of the loss can be logged."""

import torch
from torch import nn

from pixrun.losses import gated_mean
from pixrun.losses.lpips import LPIPS
from pixrun.losses.pdino import PDino
from pixrun.losses.repa import REPA, load_teacher


class AuxiliaryLosses:
    def __init__(self, config, width: int, device: torch.device):
        self.config = config
        self.lpips = LPIPS.from_config(config.lpips).to(device) if config.lpips.weight > 0 else None
        self.teacher = load_teacher(config.repa).to(device) if config.repa.weight > 0 else None
        self.pdino = None
        if config.pdino.weight > 0:
            shared = self.teacher is not None and (config.pdino.source, config.pdino.random_init) == (
                config.repa.teacher, config.repa.random_init)
            self.pdino = PDino.from_config(config.pdino, dino=self.teacher if shared else None).to(device)
        # the one trainable part: REPA's projector, optimised and checkpointed with the model
        self.projector = REPA(width, self.teacher.dim, config.repa.hidden).to(device) if self.teacher else None

    def trainable(self) -> dict[str, nn.Module]:
        return {"repa_projector": self.projector} if self.projector is not None else {}

    def compares_images(self, stage) -> bool:
        """Whether a term on in `stage` looks at x̂₀ as an image (LPIPS, P-DINO): in latent space it is decoded."""
        return (self.lpips is not None and stage.uses("lpips")) or (self.pdino is not None and stage.uses("pdino"))

    def repa_block(self, stage, step: int) -> int | None:
        """The denoiser block whose output REPA aligns at this step, or None when REPA is off."""
        if self.projector is None or not stage.uses("repa") or not self.config.repa.active(step):
            return None
        return self.config.repa.block

    def __call__(self, x0_hat, x0, t, plan, stage, step: int, patch: int,
                 hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each active term, already weighted; `hidden`: the output of `repa_block(stage, step)`; x0_hat and x0 are
        images, `patch` the pixels per side of one denoiser token."""
        c, terms = self.config, {}
        if self.lpips is not None and stage.uses("lpips"):
            terms["lpips"] = c.lpips.weight * gated_mean(self.lpips(x0_hat, x0), t, c.lpips.max_t)
        if self.pdino is not None and stage.uses("pdino"):
            terms["pdino"] = c.pdino.weight * gated_mean(self.pdino(x0_hat, x0), t, c.pdino.max_t)
        if hidden is not None:
            with torch.no_grad():
                target = self.teacher.grid_tokens(x0, (x0.shape[-2] // patch, x0.shape[-1] // patch))
            kept = plan.tokens_at(c.repa.block) if plan is not None else None
            terms["repa"] = c.repa.weight * self.projector(hidden, target, kept).mean()
        return terms
