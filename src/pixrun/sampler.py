"""Sampling: Euler and Heun over the x0 -> v conversion, with classifier-free guidance.

The ODE solvers see only a function (x_t, t) -> x0 and a list of times; `generate` wires the denoiser, the text
tower and guidance into such a function.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pixrun.flow import Flow, sampling_times

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleConfig:
    sampler: str = "euler"  # euler | heun
    steps: int = 40
    shift: float = 3.0  # warp of the time grid, as in training
    cfg_scale: float = 4.0  # 1 = no guidance
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    grid_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of a circle",
            "a photo of a red square",
            "a photo of a blue triangle",
            "a photo of three crosses",
            "a photo of a circle left of a square",
            "a photo of a triangle above a cross",
            "a photo of a yellow circle and a green square",
            "a photo of a purple triangle",
        ]
    )
    grid_seeds: int = 2  # images per prompt in the training sample grid

    def validate(self) -> None:
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sample.sampler must be euler or heun, got {self.sampler!r}")
        if self.steps < 1 or self.cfg_scale < 0 or self.shift <= 0 or self.grid_seeds < 1:
            raise ValueError("sample.steps, sample.shift and sample.grid_seeds must be positive, cfg_scale >= 0")
        lo, hi = self.cfg_interval if len(self.cfg_interval) == 2 else (1, 0)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"sample.cfg_interval must be [lo, hi] within [0, 1], got {self.cfg_interval}")


def sample_euler(x0_fn: X0Fn, x: torch.Tensor, times: torch.Tensor, flow: Flow) -> torch.Tensor:
    for t, t_next in zip(times[:-1], times[1:]):
        tb = t.expand(x.shape[0]).to(x.device)
        x = x + (t_next - t) * flow.to_v(x0_fn(x, tb), x, tb)
    return x


def sample_heun(x0_fn: X0Fn, x: torch.Tensor, times: torch.Tensor, flow: Flow) -> torch.Tensor:
    for t, t_next in zip(times[:-1], times[1:]):
        tb, tb_next = t.expand(x.shape[0]).to(x.device), t_next.expand(x.shape[0]).to(x.device)
        v = flow.to_v(x0_fn(x, tb), x, tb)
        x_euler = x + (t_next - t) * v
        if t_next == 0:  # the second evaluation would divide by t = 0
            x = x_euler
        else:
            v_next = flow.to_v(x0_fn(x_euler, tb_next), x_euler, tb_next)
            x = x + (t_next - t) * (v + v_next) / 2
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def guided_x0_fn(model, flow: Flow, cond, uncond, cfg_scale: float, cfg_interval) -> X0Fn:
    """x0 with classifier-free guidance applied on x0, inside the t-interval only."""
    txt, mask = cond
    lo, hi = cfg_interval

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide = cfg_scale != 1 and lo <= float(t[0]) <= hi
        if not guide:
            return flow.to_x0(model(x, t, txt, mask).float(), x, t)
        u_txt, u_mask = uncond
        both = model(torch.cat([x, x]), torch.cat([t, t]), _cat_padded(txt, u_txt), _cat_padded(mask, u_mask))
        x0_c, x0_u = flow.to_x0(both.float(), torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return x0_u + cfg_scale * (x0_c - x0_u)

    return x0_fn


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two batches of token sequences, padding the shorter one (zeros / mask False)."""
    length = max(a.shape[1], b.shape[1])
    def pad(z):
        return torch.nn.functional.pad(z, [0, 0] * (z.dim() - 2) + [0, length - z.shape[1]])
    return torch.cat([pad(a), pad(b)])


@torch.no_grad()
def generate(
    model, text_tower, flow: Flow, prompts: list[str], resolution: int, config: SampleConfig, seed: int = 0
) -> torch.Tensor:
    """Images in [-1, 1], one per prompt; image i starts from the noise of seed `seed + i`, whatever the batch."""
    device = next(model.parameters()).device
    cond = text_tower(prompts)
    uncond = text_tower([""] * len(prompts))
    shape = (model.config.in_channels, resolution, resolution)
    seeds = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = torch.stack([torch.randn(shape, generator=g) for g in seeds])
    x = flow.config.noise_scale * noise.to(device)
    x0_fn = guided_x0_fn(model, flow, cond, uncond, config.cfg_scale, config.cfg_interval)
    times = sampling_times(config.steps, config.shift).to(device)
    return SAMPLERS[config.sampler](x0_fn, x, times, flow).clamp(-1, 1)
