import copy
import dataclasses
import json
import math
import os
from itertools import pairwise

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode

from pixrun import optim
from pixrun.checkpoint import Checkpointer, ModuleState, OptimizerState, TensorState, load_state
from pixrun.model import Denoiser, ModelConfig
from pixrun.optim import (
    EMA,
    EMAConfig,
    MuonAdamW,
    OptimConfig,
    build_optimizer,
    orthogonalize,
    schedule_factor,
    set_lr,
)
from pixrun.runtime import World
from tests.helpers import HostReads, free_port

TINY = {"width": 32, "depth": 2, "heads": 2, "axes_dim": [8, 8], "patch_size": 8, "bottleneck": 16, "context_dim": 24}
MUON = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.01, muon_weight_decay=0.1, warmup_steps=1)


def tiny_params(seed=0) -> dict[str, torch.nn.Parameter]:
    """A denoiser's parameters, named as the trainer names them, plus a text tower's T5-style block weight."""
    torch.manual_seed(seed)
    model = Denoiser(ModelConfig(**TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    params = {f"denoiser.{n}": p for n, p in model.named_parameters()}
    text = {
        "shared.weight": (50, 24),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (24, 24),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 2),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": (24, 64),
    }
    params.update({f"text_encoder.{n}": torch.nn.Parameter(torch.randn(shape)) for n, shape in text.items()})
    return params


def set_grads(params: dict[str, torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)


def snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every state tensor (this rank's part of a sharded one), copied."""
    return {
        f"{i}.{slot}": (t.to_local() if isinstance(t, DTensor) else t).clone()
        for i, state in enumerate(optimizer.state.values()) for slot, t in state.items()
    }


def test_adamw_is_torch_fused_adamw_with_decay_on_matrices_only():
    params = tiny_params()
    theirs = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    optimizer = build_optimizer(params, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1))
    assert isinstance(optimizer, MuonAdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    groups = [
        {"params": [p for p in theirs.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in theirs.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), fused=True)
    for step in range(3):
        set_grads(params, step)
        set_grads(theirs, step)
        optimizer.step()
        fused.step()
    for n in params:
        assert torch.equal(params[n], theirs[n]), n
    assert optimizer_state(optimizer).keys() == optimizer_state(fused).keys()  # "step", "exp_avg", "exp_avg_sq"
    for key, value in optimizer_state(fused).items():
        assert torch.equal(optimizer_state(optimizer)[key], value), key


def test_muon_takes_exactly_the_matrices_inside_the_denoiser_blocks():
    params = tiny_params()
    optimizer = build_optimizer(params, MUON)
    muon_ids = {id(p) for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    chosen = {name for name, p in params.items() if id(p) in muon_ids}
    assert chosen == {
        f"denoiser.blocks.{i}.{m}.weight" for i in range(2) for m in (
            "attention.img_qkv_proj", "attention.txt_kv_proj", "attention.to_out.0",
            "gate_proj", "up_proj", "down_proj", "modulation.lin",
        )
    }
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)  # everything else: AdamW


def test_muon_text_adds_the_text_towers_projections_but_not_its_embeddings():
    params = tiny_params()
    optimizer = build_optimizer(params, dataclasses.replace(MUON, muon_text=True))
    muon_ids = {id(p) for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    chosen = {name for name, p in params.items() if id(p) in muon_ids and name.startswith("text_encoder.")}
    assert chosen == {"text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight",
                      "text_encoder.encoder.block.0.layer.1.DenseReluDense.wo.weight"}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


def test_orthogonalize_flattens_the_spectrum():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen))
    grad = u @ torch.diag(torch.logspace(-2, 0, 64)) @ v.T  # condition number 100
    for matrix in (grad, grad.T):
        singular = torch.linalg.svdvals(orthogonalize(matrix, steps=5).float())
        assert singular.min() > 0.6 and singular.max() < 1.25  # all of the same order (bf16 quintic, not exact)


@pytest.mark.parametrize("shape", [(64, 128), (256, 64), (48, 300), (3, 40, 200)])
def test_fp32_newton_schulz_on_the_gram_matrix_equals_the_plain_iteration(shape):
    """Wide fp32 matrices take the Gram form; float64 takes the plain iteration: the same up to fp32 rounding."""
    matrices = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    plain = orthogonalize(matrices.double(), steps=5, dtype=torch.float64)
    gram = orthogonalize(matrices, steps=5, dtype=torch.float32)
    assert gram.dtype == torch.float32 and gram.shape == matrices.shape
    torch.testing.assert_close(gram.double(), plain, atol=2e-5, rtol=0)


def test_muon_step_moves_a_matrix_along_an_orthogonal_direction():
    params = {"blocks.0.w": torch.nn.Parameter(torch.randn(48, 96))}
    before = snapshot(params)["blocks.0.w"]
    optimizer = build_optimizer(params, OptimConfig(name="muon", muon_lr=0.01, muon_lr_scaling="original"))
    params["blocks.0.w"].grad = torch.randn(48, 4) @ torch.randn(4, 96) + 1e-3 * torch.randn(48, 96)  # ~rank 4
    optimizer.step()
    singular = torch.linalg.svdvals((before - params["blocks.0.w"].detach()) / 0.01)
    assert singular[:4].max() < 1.25 and singular[:4].min() > 0.6  # the dominant directions: one step size each


def test_same_updates_as_torch_muon_and_adamw():
    params = tiny_params()
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    ours = build_optimizer(params, MUON)
    muon_ids = {id(p) for p in ours.param_groups[0]["params"]}
    muon = [theirs[n] for n, p in params.items() if id(p) in muon_ids]
    rest = [theirs[n] for n, p in params.items() if id(p) not in muon_ids]
    reference = [
        torch.optim.Muon(muon, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ], lr=1e-3, betas=(0.9, 0.95)),
    ]
    start = snapshot(params)
    for step in range(3):
        set_grads(params, step)
        set_grads(theirs, step)
        ours.step()
        for optimizer in reference:
            optimizer.step()
    for n in params:
        moved = (theirs[n].detach() - start[n]).norm()
        assert moved > 0
        assert (params[n].detach() - theirs[n].detach()).norm() <= 1e-3 * moved, n


def test_set_lr_warms_up_each_group_to_its_own_rate():
    config = OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10)
    optimizer = build_optimizer(tiny_params(), config)
    set_lr(optimizer, schedule_factor(4, config, 1000), config)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4])
    set_lr(optimizer, schedule_factor(100, config, 1000), config)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-2, 1e-3, 1e-3])
    adamw_config = OptimConfig(name="adamw", lr=1e-3, warmup_steps=10)
    adamw = build_optimizer(tiny_params(), adamw_config)
    set_lr(adamw, schedule_factor(4, adamw_config, 1000), adamw_config)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([5e-4, 5e-4])


