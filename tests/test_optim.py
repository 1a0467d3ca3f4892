import os
import socket
from itertools import pairwise

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pixrun.checkpoint import Checkpointer
from pixrun.model import Denoiser, ModelConfig
from pixrun.optim import MuonAdamW, OptimConfig, build_optimizer, orthogonalize, set_lr

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


def test_adamw_is_torch_adamw_with_decay_on_matrices_only():
    params = tiny_params()
    optimizer = build_optimizer(params, OptimConfig(name="adamw", weight_decay=0.1))
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


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


def test_orthogonalize_flattens_the_spectrum():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen))
    grad = u @ torch.diag(torch.logspace(-2, 0, 64)) @ v.T  # condition number 100
    for matrix in (grad, grad.T):
        singular = torch.linalg.svdvals(orthogonalize(matrix, steps=5).float())
        assert singular.min() > 0.6 and singular.max() < 1.25  # all of the same order (bf16 quintic, not exact)


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
    set_lr(optimizer, 4, config, 1000)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4])
    set_lr(optimizer, 100, config, 1000)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-2, 1e-3, 1e-3])
    adamw = build_optimizer(tiny_params(), OptimConfig(name="adamw", lr=1e-3, warmup_steps=10))
    set_lr(adamw, 4, OptimConfig(name="adamw", lr=1e-3, warmup_steps=10), 1000)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([5e-4, 5e-4])


def test_cooldown_falls_linearly_over_the_last_share_of_steps():
    config = OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10, cooldown=0.2)
    optimizer = build_optimizer(tiny_params(), config)
    lrs = []
    for step in range(100):
        set_lr(optimizer, step, config, total_steps=100)
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
        model = Denoiser(ModelConfig(**TINY))
        params = {f"denoiser.{n}": p for n, p in model.named_parameters()}
        optimizer = build_optimizer(params, MUON)
        return params, optimizer, Checkpointer(tmp_path, params, {"denoiser": model}, optimizer, True, lambda: None, 1)

    params, optimizer, checkpointer = make(0)
    for step in range(2):
        set_grads(params, step)
        optimizer.step()
    ema = snapshot(params)
    path = checkpointer.save(2, ema, {})
    resumed_params, resumed, resumed_checkpointer = make(1)  # other weights, no state: all must come from disk
    resumed_checkpointer.load(path, snapshot(resumed_params))
    assert isinstance(resumed, MuonAdamW)
    slots = {slot for state in resumed.state.values() for slot in state}
    assert slots == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    set_grads(params, 2)
    set_grads(resumed_params, 2)
    optimizer.step()
    resumed.step()
    for n in params:
        assert torch.equal(params[n], resumed_params[n]), n


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
    model(batch["x"], batch["t"], batch["txt"]).square().mean().backward()
    optimizer.step()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_muon_step, args=(2, port, str(tmp_path)), nprocs=2)
    sharded = load_file(tmp_path / "sharded.safetensors")
    start = load_file(tmp_path / "start.safetensors")
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[name]) or p.grad.abs().max() == 0, name
        assert torch.allclose(sharded[name], p.detach(), atol=1e-6), name
