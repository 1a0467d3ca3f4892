"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

    RUN/checkpoints/step_0001000/
        weights.safetensors     trainable weights ("denoiser.*", "text_encoder.*")
        ema.safetensors         their EMA, same keys
        optimizer.safetensors   optimizer state, flattened as "state.{param index}.{name}"
        state.json              step, EMA update count, optimizer param groups

A checkpoint is written to a temporary folder and renamed into place, so a folder with a step name is complete.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"{STEP_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(weights), tmp / "weights.safetensors")
    save_file(_contiguous(ema), tmp / "ema.safetensors")
    opt_tensors, opt_groups = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer_param_groups": opt_groups}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load_tensors(path: Path, name: str, device="cpu") -> dict[str, torch.Tensor]:
    """`name` is weights, ema or optimizer."""
    return load_file(Path(path) / f"{name}.safetensors", device=str(device))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    groups = load_state(path)["optimizer_param_groups"]
    optimizer.load_state_dict(_unflatten_optimizer(load_tensors(path, "optimizer"), groups))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}
