"""The training loop: data -> text tower -> flow (t, noise) -> denoiser -> loss -> optimizer/EMA -> checkpoint.

Randomness is per sample: t, noise, caption dropout and TREAD's routing of sample i of global batch k come from
generators seeded by (seed, k, i), drawn only by the rank that holds row i, on its device. So 1 process and N
processes with the same global batch train the same model, no rank draws for rows it does not hold, and a run
resumed from a checkpoint continues exactly as if it had never stopped (the learning rate is a function of k).

An ordinary step never waits for the device: a non-finite step is skipped by the optimizer itself (a device-side
flag), its count stays on the device until a logging step reads it, and a stop signal is agreed over a CPU
side channel while the next step runs.
"""

import copy
import dataclasses
import hashlib
import json
import random
import signal
import struct
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pixrun.budget import AtEnd, Budget, Plan, Schedule, budget_seconds, format_duration, stage_shares
from pixrun.checkpoint import Checkpointer, ModuleState, OptimizerState, TensorState, choose_resume, load_state
from pixrun.config import Config, StageConfig, save_config
from pixrun.data.shapes import TASKS
from pixrun.data.source import DATA_SOURCES, DataSource, HeldOut, LocalBatch
from pixrun.errors import ConfigError, TrainingError
from pixrun.evaluate import evaluate_pipeline, evaluation_record, scores_source
from pixrun.latent import Autoencoder
from pixrun.logger import RunLogger, save_grid
from pixrun.losses import LossInputs
from pixrun.losses.auxiliary import AuxiliaryLosses
from pixrun.metrics import (
    ReferenceImages,
    folder_reference,
    generate_images,
    load_networks,
    mse_by_t,
    quality_metrics,
)
from pixrun.model import RoutePlan, count_parameters
from pixrun.optim import EMA, build_optimizer, set_lr
from pixrun.parallel import StopVote, device_mesh, parallelize, resolve_strategy, shard_copy
from pixrun.pipeline import Pipeline, build_world, load_run_config, to_uint8
from pixrun.pretrained import load_init_weights, resolve_init
from pixrun.runtime import World, attention_context, close_world, compute_context, init_world, uses_bf16
from pixrun.text import TextTower, pad_states
from pixrun.text_cache import TextCache

NOISE, DROPOUT = 0, 1  # a sample's two random streams: t, noise and routing on the device; dropout on the host


def sample_seed(seed: int, step: int, row: int, stream: int = NOISE) -> int:
    """The seed of global row `row` of step `step`: a hash, so nearby (step, row) pairs give unrelated streams."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, row, stream), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tokenizer_captions(config: Config) -> list[str]:
    """What the small text encoder's tokenizer is learnt from, as the run's data source says: the shapes world's
    words (each word one token), the caption sample `pixrun data prepare` wrote beside every stage's shards, ..."""
    return DATA_SOURCES[config.data.source].tokenizer_captions(config)


def start_pipeline(config: Config, checkpoint: Path | None, world: World) -> Pipeline:
    """A fresh run's pipeline (rank 0 sets up its folder), or a run's to resume, checked against its config.
    Every rank seeds the same generator first, so every rank starts from the same weights."""
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.train.seed)
    if checkpoint is None:
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        captions = tokenizer_captions(config) if config.text.trainable else []
        text_tower = TextTower.build(config.text, captions, run_dir if world.is_main else None)
    else:
        saved = load_run_config(run_dir)
        for section in ("model", "text", "latent", "flow", "data"):
            if getattr(saved, section) != getattr(config, section):
                raise ConfigError(f"cannot resume {run_dir} with a different '{section}' section than it was started "
                                  "with")
        text_tower = TextTower.load(config.text, run_dir)
    pipeline = Pipeline.from_config(config, text_tower)
    if checkpoint is None:
        load_init_weights(pipeline, config)
    world.barrier()  # every rank has read the saved config before rank 0 writes the run's
    if world.is_main:
        save_config(config, run_dir / "config.yaml")  # train.steps and the like may change on resume
    return pipeline