def test_cooldown_falls_linearly_over_the_last_share_of_steps():
    config = OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10, cooldown=0.2)
    optimizer = build_optimizer(tiny_params(), config)
    lrs = []
    for step in range(100):
        set_lr(optimizer, schedule_factor(step, config, 100), config)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert lrs[9] == lrs[79] == pytest.approx([2e-2, 1e-3, 1e-3])  # warm from step 9, flat until the last 20
    assert lrs[90] == pytest.approx([1e-2, 5e-4, 5e-4])  # halfway down
    assert lrs[99] == pytest.approx([1e-3, 5e-5, 5e-5])  # one step from the end: 1/20 of the peak
    assert all(later[0] < earlier[0] for earlier, later in pairwise(lrs[80:]))


def test_batched_newton_schulz_matches_one_matrix_at_a_time():
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 96, 48, generator=gen) * torch.logspace(-3, 1, 5)[:, None, None]  # each its own scale
    together = orthogonalize(stack, steps=5)
    for matrix, ortho in zip(stack, together):
        alone = orthogonalize(matrix, steps=5).float()
        # bf16 rounding may differ between a batched and a single product; normalising the stack as a whole
        # (instead of each matrix) is off by about 2 %
        assert (ortho.float() - alone).norm() <= 1e-2 * alone.norm()


