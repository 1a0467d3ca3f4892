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
import random
import signal
import struct
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence

from pixrun.checkpoint import Checkpointer, choose_resume
from pixrun.config import Config, ConfigError, save_config
from pixrun.data.source import LocalBatch, ShapesSource, ShardSource
from pixrun.flow import Flow
from pixrun.logger import RunLogger, save_grid
from pixrun.losses.auxiliary import AuxiliaryLosses
from pixrun.metrics import generate_images
from pixrun.model import Denoiser, count_parameters
from pixrun.optim import EMA, build_optimizer, set_lr
from pixrun.parallel import (
    StopVote,
    World,
    close_world,
    device_mesh,
    init_world,
    parallelize,
    resolve_strategy,
    shard_copy,
)
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

NOISE, DROPOUT = 0, 1  # a sample's two random streams: t, noise and routing on the device; dropout on the host


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the message says why."""


def sample_seed(seed: int, step: int, row: int, stream: int = NOISE) -> int:
    """The seed of global row `row` of step `step`: a hash, so nearby (step, row) pairs give unrelated streams."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, row, stream), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
        checkpoint = choose_resume(self.run_dir, resume, self.world)
        pipeline = prepare(config, build_world(config).vocabulary(), checkpoint, self.world).to(self.device)
        self.source = build_source(config, self.world, pipeline.text_tower, pin_memory=self.device.type == "cuda")
        self.bf16 = uses_bf16(self.device, tc.precision)
        text = pipeline.text_tower
        self.aux = AuxiliaryLosses(config, config.model.width, self.device)
        trained = {
            "denoiser": pipeline.denoiser,
            **({"text_encoder": text.encoder} if text.trainable else {}),
            **self.aux.trainable(),
        }
        # The EMA weights live in a copy of the trained modules, sharded like them: generation runs on every rank
        # with one block gathered at a time, and no rank ever holds the whole EMA.
        ema_text = copy.deepcopy(text) if text.trainable else text
        ema_trained = {name: ema_text.encoder if name == "text_encoder" else copy.deepcopy(module)
                       for name, module in trained.items()}
        for module in ema_trained.values():
            module.requires_grad_(False)
        sharded = resolve_strategy(config.parallel, self.world) == "fsdp"
        mesh = device_mesh(config.parallel, self.world, self.device) if sharded else None
        try:
            self.strategy = parallelize(
                pipeline.denoiser,
                [m for n, m in trained.items() if n != "denoiser"],
                config.parallel,
                self.world,
                self.device,
                self.bf16,
                mesh,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        shard_copy(ema_trained["denoiser"], [m for n, m in ema_trained.items() if n != "denoiser"], config.parallel,
                   self.world, mesh, self.bf16)
        self.aux.capture(pipeline.denoiser)
        self.pipeline = pipeline
        self.ema_pipeline = Pipeline(config, ema_trained["denoiser"], ema_text, pipeline.flow).eval()
        self.model, self.ema_model = nn.ModuleDict(trained), nn.ModuleDict(ema_trained)
        self.params = dict(self.model.named_parameters())  # by "<owner>.<name>": the keys of checkpoints
        # Newton-Schulz in the compute precision: bf16 where it is fast, fp32 where bf16 products are slow (CPUs
        # without AMX, where bf16 Newton-Schulz was most of the step, or far more without AVX-512)
        self.optimizer = build_optimizer(self.params, config.optim, torch.bfloat16 if self.bf16 else torch.float32)
        self.ema = EMA(self.params, dict(self.ema_model.named_parameters()), config.ema)
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_in_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self.checkpointer = Checkpointer(self.run_dir, self.model, self.ema_model, self.optimizer, self.world,
                                         tc.keep_checkpoints, async_save=tc.async_checkpoint)
        self.start = 0
        if checkpoint is not None:
            state = self.checkpointer.load(checkpoint, self.counters())
            self.start = state["step"]
            self.source.load_state_dict(state.get("data", {}))
        self.lr = 0.0
        self.stop_requested = False
        self.metric_networks = None
        self.encode_text = text
        self.empty_prompt: torch.Tensor | None = None
        if config.text.cache_dir and not text.trainable:
            self.encode_text = TextCache(config.text.cache_dir, text, writer=str(self.world.rank))

    def counters(self) -> dict[str, torch.Tensor]:
        """The run's device-side counters, saved with each checkpoint and filled in place on resume."""
        return {"ema_updates": self.ema.updates, "nonfinite_steps": self.nonfinite_total}

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's part of global batch `step`; returns its figures as device tensors
        (loss, each loss term, grad norm). Nothing here waits for the device."""
        config, tc, device = self.config, self.config.train, self.device
        denoiser, flow = self.pipeline.denoiser, self.pipeline.flow
        self.lr = set_lr(self.optimizer, step, config.optim, tc.steps)
        stage, stage_start = config.stage_at(step)
        batch = self.source.batch(step, stage, stage_start)
        has_rows = len(batch.captions) > 0
        if not has_rows:  # every sample was bad: a stand-in row keeps this rank in the collectives, weighted 0
            batch = LocalBatch(torch.zeros(1, 3, stage.resolution, stage.resolution, dtype=torch.uint8), [""])
        first = self.world.rank * (stage.batch_size // self.world.size)
        rows = [first + row for row in (batch.rows or range(len(batch.captions)))]  # rows in the global batch
        generators = [torch.Generator(device).manual_seed(sample_seed(tc.seed, step, row)) for row in rows]
        # drawn on the host (which captions to tokenise is decided there), from the sample's own stream
        dropped = [random.Random(sample_seed(tc.seed, step, row, DROPOUT)).random() < config.flow.caption_dropout
                   for row in rows]
        x0 = batch.images_on(device)
        t = torch.cat([flow.sample_t(1, g) for g in generators])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in generators])
        plan = None
        if config.tread.enabled if stage.tread is None else stage.tread:  # drawn last: the other draws stay
            p = config.model.patch_size
            tokens = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            plan = denoiser.plan_routing(config.tread, tokens, generators, device)
        x_t = flow.add_noise(x0, eps, t)
        with compute_context(device, tc.precision):
            txt, mask = self.text_states(batch, dropped)
            pred = denoiser(x_t, t, txt, mask, routing=plan)
            terms = self.aux(flow.to_x0(pred.float(), x_t, t), x0, t, plan, stage, step, config.model.patch_size)
        flow_loss = flow.loss(pred.float(), x0, eps, x_t, t)
        loss = flow_loss + sum(terms.values())
        if not has_rows:
            loss = loss * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        with attention_context(device):
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), config.optim.grad_clip)
        if isinstance(grad_norm, DTensor):  # already reduced over ranks: every rank decides the same way
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(grad_norm)
        apply = finite & self.world.all_true(torch.full((), has_rows, device=device))
        self.optimizer.step(apply=apply)
        self.ema.update(step, apply)
        self.nonfinite_total += (~finite).long()
        self.nonfinite_in_row = (self.nonfinite_in_row + 1) * (~finite).long()
        return {
            "loss": loss.detach(),
            "flow_loss": flow_loss.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "grad_norm": grad_norm.detach(),
        }

    def check_health(self, step: int) -> None:
        """Read on logging steps (a host sync): too many non-finite steps in a row end the run."""
        in_row = int(self.nonfinite_in_row)
        if in_row >= self.config.train.max_nonfinite_in_row:
            raise TrainingError(
                f"the loss was non-finite {in_row} steps in a row (last: step {step + 1}); lower optim.lr or "
                "raise optim.warmup_steps, then --resume"
            )

    def text_states(self, batch: LocalBatch, dropped: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoded captions; a dropped caption becomes the encoded empty prompt. Embeddings precomputed by
        `pixrun data prepare` are used as they are (they came from the same frozen encoder)."""
        if batch.embeddings is None or self.pipeline.text_tower.trainable:
            return self.encode_text(["" if drop else caption for caption, drop in zip(batch.captions, dropped)])
        if self.empty_prompt is None:  # encoded once: the tower is frozen
            states, mask = self.encode_text([""])
            self.empty_prompt = states[0][mask[0]]
        empty = self.empty_prompt
        states = [empty if drop else e.to(self.device, empty.dtype) for e, drop in zip(batch.embeddings, dropped)]
        lengths = [len(s) for s in states]  # host lengths: the mask is built without reading the device
        if len(set(lengths)) == 1:  # nothing padded: no mask, so the denoiser's attention can use flash kernels
            return torch.stack(states), None
        mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        return pad_sequence(states, batch_first=True), mask.to(self.device)

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
        stop_vote = StopVote(world)
        self.pipeline.denoiser.train()
        self.pipeline.text_tower.train(self.pipeline.text_tower.trainable)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for step in range(self.start, tc.steps):
                metrics = self.step(step)
                done = step + 1
                values = {}
                if done % tc.log_every == 0 or done == tc.steps:
                    values = self.log_values(metrics)
                    self.check_health(step)
                if logger is not None:
                    logger.step(step, values, self.config.stage_at(step)[0].batch_size)
                if done % tc.sample_every == 0 or done == tc.steps:
                    last_grid = self.sample(done, logger) or last_grid
                if tc.metrics_every and done % tc.metrics_every == 0:
                    self.measure(done, logger)
                stop = stop_vote.cast(self.stop_requested)
                if done % tc.checkpoint_every == 0 or done == tc.steps or stop:
                    self.save(done)
                if stop:
                    if world.is_main:
                        print(
                            f"\npixrun: stopped by a signal after step {done}; checkpoint saved. "
                            f"Continue with: pixrun train ... --resume auto"
                        )
                    break
            stop_vote.settle()
            self.checkpointer.wait()
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

    def log_values(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's figures averaged over ranks, with the counters: one collective and one read of the device."""
        names = list(metrics)
        means = self.world.mean(torch.stack([metrics[name].float() for name in names])).tolist()
        values = dict(zip(names, means))
        values["lr"] = self.lr
        values["nonfinite_steps"] = int(self.nonfinite_total)
        values["data_skipped"] = self.source.skipped
        return values

    def sample(self, step: int, logger: RunLogger | None) -> Path | None:
        """The sample grid of the EMA weights at the stage's resolution, generated in parts by every rank."""
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        resolution = self.config.stage_at(step - 1)[0].resolution
        written = sample_grid(self.ema_pipeline, path, self.world, resolution)
        if written is not None and logger is not None:
            logger.image("samples/ema", written, step)
        return written

    def measure(self, step: int, logger: RunLogger | None) -> None:
        """FID/KID/CMMD/DINO-MMD of EMA samples and the MSE of x0 by t, on a held-out shapes sample, at the stage's
        resolution; the images are generated and denoised in parts by every rank, scored on rank 0."""
        from pixrun.metrics import load_networks, mse_by_t, shapes_quality_metrics, shapes_reference

        config = self.config.metrics
        resolution = self.config.stage_at(step - 1)[0].resolution
        if self.metric_networks is None and self.world.is_main:
            self.metric_networks = load_networks(config, self.device)
        scores = shapes_quality_metrics(self.ema_pipeline, config, self.metric_networks, self.world, resolution)
        held_out = shapes_reference(build_world(self.config), resolution, config.num_images, config.seed)
        errors = mse_by_t(self.ema_pipeline, held_out.load(), held_out.captions, seed=config.seed, world=self.world)
        if logger is not None:
            logger.record("quality", {**scores, **errors}, step)

    def save(self, step: int) -> Path:
        if isinstance(self.encode_text, TextCache):
            self.encode_text.flush()
        return self.checkpointer.save(
            step,
            self.counters(),
            {
                "data": self.source.state_dict(),
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


def build_source(config: Config, world: World, text_tower: TextTower | None = None, pin_memory: bool = False):
    """The run's data source. With shards, a frozen `text_tower` is checked against the one that made the
    embeddings they carry; `pin_memory` for a CUDA device."""
    d = config.data
    if d.source == "shapes":
        return ShapesSource(build_world(config), config.train.seed, world.rank, world.size, pin_memory=pin_memory)
    frozen = text_tower is not None and not text_tower.trainable
    return ShardSource(
        d.shards, config.train.seed, world.rank, world.size, d.num_workers, d.shuffle_shards, d.shard_url,
        stages=config.stage_plan(), partitions=d.partitions, pin_memory=pin_memory,
        text_encoder=text_tower.identity() if frozen else None,
    )


def train(config: Config, resume: str | None = None) -> Path:
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def sample_grid(pipeline: Pipeline, path: Path, world: World | None = None, resolution: int | None = None) -> Path | None:
    """The grid of `sample.grid_prompts` x `sample.grid_seeds`; written by rank 0 (None elsewhere)."""
    sc = pipeline.config.sample
    prompts = [p for p in sc.grid_prompts for _ in range(sc.grid_seeds)]
    images = generate_images(pipeline, prompts, seed=0, batch_size=len(prompts), world=world, resolution=resolution)
    if images is None:
        return None
    save_grid(to_uint8(images), sc.grid_prompts, sc.grid_seeds, path)
    return path