@dataclass
class TrainState:
    """What training reads and changes, built once by `build_state` and advanced by `train_step`.

    `trained` is the one registry of what is trained: the pipeline's trained modules and the auxiliary losses'
    (REPA's projector), by the names their weights carry in checkpoints ("<name>.<param>"); `ema_trained` holds
    their EMA, with the same names, sharded the same way."""

    config: Config
    world: World
    device: torch.device
    pipeline: Pipeline
    ema_pipeline: Pipeline
    aux: AuxiliaryLosses
    trained: nn.ModuleDict
    ema_trained: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    ema: EMA
    source: DataSource
    encode_text: TextTower | TextCache  # a frozen tower's states may come from the embedding cache
    strategy: str  # ddp | fsdp | single (parallel.resolve_strategy)
    plan: Plan  # the run's course: which stage a step is in, the learning rate; a budget replaces it as it goes
    nonfinite_total: torch.Tensor  # device-side counters: read on logging steps only
    nonfinite_in_row: torch.Tensor
    lr: float = 0.0
    empty_prompt: torch.Tensor | None = None  # the frozen tower's encoded "", for dropped captions

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.trained.named_parameters())

    def counters(self) -> dict[str, torch.Tensor]:
        """The device-side counters, saved with each checkpoint and filled in place on resume."""
        return {"ema_updates": self.ema.updates, "nonfinite_steps": self.nonfinite_total}


def with_plan(config: Config, plan: Plan) -> Config:
    """`config` with the stages of `plan` (where a resumed budget had moved them): what the data source plans."""
    if plan.ends == [stage.until_step for stage in config.stage_plan()]:
        return config
    config = copy.deepcopy(config)
    config.train.steps = plan.total
    if config.stages:
        config.stages = [dataclasses.replace(stage, until_step=end) for stage, end in zip(config.stages, plan.ends)]
    return config


def build_state(config: Config, world: World, device: torch.device, pipeline: Pipeline, plan: Plan) -> TrainState:
    """The trained modules sharded for `world` (DDP / FSDP2 / HSDP), their EMA copy sharded alike, the
    optimizer, the data source and the counters, around a pipeline on `device`, to follow `plan`."""
    text = pipeline.text_tower
    # the data source plans a stream for each stage's start, where the plan has it (a resumed budget moved them)
    source = build_source(with_plan(config, plan), world, text, pin_memory=device.type == "cuda",
                          autoencoder=pipeline.autoencoder)
    bf16 = uses_bf16(device, config.train.precision)
    aux = AuxiliaryLosses(config.losses, config.model.width, device)
    trained = {**pipeline.trained_modules(), **aux.trainable()}
    # The EMA weights live in a copy of the trained modules, sharded like them: generation runs on every rank
    # with one block gathered at a time, and no rank ever holds the whole EMA.
    ema_text = copy.deepcopy(text) if text.trainable else text
    ema_trained = {name: ema_text.encoder if name == "text_encoder" else copy.deepcopy(module)
                   for name, module in trained.items()}
    for module in ema_trained.values():
        module.requires_grad_(False)
    try:
        strategy = resolve_strategy(config.parallel, world)
        mesh = device_mesh(config.parallel, world, device) if strategy == "fsdp" else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    parallelize(pipeline.denoiser, [m for n, m in trained.items() if n != "denoiser"], config.parallel, strategy,
                device, bf16, mesh)
    shard_copy(ema_trained["denoiser"], [m for n, m in ema_trained.items() if n != "denoiser"], strategy, mesh, bf16)
    trained, ema_trained = nn.ModuleDict(trained), nn.ModuleDict(ema_trained)
    params = dict(trained.named_parameters())
    # Newton-Schulz in the compute precision: bf16 where it is fast, fp32 where bf16 products are slow (CPUs
    # without AMX, where bf16 Newton-Schulz was most of the step, or far more without AVX-512)
    optimizer = build_optimizer(params, config.optim, torch.bfloat16 if bf16 else torch.float32)
    encode_text = text
    if config.text.cache_dir and not text.trainable:
        encode_text = TextCache(config.text.cache_dir, text, writer=str(world.rank))
    return TrainState(
        config=config, world=world, device=device, pipeline=pipeline,
        ema_pipeline=dataclasses.replace(pipeline, denoiser=ema_trained["denoiser"], text_tower=ema_text).eval(),
        aux=aux, trained=trained, ema_trained=ema_trained, optimizer=optimizer,
        ema=EMA(params, dict(ema_trained.named_parameters()), config.ema),
        source=source, encode_text=encode_text,
        strategy=strategy, plan=plan,
        nonfinite_total=torch.zeros((), dtype=torch.int64, device=device),
        nonfinite_in_row=torch.zeros((), dtype=torch.int64, device=device),
    )