def test_state_survives_a_checkpoint_and_the_next_step_is_identical(tmp_path):
    def make(seed):
        torch.manual_seed(seed)
        model = nn.ModuleDict({"denoiser": Denoiser(ModelConfig(**TINY))})
        ema_model = copy.deepcopy(model)
        params = dict(model.named_parameters())
        optimizer = build_optimizer(params, MUON)
        ema = EMA(params, dict(ema_model.named_parameters()), EMAConfig(decay=0.9))
        states = {"model": ModuleState(model), "ema": ModuleState(ema_model),
                  "optimizer": OptimizerState(model, optimizer), "counters": TensorState({"ema_updates": ema.updates})}
        return params, optimizer, ema, Checkpointer(tmp_path, World(), keep=1, states=states)

    params, optimizer, ema, checkpointer = make(0)
    for step in range(2):
        set_grads(params, step)
        optimizer.step()
        ema.update(step)
    path = checkpointer.save(2)
    resumed_params, resumed, resumed_ema, resumed_checkpointer = make(1)  # other weights, no state: all from disk
    resumed_checkpointer.load(path, load_state(path))
    assert isinstance(resumed, MuonAdamW)
    slots = {slot for state in resumed.state.values() for slot in state}
    assert slots == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    assert resumed_ema.updates.dtype == torch.int64 and int(resumed_ema.updates) == 2
    set_grads(params, 2)
    set_grads(resumed_params, 2)
    for opt, e in ((optimizer, ema), (resumed, resumed_ema)):
        opt.step()
        e.update(2)
    for n in params:
        assert torch.equal(params[n], resumed_params[n]), n
        assert torch.equal(ema.shadow[n], resumed_ema.shadow[n]), n


def test_unknown_optimizer_settings_are_rejected():
    with pytest.raises(ValueError, match="optim.name"):
        OptimConfig(name="sgd").validate()
    with pytest.raises(ValueError, match="muon_lr_scaling"):
        OptimConfig(muon_lr_scaling="spectral").validate()
    with pytest.raises(ValueError, match="optim.cooldown"):
        OptimConfig(cooldown=1.5).validate()


def _sharded_muon_step(rank: int, world: int, port: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Denoiser(ModelConfig(**TINY))
        model.load_state_dict(load_file(f"{folder}/start.safetensors"))
        for block in model.blocks:
            fully_shard(block, mesh=init_device_mesh("cpu", (world,)))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        optimizer = build_optimizer(dict(model.named_parameters()), MUON)
        batch = load_file(f"{folder}/batch.safetensors")  # every rank the same batch: the mean gradient is exact
        model(batch["x"], batch["t"], batch["txt"]).square().mean().backward()
        optimizer.step()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            save_file({n: t.contiguous() for n, t in full.items()}, f"{folder}/sharded.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_muon_on_fsdp2_sharded_parameters_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(**TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_file(model.state_dict(), tmp_path / "start.safetensors")
    batch = {"x": torch.randn(2, 3, 16, 24), "t": torch.rand(2), "txt": torch.randn(2, 3, 24)}
    save_file(batch, tmp_path / "batch.safetensors")
    optimizer = build_optimizer(dict(model.named_parameters()), MUON)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: another thread count sums the gradients in another order
    try:
        model(batch["x"], batch["t"], batch["txt"]).square().mean().backward()
        optimizer.step()
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_sharded_muon_step, args=(2, free_port(), str(tmp_path)), nprocs=2)
    sharded = load_file(tmp_path / "sharded.safetensors")
    start = load_file(tmp_path / "start.safetensors")
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[name]) or p.grad.abs().max() == 0, name
        assert torch.allclose(sharded[name], p.detach(), atol=1e-6), name


def poison(params: dict[str, torch.Tensor]) -> None:
    """Gradients of a step that must be skipped: NaN and inf in every tensor."""
    for p in params.values():
        p.grad.view(-1)[0] = float("nan")
        p.grad.view(-1)[-1] = float("inf")


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_a_skipped_step_changes_nothing_and_the_next_is_as_if_it_never_was(name):
    config = dataclasses.replace(MUON, name=name)
    applied, skipped = tiny_params(), tiny_params()
    runs = [(applied, build_optimizer(applied, config)), (skipped, build_optimizer(skipped, config))]
    for params, optimizer in runs:
        set_grads(params, 0)
        optimizer.step(apply=torch.tensor(True))
    optimizer = runs[1][1]
    before, state_before = snapshot(skipped), optimizer_state(optimizer)
    set_grads(skipped, 1)
    poison(skipped)
    optimizer.step(apply=torch.tensor(False))
    for n in skipped:
        assert torch.equal(skipped[n], before[n]), n
    for key, value in optimizer_state(optimizer).items():
        assert torch.equal(value, state_before[key]), key  # momentum, moments and step counts
    for params, optimizer in runs:
        set_grads(params, 2)
        optimizer.step(apply=torch.tensor(True))
    for n in applied:
        assert not torch.equal(applied[n], before[n]), n
        assert torch.equal(skipped[n], applied[n]), n
    expected = optimizer_state(runs[0][1])
    assert all(torch.equal(value, expected[key]) for key, value in optimizer_state(runs[1][1]).items())


