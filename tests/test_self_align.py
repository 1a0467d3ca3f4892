"""Teacher-free alignment (SRA): an earlier block of the denoiser against a later block of its EMA at less noise."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from pixrun.config import ConfigError, load_config
from pixrun.flops import denoiser_flops, training_flops
from pixrun.flow import Flow, FlowConfig
from pixrun.losses import LossInputs
from pixrun.losses.self_align import SelfAlignConfig, SelfAlignTerm
from pixrun.model import TokenRouting
from pixrun.train import Trainer, ema_hidden, train
from tests.conftest import TINY_OVERRIDES
from tests.helpers import assert_resumed_as_straight
from tests.test_tread import generators, inputs, random_model

BLOCK, TARGET = 1, 2


def student_and_teacher():
    """A random denoiser (depth 4), its EMA copy (perturbed, so the two differ; trainable on purpose: only the
    step's no_grad keeps gradients out of it), and the term on blocks 1 -> 2."""
    student = random_model()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    term = SelfAlignTerm.build(SelfAlignConfig(weight=1.0, block=BLOCK, target_block=TARGET, hidden=32),
                               student.config.width, torch.device("cpu"), {})
    return student, teacher, term


@pytest.mark.parametrize("routed", [False, True])
def test_the_student_block_and_projector_learn_and_the_ema_gets_no_gradient(routed):
    student, teacher, term = student_and_teacher()
    x0, t, txt, mask = inputs()
    eps = torch.randn_like(x0)
    flow = Flow(FlowConfig())
    plan = student.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu") if routed else None
    x_t = flow.add_noise(x0, eps, t)
    _, hidden = student(x_t, t, txt, mask, routing=plan, hidden_at=BLOCK)
    state = SimpleNamespace(pipeline=SimpleNamespace(flow=flow), ema_pipeline=SimpleNamespace(denoiser=teacher))
    run_ema = ema_hidden(state, SimpleNamespace(x0=x0, eps=eps), txt, mask)
    loss = term(LossInputs(x0, x0, t, 0, 8, plan, hidden, run_ema))

    assert loss.shape == (2,) and (loss >= -1).all() and (loss <= 1).all()
    loss.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.projector.parameters())
    for i, block in enumerate(student.blocks):
        reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()]
        assert all(reached) if i <= BLOCK else not any(reached), f"block {i}"
    # the target: the EMA's block-2 tokens on the same x₀ and noise at t − interval, all 16 of them
    seen = []
    hook = teacher.blocks[TARGET].register_forward_hook(lambda module, args, output: seen.append(output))
    teacher(flow.add_noise(x0, eps, (t - 0.1).clamp(min=0)), (t - 0.1).clamp(min=0), txt, mask)
    hook.remove()
    assert torch.equal(run_ema((t - 0.1).clamp(min=0), TARGET), seen[0]) and seen[0].shape == (2, 16, 64)


def test_the_ema_stops_after_the_target_block():
    _, teacher, _ = student_and_teacher()
    ran = []
    for i, block in enumerate(teacher.blocks):
        block.register_forward_hook(lambda module, args, output, i=i: ran.append(i))
    x, t, txt, mask = inputs()
    teacher(x, t, txt, mask, hidden_at=TARGET, stop_at_hidden=True)
    assert ran == [0, 1, 2]
    with pytest.raises(ValueError, match="stop_at_hidden needs"):
        teacher(x, t, txt, mask, stop_at_hidden=True)


def config(tmp_path, run, *overrides):
    return load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / run}", "self_align.weight=0.5",
                              "self_align.block=0", "self_align.target_block=1", "self_align.hidden=16",
                              "train.checkpoint_every=2", "train.sample_every=4", *overrides])


def test_a_run_with_it_trains_resumes_bit_exactly_and_counts_its_flops(tmp_path):
    train(config(tmp_path, "straight", "train.steps=4"))
    train(config(tmp_path, "resumed", "train.steps=2"))
    train(config(tmp_path, "resumed", "train.steps=4"), resume="auto")
    assert_resumed_as_straight(tmp_path / "straight", tmp_path / "resumed", "self_align_projector.")
    logs = [[json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert [r["self_align"] for r in logs[0]] == [r["self_align"] for r in logs[1]]
    assert all(-0.5 <= r["self_align"] <= 0.5 for r in logs[0])

    # 16 tokens (32 px in 8-px patches) of width 32 through the 32 -> 16 -> 32 projector, forward and backward
    # (3x), plus the EMA's forward without its last layer: the denoiser's forward less the final layer
    straight = config(tmp_path, "flops", "train.steps=4")
    flops = training_flops(straight, 0, 8)
    width, patch_dim = 32, 3 * 8 * 8
    projector = 3 * 2 * 16 * (width * 16 + 16 * width)
    final_layer = 2 * 16 * width * patch_dim + 2 * width * 2 * width
    forward, _ = denoiser_flops(straight.model, 32, 8)
    assert flops.terms["self_align"] == projector + forward - final_layer
    assert flops.total == flops.denoiser + flops.terms["self_align"]


def test_its_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="self_align.block must be >= 0 and below target_block"):
        config(tmp_path, "run", "self_align.target_block=0")
    with pytest.raises(ConfigError, match="self_align.target_block 2 is not a block of a depth-2 model"):
        config(tmp_path, "run", "self_align.target_block=2")
    trainer = Trainer(config(tmp_path, "run", "train.steps=1"))
    assert "self_align_projector" in trainer.state.trained and "self_align_projector" in trainer.state.ema_trained
    trainer.close()