@dataclass
class StepInputs:
    """What one step draws for this rank's rows of its global batch: the data and every random choice."""

    stage: StageConfig
    batch: LocalBatch
    has_rows: bool  # False: every sample was bad, and `batch` is a stand-in row weighted 0
    images: torch.Tensor  # the real images on the device, [-1, 1]
    x0: torch.Tensor  # what the flow runs on: the images, or their latents
    t: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor
    dropped: list[bool]  # captions replaced by the empty prompt
    routing: RoutePlan | None  # TREAD's plan; None: not routed in this stage


def train_step(state: TrainState, step: int) -> dict[str, torch.Tensor]:
    """One optimisation step on this rank's part of global batch `step`; returns its figures as device tensors
    (loss, each loss term, grad norm). Nothing here waits for the device."""
    state.lr = set_lr(state.optimizer, state.plan.lr_factor(step, state.config.optim), state.config.optim)
    inputs = draw_inputs(state, step)
    flow_loss, terms = compute_losses(state, inputs, step)
    loss = flow_loss + sum(terms.values())
    if not inputs.has_rows:
        loss = loss * 0.0
    grad_norm = apply_update(state, step, loss, inputs.has_rows)
    return {
        "loss": loss.detach(),
        "flow_loss": flow_loss.detach(),
        **{k: v.detach() for k, v in terms.items()},
        "grad_norm": grad_norm.detach(),
    }


