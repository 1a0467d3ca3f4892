"""`pixrun plan CONFIG --budget 24h --devices 32`: what a budget buys, stage by stage, from a short bench of each
stage on this machine, without training.

Each stage is timed at its per-device batch (the global batch over --devices) on one device here, so the plan
assumes weak scaling: communication between devices and the run's sample grids and checkpoints are not in it (a
budgeted run measures and reserves those itself).
"""

import argparse
import copy
import json
import math

from pixrun.bench import run_bench
from pixrun.budget import budget_seconds, format_duration, stage_shares
from pixrun.config import Config, load_config
from pixrun.errors import ConfigError


def plan_stages(config: Config, seconds: float, devices: int, price: float, steps: int = 5, warmup: int = 3,
                device: str | None = None) -> list[dict]:
    """One row per stage: its share of `seconds`, measured step time, and the steps, images, hours and cost it
    gets on `devices` devices at `price` per device-hour."""
    stages = config.stage_plan()
    shares = stage_shares([s.until_step for s in stages], [s.batch_size for s in stages],
                          [s.budget_share for s in stages])
    rows = []
    for index, (stage, share) in enumerate(zip(stages, shares)):
        if stage.batch_size % devices:
            raise ConfigError(f"stage {index}'s batch of {stage.batch_size} does not split over {devices} devices")
        per_device = copy.deepcopy(config)
        if per_device.stages:
            per_device.stages[index].batch_size = stage.batch_size // devices
        else:
            per_device.train.batch_size = stage.batch_size // devices
        bench = run_bench(per_device, steps=steps, warmup=warmup, device=device, stage=index)
        step_s = bench["step_ms"] / 1000
        stage_seconds = seconds * share
        stage_steps = math.floor(stage_seconds / step_s)
        rows.append({
            "stage": index,
            "resolution": stage.resolution,
            "global_batch": stage.batch_size,
            "share": share,
            "step_s": step_s,
            "steps": stage_steps,
            "images": stage_steps * stage.batch_size,
            "hours": stage_seconds / 3600,
            "cost": stage_seconds / 3600 * devices * price,
            "device": bench["device_name"],
        })
    return rows


def format_plan(rows: list[dict], seconds: float, devices: int, price: float) -> str:
    lines = [f"budget {format_duration(seconds)} on {devices} device(s), measured on {rows[0]['device']}"
             + (f", at {price:g} per device-hour" if price else ""),
             (f"{'stage':>5} {'px':>5} {'batch':>6} {'share':>6} {'step s':>8} {'steps':>9} {'images':>12} "
              f"{'hours':>7} {'cost':>9}")]
    for r in rows:
        lines.append(f"{r['stage']:>5} {r['resolution']:>5} {r['global_batch']:>6} {r['share']:>6.1%} "
                     f"{r['step_s']:>8.3f} {r['steps']:>9} {r['images']:>12} {r['hours']:>7.2f} {r['cost']:>9.2f}")
    lines.append(f"total: {sum(r['steps'] for r in rows)} steps, {sum(r['images'] for r in rows)} images, "
                 f"{sum(r['cost'] for r in rows):.2f} (weak scaling assumed: no communication, grids or checkpoints)")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """`pixrun plan`: its arguments are pixrun.cli.add_plan_arguments'."""
    overrides = list(args.args)
    path = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    config = load_config(path, overrides)
    if args.devices < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError("--devices and --steps must be at least 1, --warmup at least 0")
    if args.money and not args.price:
        raise ConfigError("--money needs --price (the price of a device-hour)")
    try:
        seconds = budget_seconds(args.budget or config.train.budget, args.money, args.price or 1.0, args.devices)
    except ValueError as e:
        raise ConfigError(f"--budget: {e}") from None
    if seconds is None:
        raise ConfigError("give a --budget (or --money and --price), or a config with train.budget")
    rows = plan_stages(config, seconds, args.devices, args.price, args.steps, args.warmup)
    if args.json:
        print(json.dumps({"budget_s": seconds, "devices": args.devices, "price": args.price, "stages": rows}))
    else:
        print(format_plan(rows, seconds, args.devices, args.price))
    return 0
