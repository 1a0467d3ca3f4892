"""Flow matching with x-prediction: the whole noise schedule and loss, in PRX's convention.

    x_t = (1 - t) * x0 + t * s * eps        t = 1 is pure noise, s = noise scale
    v   = dx_t/dt = s * eps - x0

The network may predict x0, eps or v (`prediction`) and be trained in any of the three spaces (`loss`); a
prediction is converted to the loss space with t clamped away from the singular end, as in JiT and PRX.

Contrastive flow matching (ΔFM, as PRX trains): the loss minus `contrastive` times the squared error against another
sample's target, which pushes predictions of different conditions apart. The other sample is the row's partner in
consecutive pairs (0-1, 2-3, ...), so with an even batch on every rank no pair spans two ranks and 1 and N processes
train the same model.
"""

from dataclasses import dataclass

import torch

SPACES = ("x", "eps", "v")


@dataclass
class FlowConfig:
    prediction: str = "x"  # what the network outputs: x | eps | v
    loss: str = "v"  # the space the squared error is taken in: x | eps | v
    t_mu: float = 0.0  # logit-normal location
    t_sigma: float = 1.0  # logit-normal scale
    t_shift: float = 3.0  # s * t / (1 + (s - 1) * t); > 1 moves training toward noise
    uniform_fraction: float = 0.1  # share of t drawn uniformly, so no noise level goes unseen
    noise_scale: float = 1.0
    noise_scale_base: int = 0  # > 0: noise scale x sqrt(H * W) / base, growing with resolution (JiT: size / 256)
    t_clamp: float = 0.05  # divisions by t (or 1 - t) never go below this
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt, for guidance
    contrastive: float = 0.0  # contrastive flow matching's lambda (PRX: 0.1); 0 = off

    def validate(self) -> None:
        for name in ("prediction", "loss"):
            if getattr(self, name) not in SPACES:
                raise ValueError(f"flow.{name} must be one of {', '.join(SPACES)}, got {getattr(self, name)!r}")
        if self.t_sigma <= 0 or self.t_shift <= 0 or self.noise_scale <= 0:
            raise ValueError("flow.t_sigma, flow.t_shift and flow.noise_scale must be positive")
        if not 0 <= self.uniform_fraction <= 1 or not 0 <= self.caption_dropout <= 1:
            raise ValueError("flow.uniform_fraction and flow.caption_dropout must lie in [0, 1]")
        if self.noise_scale_base < 0:
            raise ValueError("flow.noise_scale_base must be 0 (off) or a resolution")
        if not 0 < self.t_clamp < 1:
            raise ValueError("flow.t_clamp must lie in (0, 1)")
        if not 0 <= self.contrastive < 1:
            raise ValueError("flow.contrastive must lie in [0, 1)")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sampling_times(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (clean): a linear grid warped by the same shift as training."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


class Flow:
    def __init__(self, config: FlowConfig):
        config.validate()
        self.config = config

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        device = generator.device if generator is not None else None
        t = torch.sigmoid(c.t_mu + c.t_sigma * torch.randn(n, generator=generator, device=device))
        t = shift_time(t, c.t_shift)
        uniform = torch.rand(n, generator=generator, device=device)
        use_uniform = torch.rand(n, generator=generator, device=device) < c.uniform_fraction
        return torch.where(use_uniform, uniform, t)

    def noise_scale(self, like: torch.Tensor) -> float:
        """s for images shaped like `like` (..., H, W)."""
        c = self.config
        if not c.noise_scale_base:
            return c.noise_scale
        return c.noise_scale * (like.shape[-2] * like.shape[-1]) ** 0.5 / c.noise_scale_base

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _expand(t, x0)
        return (1 - t) * x0 + t * self.noise_scale(x0) * eps

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Express a prediction of `src` (x | eps | v) at (x_t, t) as the matching `dst`."""
        if src == dst:
            return pred
        s, clamp = self.noise_scale(x_t), self.config.t_clamp
        t = _expand(t, x_t)
        if src == "x":
            x0 = pred
        elif src == "eps":
            x0 = (x_t - t * s * pred) / (1 - t).clamp(min=clamp)
        else:
            x0 = x_t - t * pred
        if dst == "x":
            return x0
        if dst == "v":
            return (x_t - x0) / t.clamp(min=clamp)
        return (x_t - (1 - t) * x0) / (s * t.clamp(min=clamp))

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.convert(pred, x_t, t, self.config.prediction, "x")

    def to_v(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.convert(x0, x_t, t, "x", "v")

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What a perfect network outputs, in the prediction's own space."""
        p = self.config.prediction
        return x0 if p == "x" else eps if p == "eps" else self.noise_scale(x0) * eps - x0

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean squared error in the loss space; prediction and truth go through the same conversion. With
        `contrastive`, minus lambda times the error against the partner row's truth (a row without one: none)."""
        c = self.config
        pred_l = self.convert(pred.float(), x_t, t, c.prediction, c.loss)
        true_l = self.convert(self.target(x0, eps), x_t, t, c.prediction, c.loss)
        loss = (pred_l - true_l).pow(2).mean()
        if c.contrastive:
            partner, paired = partner_rows(len(pred_l), pred_l.device)
            apart = (pred_l - true_l[partner]).pow(2).flatten(1).mean(1)
            loss = loss - c.contrastive * (apart * paired).mean()
        return loss


def partner_rows(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's partner in consecutive pairs (0-1, 2-3, ...), and whether it has one (the last of an odd count
    has none and is its own)."""
    rows = torch.arange(n, device=device)
    partner = rows ^ 1
    paired = partner < n
    return torch.where(paired, partner, rows), paired.float()


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
