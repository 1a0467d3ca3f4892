"""The training loop: data -> text tower -> flow (t, noise) -> denoiser -> loss -> AdamW/EMA -> checkpoint.

Every random draw of step k comes from generators seeded by (seed, k), and the learning rate is a function of k,
so a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

import copy
import dataclasses
import time
from pathlib import Path

import torch

from pixrun.checkpoint import latest_checkpoint, load_optimizer, load_state, load_tensors, save_checkpoint
from pixrun.config import Config, ConfigError, save_config
from pixrun.data.shapes import ShapesWorld
from pixrun.flow import Flow
from pixrun.logger import RunLogger, save_grid
from pixrun.model import Denoiser, count_parameters
from pixrun.optim import EMA, build_optimizer, lr_at
from pixrun.pipeline import (
    Pipeline,
    build_pipeline,
    build_world,
    compute_context,
    load_run_config,
    resolve_device,
    to_uint8,
)
from pixrun.text import TextTower


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed << 32) + step)


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """None: fresh run; "auto": the latest checkpoint if any; "latest": it must exist; else a checkpoint folder."""
    if resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already has checkpoints: pass --resume, or set run_dir to a new folder")
        return None
    if resume in ("auto", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None and resume == "latest":
            raise ConfigError(f"nothing to resume: {run_dir} has no checkpoint")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a checkpoint folder")
    return path


def prepare(config: Config, world: ShapesWorld, checkpoint: Path | None) -> Pipeline:
    """A fresh run's pipeline (its folder set up), or a run's to resume, checked against its saved config."""
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.train.seed)
    if checkpoint is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        pipeline = build_pipeline(config, world.vocabulary(), run_dir)
        save_config(config, run_dir / "config.yaml")
        return pipeline
    saved = load_run_config(run_dir)
    config.model.context_dim = saved.model.context_dim
    for section in ("model", "text", "flow", "data"):
        if getattr(saved, section) != getattr(config, section):
            raise ConfigError(f"cannot resume {run_dir} with a different '{section}' section than it was started with")
    save_config(config, run_dir / "config.yaml")  # train.steps and the like may change on resume
    return Pipeline(config, Denoiser(config.model), TextTower.load(config.text, run_dir), Flow(config.flow))


def train(config: Config, resume: str | None = None) -> Path:
    run_dir = Path(config.run_dir)
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    checkpoint = resume_point(run_dir, resume)
    world = build_world(config)
    pipeline = prepare(config, world, checkpoint).to(device)
    params = pipeline.trainable_parameters()
    optimizer = build_optimizer(params, config.optim)
    ema = EMA(params, config.ema)
    start = 0
    if checkpoint is not None:  # loading copies onto the device the pieces already live on
        pipeline.load_weights(load_tensors(checkpoint, "weights"))
        state = load_state(checkpoint)
        load_optimizer(optimizer, checkpoint)
        ema.load_state_dict(load_tensors(checkpoint, "ema"), state["ema_updates"])
        start = state["step"]
    ema_pipeline = copy.deepcopy(pipeline).eval()
    denoiser, text_tower, flow = pipeline.denoiser, pipeline.text_tower, pipeline.flow

    print(
        f"pixrun: {run_dir} | denoiser {count_parameters(denoiser) / 1e6:.2f} M params, "
        f"text tower {count_parameters(text_tower.encoder) / 1e6:.2f} M "
        f"({'trained' if text_tower.trainable else 'frozen'}) "
        f"| {device} | steps {start}->{tc.steps} at batch {tc.batch_size}, {config.data.resolution} px"
    )
    logger = RunLogger(run_dir, tc.steps, start, tc.batch_size)
    last_grid = None
    denoiser.train()
    text_tower.train(text_tower.trainable)
    for step in range(start, tc.steps):
        lr = lr_at(step, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, captions = world.batch(tc.seed, step, tc.batch_size, config.data.resolution)
        gen = step_generator(tc.seed, step)
        dropped = (torch.rand(len(captions), generator=gen) < config.flow.caption_dropout).tolist()
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
        t = flow.sample_t(len(captions), gen)
        eps = torch.randn(x0.shape, generator=gen)
        x0, eps, t = x0.to(device), eps.to(device), t.to(device)
        x_t = flow.add_noise(x0, eps, t)
        with compute_context(device, tc.precision):
            txt, mask = text_tower(captions)
            pred = denoiser(x_t, t, txt, mask)
        loss = flow.loss(pred, x0, eps, x_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), config.optim.grad_clip)
        optimizer.step()
        ema.update(step)

        done = step + 1
        log = done % tc.log_every == 0 or done == tc.steps
        logger.step(step, {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr} if log else {}, log)
        if done % tc.sample_every == 0 or done == tc.steps:
            ema_pipeline.load_weights(ema.shadow)
            last_grid = sample_grid(ema_pipeline, run_dir / "samples" / f"step_{done:07d}.png")
            logger.image("samples/ema", last_grid, done)
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            weights = {name: p.detach() for name, p in params.items()}
            save_checkpoint(
                run_dir, done, weights, ema.state_dict(), optimizer,
                {"ema_updates": ema.updates, "config": dataclasses.asdict(config), "saved_at": time.time()},
                tc.keep_checkpoints,
            )
    logger.close()
    if last_grid is None:
        grids = sorted((run_dir / "samples").glob("step_*.png"))
        last_grid = grids[-1] if grids else None
    print(f"pixrun: done. Run folder: {run_dir}")
    if last_grid is not None:
        print(f"pixrun: samples: {last_grid}")
    return run_dir


def sample_grid(pipeline: Pipeline, path: Path) -> Path:
    sc = pipeline.config.sample
    prompts = [p for p in sc.grid_prompts for _ in range(sc.grid_seeds)]
    images = to_uint8(pipeline.generate(prompts, seed=0))
    save_grid(images, sc.grid_prompts, sc.grid_seeds, path)
    return path