def test_a_step_with_apply_equals_one_without():
    ours, plain = tiny_params(), tiny_params()
    optimizers = build_optimizer(ours, MUON), build_optimizer(plain, MUON)
    for step in range(2):
        set_grads(ours, step)
        set_grads(plain, step)
        optimizers[0].step(apply=torch.tensor(True))
        optimizers[1].step()
    for n in ours:
        assert torch.equal(ours[n], plain[n]), n


def test_the_optimizer_and_the_ema_never_read_the_device_from_the_host():
    params = tiny_params()
    shadow = {n: p.detach().clone() for n, p in params.items()}
    optimizer, ema = build_optimizer(params, MUON), EMA(params, shadow, EMAConfig(decay=0.99))
    for step, apply in enumerate([True, False, True]):  # the first step also creates the state
        set_grads(params, step)
        with HostReads() as reads:
            optimizer.step(apply=torch.tensor(apply))
            ema.update(step, torch.tensor(apply))
        assert reads.calls == [], step


def test_the_ema_warms_up_and_leaves_skipped_steps_out():
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(4)}
    shadow = {"w": torch.full((3, 2), 10.0), "b": torch.full((4,), 10.0)}
    ema = EMA(params, shadow, EMAConfig(decay=0.95, every=2))
    ema.update(0, torch.tensor(True))  # not an update step (every 2)
    assert torch.equal(shadow["w"], torch.full((3, 2), 10.0)) and ema.updates == 0
    ema.update(1, torch.tensor(True))  # n = 0: decay min(0.95, 1/10) = 0.1 keeps a tenth
    assert torch.allclose(shadow["w"], torch.full((3, 2), 1.0)) and ema.updates == 1
    kept = {n: t.clone() for n, t in shadow.items()}
    ema.update(3, torch.tensor(False))  # skipped: no change, not counted
    assert all(torch.equal(shadow[n], kept[n]) for n in shadow) and ema.updates == 1
    ema.update(5, torch.tensor(True))  # n = 1: decay 2/11
    assert torch.allclose(shadow["b"], torch.full((4,), 2 / 11)) and ema.updates == 2
    for _ in range(200):
        ema.update(1)
    assert torch.allclose(ema.weight(), torch.tensor(0.05))  # (1 + n) / (10 + n) > 0.95 from n = 171 on
    assert EMA(params, shadow, EMAConfig(decay=0.95, warmup=False)).weight() == pytest.approx(0.05)


# FSDP2: matrices of rows 5, 9 and 3 (not divisible by 2 or 4; 3 rows over 4 ranks leave one rank an empty shard)
# in five blocks (more matrices of a shape than ranks) and a 6x12 matrix in two blocks only (fewer than ranks)
BLOCK_SHAPES = [(5, 6), (9, 4), (3, 8)]


class Block(nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(cols, rows) for rows, cols in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard wants one; the tests set gradients instead
        return sum(layer(x[..., : layer.in_features]).sum() for layer in self.layers)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(BLOCK_SHAPES + ([(6, 12)] if i < 2 else [])) for i in range(5))
        self.head = nn.Linear(12, 7)  # outside the blocks: AdamW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block(x) for block in self.blocks) + self.head(x).sum()


SHARDED_STEPS = [(0, True), (1, False), (2, True)]  # (gradient seed, apply): the middle step has NaN gradients


def sharded_grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    if seed == 1:  # the skipped step's
        for g in grads.values():
            g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
    return grads


def newton_schulz_flops(shape: tuple[int, int]) -> int:
    with FlopCounterMode(display=False) as flops:
        orthogonalize(torch.zeros(1, *shape), steps=MUON.muon_ns_steps)
    return flops.get_total_flops()


