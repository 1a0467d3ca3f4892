"""The loss terms beside the flow loss, as the training step uses them: every registered term (pixrun.losses
.LOSS_TERMS) whose weight is not 0 is built; at each step the terms on in that step's stage and not past their
`until_step` run, each weighted and gated by t, each reported on its own so its share of the loss can be logged.

The built-in terms register themselves when their modules are imported (BUILT_IN, here).
"""

import torch
from torch import nn

from pixrun.losses import (
    LOSS_TERMS,
    LossConfig,
    LossInputs,
    LossTerm,
    gated_mean,
    lpips,
    pdino,
    repa,
    self_align,
    shapes_perceptual,
)

# importing a term's module registers it: these, in the order they are summed
BUILT_IN = (lpips, pdino, repa, self_align, shapes_perceptual)


def default_loss_sections() -> dict[str, LossConfig]:
    """Every registered term's config section at its defaults (switched off)."""
    return {name: term.config_class() for name, term in LOSS_TERMS.items()}


def terms_on(sections: dict[str, LossConfig], stage, step: int) -> list[str]:
    """The terms that run at `step` of `stage` (a StageConfig): weighted, switched on in the stage, not past
    their until_step; in registry order."""
    return [name for name in LOSS_TERMS if name in sections and sections[name].active(step) and stage.uses(name)]


def hidden_block(terms: list[LossTerm]) -> int | None:
    """The one denoiser block whose output `terms` need (the denoiser returns one), or None."""
    blocks = {block for term in terms if (block := term.hidden_block()) is not None}
    if len(blocks) > 1:
        raise ValueError(f"loss terms ask for the outputs of blocks {sorted(blocks)}; the denoiser gives one")
    return blocks.pop() if blocks else None


class AuxiliaryLosses:
    def __init__(self, sections: dict[str, LossConfig], width: int, device: torch.device):
        """`sections`: Config.losses; `width`: the denoiser's."""
        self.sections = sections
        shared: dict = {}  # frozen networks terms share (P-DINO's and REPA's DINO when they name the same, the shapes network)
        self.terms: dict[str, LossTerm] = {
            name: term.build(sections[name], width, device, shared)
            for name, term in LOSS_TERMS.items() if name in sections and sections[name].weight > 0
        }

    def trainable(self) -> dict[str, nn.Module]:
        """The terms' trained modules (REPA's projector), by the names their weights carry in checkpoints."""
        return {key: module for term in self.terms.values() for key, module in term.trainable().items()}

    def on(self, stage, step: int) -> list[LossTerm]:
        return [self.terms[name] for name in terms_on(self.sections, stage, step) if name in self.terms]

    def compares_images(self, stage, step: int) -> bool:
        """Whether a term on at this step looks at x̂₀ as an image (LPIPS, P-DINO): in latent space it is decoded."""
        return any(term.compares_images for term in self.on(stage, step))

    def hidden_block(self, stage, step: int) -> int | None:
        """The denoiser block whose output a term on at this step needs, or None."""
        return hidden_block(self.on(stage, step))

    def __call__(self, inputs: LossInputs, stage) -> dict[str, torch.Tensor]:
        """Each term on at `inputs.step` of `stage`, weighted and t-gated."""
        return {term.name: term.config.weight * gated_mean(term(inputs), inputs.t, term.config.max_t)
                for term in self.on(stage, inputs.step)}
