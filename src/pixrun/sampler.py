"""Sampling: Euler and Heun on the flow's velocity, with classifier-free guidance.

The ODE solvers see only a function (x_t, t) -> the model's prediction, in the flow's own space (x0, eps or v),
and a list of times; they take the velocity from it with `Flow.convert`. So an x-predicting model's x0 becomes v
with t clamped (as in training), and a v-predicting model's output is used as it is, never through x0 (the clamp
would change its last steps). `generate` wires the denoiser, the text tower and guidance into such a function.
With `time_grid: diffusers`, Euler, cfg_interval [0, 1] and the run's noise scale, `generate` computes what
diffusers' PRXPixelPipeline (x-prediction) or PRXPipeline (v-prediction, in a VAE's latent space) computes for an
exported or imported pipeline (docs/export.md, docs/finetune.md).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from pixrun.flow import Flow, sampling_times, shift_time
from pixrun.text import pad_states

PredFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> prediction in the flow's space


@dataclass
class SampleConfig:
    sampler: str = "euler"  # euler | heun
    steps: int = 40
    shift: float = 3.0  # warp of the time grid, as in training
    time_grid: str = "linear"  # linear: shifted linspace(1, 0) | diffusers: as FlowMatchEulerDiscreteScheduler
    cfg_scale: float = 4.0  # 1 = no guidance
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    self_guidance: float = 1.0  # TREAD self-guidance w: routed + w * (dense - routed); 1 = dense only
    self_guidance_seed: int = 0  # the routed pass drops the same tokens at every step
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
        if self.time_grid not in TIME_GRIDS:
            raise ValueError(f"sample.time_grid must be one of {', '.join(TIME_GRIDS)}, got {self.time_grid!r}")
        if self.self_guidance < 0:
            raise ValueError(f"sample.self_guidance must be >= 0, got {self.self_guidance}")
        if self.steps < 1 or self.cfg_scale < 0 or self.shift <= 0 or self.grid_seeds < 1:
            raise ValueError("sample.steps, sample.shift and sample.grid_seeds must be positive, cfg_scale >= 0")
        lo, hi = self.cfg_interval if len(self.cfg_interval) == 2 else (1, 0)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"sample.cfg_interval must be [lo, hi] within [0, 1], got {self.cfg_interval}")


def diffusers_times(steps: int, shift: float, train_timesteps: int = 1000) -> torch.Tensor:
    """The times of diffusers' FlowMatchEulerDiscreteScheduler(shift=shift), then 0: `steps` points spaced evenly
    from 1 down to its smallest training time (1 / train_timesteps, already shifted), then all shifted once more,
    as the scheduler does. Their last non-zero time is far smaller than the linear grid's shift(1 / steps)."""
    lowest = shift_time(torch.tensor(1 / train_timesteps, dtype=torch.float32), shift).double()
    times = shift_time(torch.linspace(1.0, float(lowest), steps, dtype=torch.float64), shift)
    return torch.cat([times.float(), torch.zeros(1)])


TIME_GRIDS = {"linear": sampling_times, "diffusers": diffusers_times}


def velocity(flow: Flow, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return flow.convert(pred, x, t, flow.config.prediction, "v")


def sample_euler(pred_fn: PredFn, x: torch.Tensor, times: torch.Tensor, flow: Flow) -> torch.Tensor:
    for t, t_next in pairwise(times):
        tb = t.expand(x.shape[0]).to(x.device)
        x = x + (t_next - t) * velocity(flow, pred_fn(x, tb), x, tb)
    return x


def sample_heun(pred_fn: PredFn, x: torch.Tensor, times: torch.Tensor, flow: Flow) -> torch.Tensor:
    for t, t_next in pairwise(times):
        tb, tb_next = t.expand(x.shape[0]).to(x.device), t_next.expand(x.shape[0]).to(x.device)
        v = velocity(flow, pred_fn(x, tb), x, tb)
        x_euler = x + (t_next - t) * v
        if t_next == 0:  # the second evaluation would divide by t = 0
            x = x_euler
        else:
            v_next = velocity(flow, pred_fn(x_euler, tb_next), x_euler, tb_next)
            x = x + (t_next - t) * (v + v_next) / 2
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def guided_fn(model, cond, uncond, cfg_scale: float, cfg_interval) -> PredFn:
    """The model's prediction with classifier-free guidance, inside the t-interval only. Guidance is taken in the
    prediction's own space: at a given (x_t, t), x0, eps and v are affine in one another and guidance is an affine
    combination, so this is guidance on x0 too. It is what diffusers does: on x0 in PRXPixelPipeline, on v in
    PRXPipeline."""
    txt, mask = cond
    lo, hi = cfg_interval

    def pred_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide = cfg_scale != 1 and lo <= float(t[0]) <= hi
        if not guide:
            return model(x, t, txt, mask).float()
        u_txt, u_mask = uncond
        both = model(torch.cat([x, x]), torch.cat([t, t]), pad_states([*txt, *u_txt])[0],
                     pad_states([*mask, *u_mask])[0])
        pred_c, pred_u = both.float().chunk(2)
        return pred_u + cfg_scale * (pred_c - pred_u)

    return pred_fn


def self_guided(model, routing, weight: float, seed: int):
    """TREAD self-guidance: the model with tokens routed around its middle blocks is a weaker version of itself;
    extrapolate away from it, out = routed + w * (dense - routed), on the prediction in its own space (affine in x0,
    as guidance is)."""

    def call(x, t, txt, mask):
        dense = model(x, t, txt, mask)
        p = model.config.patch_size
        tokens = (x.shape[-2] // p) * (x.shape[-1] // p)
        generators = [torch.Generator(x.device).manual_seed(seed + i) for i in range(x.shape[0])]
        plan = model.plan_routing(routing, tokens, generators, x.device)
        routed = model(x, t, txt, mask, routing=plan)
        return routed + weight * (dense - routed)

    return call


@torch.no_grad()
def generate(
    model, text_tower, flow: Flow, prompts: list[str], size: int, config: SampleConfig, seed: int = 0,
    routing=None,
) -> torch.Tensor:
    """Samples x0 (B, model's in_channels, size, size), one per prompt, unclamped: images in [-1, 1] in pixel space,
    scaled latents in a VAE's. Sample i starts from the noise of seed `seed + i`, whatever the batch. `routing` (the
    run's TREAD setting) enables self-guidance when config.self_guidance != 1."""
    device = next(model.parameters()).device
    cond = text_tower(prompts)
    uncond = text_tower([""] * len(prompts))
    shape = (model.config.in_channels, size, size)
    seeds = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = torch.stack([torch.randn(shape, generator=g) for g in seeds])
    x = flow.noise_scale(noise) * noise.to(device)
    if routing is not None and config.self_guidance != 1:
        model_fn = self_guided(model, routing, config.self_guidance, config.self_guidance_seed)
    else:
        model_fn = model
    pred_fn = guided_fn(model_fn, cond, uncond, config.cfg_scale, config.cfg_interval)
    times = TIME_GRIDS[config.time_grid](config.steps, config.shift).to(device)
    return SAMPLERS[config.sampler](pred_fn, x, times, flow)