def _distributed_muon_steps(rank: int, world: int, port: int, folder: str, hsdp: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        optim.NS_BATCH_ELEMENTS = 40  # one matrix per rank at a time: several rounds per shape
        shape = (2, world // 2) if hsdp else (world,)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
        model = Blocks()
        model.load_state_dict(load_file(f"{folder}/start.safetensors"))
        ema_model = copy.deepcopy(model)
        for m in (model, ema_model):
            for block in m.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
        params = dict(model.named_parameters())
        assert all(p.placements == ((Replicate(), Shard(0)) if hsdp else (Shard(0),)) for p in params.values())
        optimizer = build_optimizer(params, MUON)
        ema = EMA(params, dict(ema_model.named_parameters()), EMAConfig(decay=0.9))
        report = {"host_reads": [], "flops": []}
        for step, (seed, apply) in enumerate(SHARDED_STEPS):
            for n, g in sharded_grads(model, seed).items():
                params[n].grad = distribute_tensor(g, mesh, params[n].placements, src_data_rank=None)
            before = {n: p.to_local().clone() for n, p in params.items()}
            state_before = optimizer_state(optimizer)
            with HostReads() as reads, FlopCounterMode(display=False) as flops:
                optimizer.step(apply=torch.tensor(apply))
                ema.update(step, torch.tensor(apply))
            report["host_reads"] += reads.calls
            report["flops"].append(flops.get_total_flops())
            if not apply:
                assert all(torch.equal(p.to_local(), before[n]) for n, p in params.items())
                assert all(torch.equal(t, state_before[k]) for k, t in optimizer_state(optimizer).items())
        whole = {f"model.{n}": p.full_tensor() for n, p in params.items()}
        whole |= {f"ema.{n}": t.full_tensor() for n, t in ema.shadow.items()}
        whole["ema_updates"] = ema.updates
        if rank == 0:
            save_file({n: t.contiguous() for n, t in whole.items()}, f"{folder}/sharded.safetensors")
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,hsdp", [(2, False), (4, False), (4, True)], ids=["fsdp2", "fsdp4", "hsdp2x2"])
def test_distributed_muon_orthogonalises_each_matrix_once_and_matches_one_process(world, hsdp, tmp_path):
    torch.manual_seed(0)
    model = Blocks()
    save_file(model.state_dict(), tmp_path / "start.safetensors")
    params = dict(model.named_parameters())
    optimizer = build_optimizer(params, MUON)
    ema = EMA(params, {n: p.detach().clone() for n, p in params.items()}, EMAConfig(decay=0.9))
    start = snapshot(params)
    single_flops = []
    for step, (seed, apply) in enumerate(SHARDED_STEPS):
        for n, g in sharded_grads(model, seed).items():
            params[n].grad = g
        with FlopCounterMode(display=False) as flops:
            optimizer.step(apply=torch.tensor(apply))
            ema.update(step, torch.tensor(apply))
        single_flops.append(flops.get_total_flops())

    mp.spawn(_distributed_muon_steps, args=(world, free_port(), str(tmp_path), hsdp), nprocs=world)
    sharded = load_file(tmp_path / "sharded.safetensors")
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    assert all(r["host_reads"] == [] for r in reports)
    # Newton-Schulz is the only counted work: each matrix once per shard group (HSDP: once per replica), and no
    # rank more than its share, ceil(matrices of a shape / group size) of each shape
    group = world // 2 if hsdp else world
    counts = {shape: sum(1 for n, p in params.items() if "blocks" in n and tuple(p.shape) == shape)
              for shape in [*BLOCK_SHAPES, (6, 12)]}
    share = sum(math.ceil(count / group) * newton_schulz_flops(shape) for shape, count in counts.items())
    assert single_flops[0] == sum(count * newton_schulz_flops(shape) for shape, count in counts.items())
    for step in range(len(SHARDED_STEPS)):
        assert sum(r["flops"][step] for r in reports) == single_flops[step] * (world // group)
        assert max(r["flops"][step] for r in reports) <= share < single_flops[step]
    # the same model as one process: Newton-Schulz rounds in bf16, and a batch of other matrices may take another
    # matmul kernel, so a last bf16 bit of the update may differ (2^-8 of it; bit-equal on this CPU); AdamW's
    # elementwise update on each shard is exact
    for n, p in params.items():
        moved = (p.detach() - start[n]).norm()
        assert moved > 0, n
        assert (sharded[f"model.{n}"] - p.detach()).norm() <= 1e-2 * moved, n
        assert (sharded[f"ema.{n}"] - ema.shadow[n]).norm() <= 1e-2 * moved, n
        if "blocks" not in n or p.dim() < 2:
            assert torch.equal(sharded[f"model.{n}"], p.detach()), n
    assert sharded["ema_updates"] == ema.updates == 2