def draw_inputs(state: TrainState, step: int) -> StepInputs:
    """The batch and its draws: t, noise and routing from each row's device generator, in that order, and caption
    dropout from its host stream (see the module docstring)."""
    config, device = state.config, state.device
    stage, stage_start = state.plan.stage_at(step)
    batch = state.source.batch(step, stage, stage_start)
    has_rows = len(batch.captions) > 0
    if not has_rows:  # every sample was bad: a stand-in row keeps this rank in the collectives, weighted 0
        batch = LocalBatch(torch.zeros(1, 3, stage.resolution, stage.resolution, dtype=torch.uint8), [""])
    first = state.world.rank * (stage.batch_size // state.world.size)
    rows = [first + row for row in (batch.rows or range(len(batch.captions)))]  # rows in the global batch
    generators = [torch.Generator(device).manual_seed(sample_seed(config.train.seed, step, row)) for row in rows]
    # drawn on the host (which captions to tokenise is decided there), from the sample's own stream
    dropped = [random.Random(sample_seed(config.train.seed, step, row, DROPOUT)).random() < config.flow.caption_dropout
               for row in rows]
    images = batch.images_on(device)
    autoencoder, flow = state.pipeline.autoencoder, state.pipeline.flow
    x0 = images if autoencoder is None else latents_of(autoencoder, batch, images)  # what the flow runs on
    t = torch.cat([flow.sample_t(1, g) for g in generators])
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in generators])
    routing = None
    if stage.routes(config.tread):  # drawn last: the other draws stay
        p = config.model.patch_size
        tokens = (x0.shape[-2] // p) * (x0.shape[-1] // p)
        routing = state.pipeline.denoiser.plan_routing(config.tread, tokens, generators, device)
    return StepInputs(stage, batch, has_rows, images, x0, t, eps, flow.add_noise(x0, eps, t), dropped, routing)


def compute_losses(state: TrainState, inputs: StepInputs, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The flow loss and each loss term on at this step (weighted), from one forward pass of the denoiser."""
    config, flow, autoencoder = state.config, state.pipeline.flow, state.pipeline.autoencoder
    t, x_t, stage = inputs.t, inputs.x_t, inputs.stage
    with compute_context(state.device, config.train.precision):
        txt, mask = text_states(state, inputs.batch, inputs.dropped)
        block = state.aux.hidden_block(stage, step)
        pred = state.pipeline.denoiser(x_t, t, txt, mask, routing=inputs.routing, hidden_at=block)
        pred, hidden = pred if block is not None else (pred, None)
        x0_hat = flow.to_x0(pred.float(), x_t, t)
        pixels_per_token = config.model.patch_size
        if autoencoder is not None:  # the loss terms compare images: decoded x̂₀ with the real ones
            pixels_per_token *= autoencoder.factor
            if state.aux.compares_images(stage, step):
                x0_hat = autoencoder.decode(x0_hat)
        terms = state.aux(LossInputs(x0_hat, inputs.images, t, step, pixels_per_token, inputs.routing, hidden,
                                     ema_hidden(state, inputs, txt, mask)), stage)
    return flow.loss(pred.float(), inputs.x0, inputs.eps, x_t, t), terms


def ema_hidden(state: TrainState, inputs: StepInputs, txt: torch.Tensor,
               mask: torch.Tensor | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`LossInputs.ema_hidden`: the EMA denoiser, without gradient, dense, up to a block, on the step's x₀ and noise
    mixed at other noise levels. It takes the student's text states (the EMA's own when the text tower is frozen;
    a jointly trained tower's EMA is not run again for this)."""

    def run(t: torch.Tensor, block: int) -> torch.Tensor:
        x_t = state.pipeline.flow.add_noise(inputs.x0, inputs.eps, t)
        with torch.no_grad():
            return state.ema_pipeline.denoiser(x_t, t, txt.detach(), mask, hidden_at=block, stop_at_hidden=True)

    return run


def apply_update(state: TrainState, step: int, loss: torch.Tensor, has_rows: bool) -> torch.Tensor:
    """Backward, gradient clipping, the optimizer and EMA steps (skipped on the device when the gradient is not
    finite or no rank has rows), and the non-finite counters; returns the gradient norm before clipping."""
    state.optimizer.zero_grad(set_to_none=True)
    with attention_context(state.device):
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params.values(), state.config.optim.grad_clip)
    if isinstance(grad_norm, DTensor):  # already reduced over ranks: every rank decides the same way
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(grad_norm)
    apply = finite & state.world.all_true(torch.full((), has_rows, device=state.device))
    state.optimizer.step(apply=apply)
    state.ema.update(step, apply)
    state.nonfinite_total += (~finite).long()
    state.nonfinite_in_row = (state.nonfinite_in_row + 1) * (~finite).long()
    return grad_norm


def latents_of(autoencoder: Autoencoder, batch: LocalBatch, images: torch.Tensor) -> torch.Tensor:
    """The batch's latents: prepared by `pixrun data prepare` (read, not computed), or encoded here."""
    if batch.latents is not None:
        return batch.latents_on(images.device)
    return autoencoder.encode(images)


def text_states(state: TrainState, batch: LocalBatch, dropped: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoded captions; a dropped caption becomes the encoded empty prompt. Embeddings precomputed by
    `pixrun data prepare` are used as they are (they came from the same frozen encoder)."""
    if batch.embeddings is None or state.pipeline.text_tower.trainable:
        return state.encode_text(["" if drop else caption for caption, drop in zip(batch.captions, dropped)])
    if state.empty_prompt is None:  # encoded once: the tower is frozen
        states, mask = state.encode_text([""])
        state.empty_prompt = states[0][mask[0]]
    empty = state.empty_prompt
    states = [empty if drop else e.to(state.device, empty.dtype) for e, drop in zip(batch.embeddings, dropped)]
    txt, mask = pad_states(states)
    padded = len({len(s) for s in states}) > 1  # else no mask, so the attention can use flash kernels
    return txt, mask if padded else None


class Event:
    """Something the run does besides steps (a sample grid, metrics, a checkpoint), on its own schedule: the loop
    asks `should_run` after each step. `last_step` says where the run's plan ends now; `on_stop`: it also runs
    after the step where a stop signal was agreed."""

    def __init__(self, name: str, schedule: Schedule, action: Callable[[int], object], last_step: Callable[[], int],
                 on_stop: bool = False):
        self.name, self.schedule, self.action, self.last_step, self.on_stop = name, schedule, action, last_step, on_stop

    def should_run(self, done: int, stopping: bool = False) -> bool:
        return self.schedule.should_run(done, self.last_step()) or (stopping and self.on_stop)


def event_schedules(config: Config) -> dict[str, Schedule]:
    """When the run's events come, by name: what the loop asks, and what a budget reserves time for."""
    tc = config.train
    schedules = {
        "sample": Schedule(tc.sample_every, at_start=True),  # the untrained model too, to compare the end with
        "metrics": Schedule(tc.metrics_every, at_start=True),
        "checkpoint": Schedule(tc.checkpoint_every),
    }
    scored = config.eval.at_end and scores_source(config)
    return {**schedules, "evaluation": AtEnd()} if scored else schedules


def event_estimates(config: Config) -> dict[str, tuple[str, float]]:
    """What a budget reserves for an event not yet timed, as so many of another: the final evaluation generates
    its images as a sample grid does (same sampler), so many grids' worth."""
    e, s = config.eval, config.sample
    evaluated = len(TASKS) * e.prompts_per_task * e.images_per_prompt
    return {"evaluation": ("sample", evaluated / (len(s.grid_prompts) * s.grid_seeds))}


def budget_controller(config: Config, world: World, device: torch.device, clock: Callable[[], float],
                      started: float) -> Budget | None:
    """The controller of a budgeted run (train.budget, or train.budget_money at train.device_hour_price); None
    without a budget. Its figures are averaged over the ranks, so every rank plans alike."""
    tc = config.train
    seconds = budget_seconds(tc.budget, tc.budget_money, tc.device_hour_price, world.size)
    if seconds is None:
        return None
    stages = config.stage_plan()
    shares = stage_shares([s.until_step for s in stages], [s.batch_size for s in stages],
                          [s.budget_share for s in stages])

    def average(figures: list[float]) -> list[float]:
        return world.mean(torch.tensor(figures, device=device)).tolist()

    return Budget(seconds, stages, shares, config.optim, event_schedules(config), tc.budget_warmup_steps, clock,
                  average, started, event_estimates(config))


class Trainer:
    """One run: `Trainer(config, resume).run()`, or `.step(k)` one optimisation step at a time (benchmarks).

    Around the state and its step function it keeps the run's course: the plan (the config's, or a budget's,
    which the controller replaces on logging steps), the events on their schedules (sample grids, metrics,
    checkpoints), logging and stop signals. The config is resolved once, here (the pipeline `init` names), and
    never written to after. `clock` is what a budget measures time with (tests inject one)."""

    def __init__(self, config: Config, resume: str | None = None, clock: Callable[[], float] = time.monotonic):
        started = clock()
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.world, self.device = init_world(config.train.device, config.parallel.backend,
                                             config.parallel.timeout_minutes)
        config = resolve_init(config, warn=print if self.world.is_main else None)
        for stage in config.stage_plan():
            if stage.batch_size % self.world.size:
                raise ConfigError(f"batch size {stage.batch_size} does not split over {self.world.size} processes")
        self.run_dir = Path(config.run_dir)
        checkpoint = choose_resume(self.run_dir, resume, self.world)
        saved = load_state(checkpoint) if checkpoint else {}  # read once, by every rank
        self.budget = budget_controller(config, self.world, self.device, clock, started)
        plan = Plan.of(config.stage_plan())
        if self.budget is not None:
            if "budget" in saved:  # first of the checkpoint's owners: its plan says where the stages start
                self.budget.load_state_dict(saved["budget"])
            plan = self.budget.plan
        self.config = config
        pipeline = start_pipeline(config, checkpoint, self.world).to(self.device)
        self.state = build_state(config, self.world, self.device, pipeline, plan)
        self.checkpointer = Checkpointer(self.run_dir, self.world, config.train.keep_checkpoints,
                                         self.checkpoint_states(), async_save=config.train.async_checkpoint)
        self.start = 0
        if checkpoint is not None:
            self.checkpointer.load(checkpoint, saved)
            self.start = saved["step"]
        schedules = event_schedules(config)
        self.events = [
            Event("sample", schedules["sample"], self.sample, self.last_step),
            Event("metrics", schedules["metrics"], lambda done: self.measure(done, self.logger), self.last_step),
            Event("checkpoint", schedules["checkpoint"], self.save, self.last_step, on_stop=True),
        ]
        if "evaluation" in schedules:
            self.events.append(Event("evaluation", schedules["evaluation"], self.evaluate, self.last_step))
        self.scores: dict | None = None
        self.logging = Schedule(config.train.log_every)
        self.logger: RunLogger | None = None
        self.stop_requested = False
        self.metric_networks = None

    def checkpoint_states(self) -> dict:
        """What a checkpoint holds, by owner: each gives its own state_dict and takes it back."""
        state = self.state
        owners = {
            "model": ModuleState(state.trained), "ema": ModuleState(state.ema_trained),
            "optimizer": OptimizerState(state.trained, state.optimizer), "counters": TensorState(state.counters()),
            "data": state.source,
        }
        return owners if self.budget is None else {**owners, "budget": self.budget}

    @property
    def plan(self) -> Plan:
        return self.state.plan

    def last_step(self) -> int:
        return self.state.plan.total

    def step(self, step: int) -> dict[str, torch.Tensor]:
        return train_step(self.state, step)

    def run(self) -> Path:
        """Train from the start (or the checkpoint resumed) to the plan's last step, running each event when it
        says; a stop signal ends the run after a checkpoint."""
        world = self.world
        if world.is_main:
            self.announce()
            self.logger = RunLogger(self.run_dir, self.plan.total, self.start, self.config.log)
        stop_vote = StopVote(world)
        self.state.pipeline.denoiser.train()
        self.state.pipeline.text_tower.train(self.state.pipeline.text_tower.trainable)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.start == 0:
                self.run_events(0)
            if self.budget is not None:
                self.budget.begin(self.start)
            step = self.start
            while step < self.plan.total:  # a budget's plan may move it on logging steps
                metrics = self.step(step)
                done = step + 1
                values = self.log(done, metrics) if self.logging.should_run(done, self.plan.total) else {}
                if self.logger is not None:
                    self.logger.step(step, values, self.plan.stage_at(step)[0].batch_size, self.budget_status())
                stop = stop_vote.cast(self.stop_requested)
                self.run_events(done, stop)
                if stop:
                    if world.is_main:
                        print(f"\npixrun: stopped by a signal after step {done}; checkpoint saved. "
                              "Continue with: pixrun train ... --resume auto")
                    break
                step = done
            stop_vote.settle()
            self.checkpointer.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.logger is not None:
                self.logger.close()
        if world.is_main:
            self.report()
        return self.run_dir

    def run_events(self, done: int, stopping: bool = False) -> None:
        for event in self.events:
            if event.should_run(done, stopping):
                event.action(done)

    def log(self, done: int, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """A logging step (the one read of the device): the step's figures averaged over ranks, with the
        counters; too many non-finite steps in a row end the run; a budget plans again."""
        names = list(metrics)
        means = self.world.mean(torch.stack([metrics[name].float() for name in names])).tolist()
        values = dict(zip(names, means))
        values["lr"] = self.state.lr
        values["nonfinite_steps"] = int(self.state.nonfinite_total)
        values["data_skipped"] = self.state.source.skipped
        self.check_health(done - 1)
        if self.budget is not None:
            self.state.plan = self.budget.update(done)
            if self.logger is not None:
                self.logger.set_total(self.plan.total)
        return values

    def check_health(self, step: int) -> None:
        """Read on logging steps (a host sync): too many non-finite steps in a row end the run."""
        in_row = int(self.state.nonfinite_in_row)
        if in_row >= self.config.train.max_nonfinite_in_row:
            raise TrainingError(
                f"the loss was non-finite {in_row} steps in a row (last: step {step + 1}); lower optim.lr or "
                "raise optim.warmup_steps, then --resume"
            )

    def announce(self) -> None:
        denoiser, text_tower = self.state.pipeline.denoiser, self.state.pipeline.text_tower
        print(
            f"pixrun: {self.run_dir} | denoiser {count_parameters(denoiser) / 1e6:.2f} M params, text tower "
            f"{count_parameters(text_tower.encoder) / 1e6:.2f} M ({'trained' if text_tower.trainable else 'frozen'})"
            f" | {self.device} x {self.world.size} ({self.state.strategy}) | steps {self.start}->{self.plan.total}: "
            + ", then ".join(
                f"{s.resolution} px at batch {s.batch_size} to step {s.until_step}" for s in self.plan.stages
            )
        )

    def report(self) -> None:
        if self.budget is not None:
            seconds, used = self.budget.seconds, self.budget.elapsed()
            print(f"pixrun: budget {format_duration(seconds)}, used {format_duration(used)} ({used / seconds:.1%}) "
                  f"for {self.plan.total} steps")
        print(f"pixrun: done. Run folder: {self.run_dir}")
        if self.scores is not None:
            tasks = ", ".join(f"{task} {self.scores[task]:.3f}" for task in TASKS)
            print(f"pixrun: strict scores of the EMA model: overall {self.scores['overall']:.3f} ({tasks}; held-out "
                  f"pairs {self.scores['heldout_overall']:.3f}), in {self.run_dir / 'eval.json'}")
        grids = sorted((self.run_dir / "samples").glob("step_*.png"))
        if grids:
            print(f"pixrun: samples: {grids[-1]}")

    def evaluate(self, step: int) -> None:
        """The strict evaluator's scores of the EMA model after the last step (eval.at_end), as `pixrun eval`
        gives them: generated in parts by every rank, scored by rank 0 and written to eval.json."""
        with self.timed("evaluation"):
            pipeline = self.state.ema_pipeline
            scores = evaluate_pipeline(pipeline, build_world(self.config), self.config.eval, ranks=self.world)
        if scores is None:
            return
        self.scores = scores
        record = evaluation_record(scores, pipeline, self.config.eval, None, "ema")
        (self.run_dir / "eval.json").write_text(json.dumps({"step": step, **record}, indent=1))
        if self.logger is not None:
            self.logger.record("eval", {k: v for k, v in scores.items() if v is not None}, step)

    def timed(self, event: str):
        """Times an event for the budget, which reserves time for those still to come."""
        return self.budget.timed(event) if self.budget is not None else nullcontext()

    def sample(self, step: int) -> Path | None:
        """The sample grid of the EMA weights at the stage's resolution, generated in parts by every rank."""
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        resolution = self.plan.stage_at(step - 1)[0].resolution
        with self.timed("sample"):
            held_out = self.held_out(step, len(self.config.sample.grid_prompts))
            written = sample_grid(self.state.ema_pipeline, path, self.world, resolution, held_out or None)
        if written is not None and self.logger is not None:
            self.logger.image("samples/ema", written, step)
        return written

    def held_out(self, step: int, count: int) -> HeldOut | None:
        """Up to `count` held-out samples to lead the rows of step `step`'s sample grid, at its stage's resolution;
        None when the data source has none to show (the grid shows sample.grid_prompts)."""
        return self.state.source.grid_samples(self.plan.stage_at(step - 1)[0], count)

    def measure(self, step: int, logger: RunLogger | None) -> None:
        """The configured metrics of EMA samples (FID/KID/CMMD/DINO-MMD against the data source's held-out sample
        or metrics.reference's folder; CLIPScore/PickScore against their captions) and the MSE of x0 by t, on the
        source's held-out sample at the stage's resolution; the images are generated and denoised in parts by
        every rank, scored on rank 0."""
        config = self.config.metrics
        stage = self.plan.stage_at(step - 1)[0]
        held_out = self.state.source.held_out(stage, config.num_images, config.seed)
        if len(held_out) < 2:  # too few to score (KID needs two)
            if self.world.is_main:
                print(f"pixrun: step {step}: no metrics: data source {self.config.data.source!r} holds "
                      f"{len(held_out)} held-out samples (prepared shards: prepare them with heldout=N)")
            return
        with self.timed("metrics"):
            if self.metric_networks is None and self.world.is_main:
                self.metric_networks = load_networks(config, self.device)
            images, captions = held_out.floats(), held_out.captions
            generated = generate_images(self.state.ema_pipeline, captions, config.seed, config.batch_size, self.world,
                                        stage.resolution)
            reference = (ReferenceImages(lambda: images, held_out.description, captions) if config.reference == "shapes"
                         else folder_reference(config.reference, config.num_images, stage.resolution))
            scores = {} if generated is None else quality_metrics(generated, reference, config,
                                                                  self.metric_networks, captions)
            errors = mse_by_t(self.state.ema_pipeline, images, captions, seed=config.seed, world=self.world)
        if logger is not None:
            logger.record("quality", {**scores, **errors}, step)

    def save(self, step: int) -> Path:
        """Checkpoint `step`: every owner's state (`checkpoint_states`)."""
        if isinstance(self.state.encode_text, TextCache):
            self.state.encode_text.flush()
        with self.timed("checkpoint"):
            return self.checkpointer.save(step)

    def budget_status(self) -> dict[str, str] | None:
        """What the progress bar shows of the budget: used, time to the end, money spent."""
        if self.budget is None:
            return None
        tc, elapsed, seconds = self.config.train, self.budget.elapsed(), self.budget.seconds
        status = {"budget": f"{elapsed / seconds:.0%}", "left": format_duration(seconds - elapsed)}
        if tc.device_hour_price:
            status["cost"] = f"{elapsed / 3600 * tc.device_hour_price * self.world.size:.2f}"
        return status

    def close(self) -> None:
        close_world(self.world)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True


def build_source(config: Config, world: World, text_tower: TextTower | None = None, pin_memory: bool = False,
                 autoencoder: Autoencoder | None = None) -> DataSource:
    """The run's data source (`data.source`), on this rank. A source whose data carries a frozen `text_tower`'s
    embeddings or the `autoencoder`'s latents checks them against these; `pin_memory` for a CUDA device."""
    return DATA_SOURCES[config.data.source].build(config, world, text_tower, autoencoder, pin_memory)


def train(config: Config, resume: str | None = None) -> Path:
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def sample_grid(pipeline: Pipeline, path: Path, world: World | None = None, resolution: int | None = None,
                held_out: HeldOut | None = None) -> Path | None:
    """The grid of `sample.grid_prompts` x `sample.grid_seeds`, or of the `held_out` samples' captions, each row
    led by its real image; written by rank 0 (None elsewhere)."""
    sc = pipeline.sample
    prompts = sc.grid_prompts if held_out is None else held_out.captions
    repeated = [p for p in prompts for _ in range(sc.grid_seeds)]
    images = generate_images(pipeline, repeated, seed=0, batch_size=len(repeated), world=world, resolution=resolution)
    if images is None:
        return None
    images, columns = to_uint8(images), sc.grid_seeds
    if held_out is not None:
        real = held_out.images.permute(0, 2, 3, 1).numpy()
        rows = images.reshape(len(prompts), columns, *images.shape[1:])
        images, columns = np.concatenate([real[:, None], rows], axis=1).reshape(-1, *images.shape[1:]), columns + 1
    save_grid(images, prompts, columns, path)
    return path
