"""The training loop: data -> text tower -> flow (t, noise) -> denoiser -> loss -> optimizer/EMA -> checkpoint.

Every random draw of step k comes from generators seeded by (seed, k), and the learning rate is a function of k,
so there is no random stream to save: a run resumed from a checkpoint continues exactly as if it had never
stopped. The draws are made for the global batch and each rank takes its slice, so 1 process and N processes
with the same global batch train the same model.
"""

import copy
import dataclasses
import signal
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from pixrun.checkpoint import Checkpointer, latest_good_checkpoint, list_checkpoints, whole_tensor
from pixrun.config import Config, ConfigError, save_config
from pixrun.data.source import LocalBatch, ShapesSource, ShardSource
from pixrun.flow import Flow
from pixrun.logger import RunLogger, save_grid
from pixrun.losses.auxiliary import AuxiliaryLosses
from pixrun.model import Denoiser, RoutePlan, count_parameters
from pixrun.optim import EMA, build_optimizer, set_lr
from pixrun.parallel import World, close_world, init_world, parallelize
from pixrun.pipeline import (
    Pipeline,
    attention_context,
    build_pipeline,
    build_world,
    compute_context,
    load_run_config,
    to_uint8,
    uses_bf16,
)
from pixrun.text import TextTower
from pixrun.text_cache import TextCache


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the message says why."""


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed << 32) + step)


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """None: fresh run; "auto": the latest good checkpoint if any; "latest": it must exist; else a folder."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already has checkpoints: pass --resume, or set run_dir to a new folder")
        return None
    if resume in ("auto", "latest"):
        found = latest_good_checkpoint(run_dir)
        if found is None and resume == "latest":
            raise ConfigError(f"nothing to resume: {run_dir} has no usable checkpoint")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a checkpoint folder")
    return path


def prepare(config: Config, vocabulary: list[str], checkpoint: Path | None, world: World) -> Pipeline:
    """A fresh run's pipeline (rank 0 sets up its folder), or a run's to resume, checked against its config.
    Every rank seeds the same generator first, so every rank starts from the same weights."""
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.train.seed)
    if checkpoint is None:
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        pipeline = build_pipeline(config, vocabulary, run_dir if world.is_main else None)
        if world.is_main:
            save_config(config, run_dir / "config.yaml")
        world.barrier()
        return pipeline
    saved = load_run_config(run_dir)
    config.model.context_dim = saved.model.context_dim
    for section in ("model", "text", "flow", "data"):
        if getattr(saved, section) != getattr(config, section):
            raise ConfigError(f"cannot resume {run_dir} with a different '{section}' section than it was started with")
    world.barrier()  # every rank has read the saved config before rank 0 rewrites it
    if world.is_main:
        save_config(config, run_dir / "config.yaml")  # train.steps and the like may change on resume
    return Pipeline(config, Denoiser(config.model), TextTower.load(config.text, run_dir), Flow(config.flow))


