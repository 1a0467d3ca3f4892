"""Activation checkpointing and torch.compile are applied from outside and change no numbers."""

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_tensors
from pixrun.train import train

STEPS = {"train__steps": 3, "train__checkpoint_every": 3, "train__sample_every": 100, "train__precision": "fp32"}


def final_weights(config):
    train(config)
    return load_tensors(list_checkpoints(config.run_dir)[-1], "weights")


def test_activation_checkpointing_trains_the_same_weights(tiny_config):
    plain = final_weights(tiny_config("plain", **STEPS))
    checkpointed = final_weights(tiny_config("ac", parallel__activation_checkpointing="true", **STEPS))
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


@pytest.mark.slow
def test_compiled_blocks_train_the_same_weights(tiny_config):
    plain = final_weights(tiny_config("plain", **STEPS))
    compiled = final_weights(tiny_config("compiled", parallel__compile="true", **STEPS))
    for key in plain:
        torch.testing.assert_close(plain[key], compiled[key], atol=1e-5, rtol=1e-4)