class Trainer:
    """One run: `Trainer(config, resume).run()`, or `.step(k)` one optimisation step at a time (benchmarks)."""

    def __init__(self, config: Config, resume: str | None = None):
        self.config = config
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.world, self.device = init_world(config.parallel, tc.device)
        for stage in config.stage_plan():
            if stage.batch_size % self.world.size:
                raise ConfigError(f"batch size {stage.batch_size} does not split over {self.world.size} processes")
        self.run_dir = Path(config.run_dir)
        checkpoint = resume_point(self.run_dir, resume)
        self.source = build_source(config, self.world)
        pipeline = prepare(config, build_world(config).vocabulary(), checkpoint, self.world).to(self.device)
        self.ema_pipeline = copy.deepcopy(pipeline).eval() if self.world.is_main else None
        self.bf16 = uses_bf16(self.device, tc.precision)
        text = pipeline.text_tower
        self.aux = AuxiliaryLosses(config, config.model.width, self.device)
        owners = {
            "denoiser": pipeline.denoiser,
            **({"text_encoder": text.encoder} if text.trainable else {}),
            **self.aux.trainable(),
        }
        try:
            self.strategy = parallelize(
                pipeline.denoiser,
                [m for n, m in owners.items() if n != "denoiser"],
                config.parallel,
                self.world,
                self.device,
                self.bf16,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.aux.capture(pipeline.denoiser)
        self.pipeline = pipeline
        self.params = {
            f"{owner}.{name}": p for owner, module in owners.items() for name, p in module.named_parameters()
        }
        self.optimizer = build_optimizer(self.params, config.optim)
        self.ema = EMA(self.params, config.ema)
        self.checkpointer = Checkpointer(
            self.run_dir,
            self.params,
            owners,
            self.optimizer,
            self.world.is_main,
            self.world.barrier,
            tc.keep_checkpoints,
        )
        self.start = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        if checkpoint is not None:
            state = self.checkpointer.load(checkpoint, self.ema.shadow)
            self.ema.updates = state["ema_updates"]
            self.nonfinite_total = state.get("nonfinite_steps", 0)
            self.start = state["step"]
            self.source.load_state_dict(state.get("data", {}))
        self.stop_requested = False
        self.metric_networks = None
        self.encode_text = text
        self.empty_prompt: torch.Tensor | None = None
        if config.text.cache_dir and not text.trainable:
            self.encode_text = TextCache(config.text.cache_dir, text, writer=str(self.world.rank))

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's part of global batch `step`; returns loss and grad norm."""
        config, tc = self.config, self.config.train
        denoiser, flow = self.pipeline.denoiser, self.pipeline.flow
        lr = set_lr(self.optimizer, step, config.optim, tc.steps)
        stage, stage_start = config.stage_at(step)
        batch = self.source.batch(step, stage, stage_start)
        if self.world.any(len(batch.captions) == 0, self.device):  # a batch of only bad samples somewhere
            self.optimizer.zero_grad(set_to_none=True)
            return {}
        # the draws are made for the whole global batch, then each rank takes its own rows
        size = stage.batch_size
        gen = step_generator(tc.seed, step)
        dropped = torch.rand(size, generator=gen) < config.flow.caption_dropout
        t = flow.sample_t(size, gen)
        eps = torch.randn((size, *batch.images.shape[1:]), generator=gen)
        tread = config.tread.enabled if stage.tread is None else stage.tread
        plan = None
        if tread:  # drawn last, so runs without TREAD keep the same draws
            p = config.model.patch_size
            tokens = (batch.images.shape[-2] // p) * (batch.images.shape[-1] // p)
            plan = denoiser.plan_routing(config.tread, size, tokens, gen)
        first = self.world.rank * (size // self.world.size)
        mine = slice(first, first + len(batch.captions))
        x0, eps, t = batch.images.to(self.device), eps[mine].to(self.device), t[mine].to(self.device)
        if plan is not None:
            plan = RoutePlan(plan.kept_index[mine].to(self.device), plan.blocks)
        x_t = flow.add_noise(x0, eps, t)
        with compute_context(self.device, tc.precision):
            txt, mask = self.text_states(batch, dropped[mine].tolist())
            pred = denoiser(x_t, t, txt, mask, routing=plan)
            terms = self.aux(flow.to_x0(pred.float(), x_t, t), x0, t, plan, stage, step, config.model.patch_size)
        flow_loss = flow.loss(pred.float(), x0, eps, x_t, t)
        loss = flow_loss + sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        with attention_context(self.device):
            loss.backward()
        grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(self.params.values(), config.optim.grad_clip))
        if torch.isfinite(grad_norm):  # gradients are already reduced, so every rank decides the same way
            self.optimizer.step()
            self.ema.update(step)
            self.nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= tc.max_nonfinite_in_row:
                raise TrainingError(
                    f"the loss was non-finite {self.nonfinite_in_row} steps in a row (last: step "
                    f"{step + 1}); lower optim.lr or raise optim.warmup_steps, then --resume"
                )
        return {
            "loss": loss.detach(),
            "flow_loss": flow_loss.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "grad_norm": grad_norm,
            "lr": torch.tensor(lr),
        }

    def text_states(self, batch: LocalBatch, dropped: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded captions; a dropped caption becomes the encoded empty prompt. Embeddings precomputed by
        `pixrun data prepare` are used as they are (they came from the same frozen encoder)."""
        if batch.embeddings is None or self.pipeline.text_tower.trainable:
            return self.encode_text(["" if drop else caption for caption, drop in zip(batch.captions, dropped)])
        if self.empty_prompt is None:  # encoded once: the tower is frozen
            states, mask = self.encode_text([""])
            self.empty_prompt = states[0][mask[0]]
        empty = self.empty_prompt
        states = [empty if drop else e.to(self.device, empty.dtype) for e, drop in zip(batch.embeddings, dropped)]
        lengths = torch.tensor([len(s) for s in states], device=self.device)
        mask = torch.arange(int(lengths.max()), device=self.device) < lengths[:, None]
        return pad_sequence(states, batch_first=True), mask

    def run(self) -> Path:
        tc, world = self.config.train, self.world
        if world.is_main:
            denoiser, text_tower = self.pipeline.denoiser, self.pipeline.text_tower
            print(
                f"pixrun: {self.run_dir} | denoiser {count_parameters(denoiser) / 1e6:.2f} M params, text tower "
                f"{count_parameters(text_tower.encoder) / 1e6:.2f} M ({'trained' if text_tower.trainable else 'frozen'})"
                f" | {self.device} x {world.size} ({self.strategy}) | steps {self.start}->{tc.steps}: "
                + ", then ".join(
                    f"{s.resolution} px at batch {s.batch_size} to step {s.until_step}"
                    for s in self.config.stage_plan()
                )
            )
        logger = RunLogger(self.run_dir, tc.steps, self.start) if world.is_main else None
        last_grid = None
        self.pipeline.denoiser.train()
        self.pipeline.text_tower.train(self.pipeline.text_tower.trainable)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for step in range(self.start, tc.steps):
                metrics = self.step(step)
                done = step + 1
                log = (done % tc.log_every == 0 or done == tc.steps) and bool(metrics)
                values = {}
                if log:
                    values = {name: world.mean(value).item() for name, value in metrics.items()}
                    values["nonfinite_steps"] = self.nonfinite_total
                    values["data_skipped"] = self.source.skipped
                if logger is not None:
                    logger.step(step, values, self.config.stage_at(step)[0].batch_size)
                if done % tc.sample_every == 0 or done == tc.steps:
                    last_grid = self.sample(done, logger) or last_grid
                if tc.metrics_every and done % tc.metrics_every == 0:
                    self.measure(done, logger)
                stop = world.any(self.stop_requested, self.device)
                if done % tc.checkpoint_every == 0 or done == tc.steps or stop:
                    self.save(done)
                if stop:
                    if world.is_main:
                        print(
                            f"\npixrun: stopped by a signal after step {done}; checkpoint saved. "
                            f"Continue with: pixrun train ... --resume auto"
                        )
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if logger is not None:
                logger.close()
        if world.is_main:
            if last_grid is None:
                grids = sorted((self.run_dir / "samples").glob("step_*.png"))
                last_grid = grids[-1] if grids else None
            print(f"pixrun: done. Run folder: {self.run_dir}")
            if last_grid is not None:
                print(f"pixrun: samples: {last_grid}")
        return self.run_dir

    def loaded_ema_pipeline(self) -> Pipeline | None:
        """The EMA weights in a plain copy of the model, on rank 0 (every rank takes part in gathering them)."""
        ema = {name: whole_tensor(t) for name, t in self.ema.shadow.items()}
        if not self.world.is_main:
            return None
        self.ema_pipeline.load_weights(ema)
        return self.ema_pipeline

    def sample(self, step: int, logger: RunLogger | None) -> Path | None:
        pipeline = self.loaded_ema_pipeline()
        if pipeline is None:
            return None
        path = sample_grid(pipeline, self.run_dir / "samples" / f"step_{step:07d}.png")
        logger.image("samples/ema", path, step)
        return path

    def measure(self, step: int, logger: RunLogger | None) -> None:
        """FID/KID/CMMD/DINO-MMD of EMA samples and the MSE of x0 by t, on a held-out shapes sample."""
        from pixrun.metrics import load_networks, mse_by_t, shapes_quality_metrics, shapes_reference

        pipeline = self.loaded_ema_pipeline()
        if pipeline is None:
            return
        config = self.config.metrics
        if self.metric_networks is None:
            self.metric_networks = load_networks(config, self.device)
        scores = shapes_quality_metrics(pipeline, config, self.metric_networks)
        held_out = shapes_reference(
            build_world(self.config), self.config.data.resolution, config.num_images, config.seed
        )
        scores.update(mse_by_t(pipeline, held_out.load(), held_out.captions, seed=config.seed))
        logger.record("quality", scores, step)

    def save(self, step: int) -> Path:
        if isinstance(self.encode_text, TextCache):
            self.encode_text.flush()
        return self.checkpointer.save(
            step,
            self.ema.shadow,
            {
                "ema_updates": self.ema.updates,
                "data": self.source.state_dict(),
                "nonfinite_steps": self.nonfinite_total,
                "world_size": self.world.size,
                "config": dataclasses.asdict(self.config),
                "saved_at": time.time(),
            },
        )

    def close(self) -> None:
        close_world(self.world)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True


def build_source(config: Config, world: World) -> ShapesSource | ShardSource:
    if config.data.source == "shapes":
        return ShapesSource(build_world(config), config.train.seed, world.rank, world.size)
    d = config.data
    return ShardSource(
        d.shards, config.train.seed, world.rank, world.size, d.num_workers, d.shuffle_shards, d.shard_url
    )


def train(config: Config, resume: str | None = None) -> Path:
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def sample_grid(pipeline: Pipeline, path: Path) -> Path:
    sc = pipeline.config.sample
    prompts = [p for p in sc.grid_prompts for _ in range(sc.grid_seeds)]
    images = to_uint8(pipeline.generate(prompts, seed=0))
    save_grid(images, sc.grid_prompts, sc.grid_seeds, path)
    return path
