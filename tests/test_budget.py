import itertools
import json
from pathlib import Path

import pytest

import pixrun.plan
import pixrun.train
from pixrun.budget import AtEnd, Budget, Plan, Schedule, budget_seconds, parse_duration, stage_shares
from pixrun.checkpoint import list_checkpoints, load_state
from pixrun.config import ConfigError, StageConfig
from pixrun.optim import OptimConfig
from pixrun.train import Trainer
from tests.conftest import TINY_OVERRIDES

STEP_S, SAMPLE_S, CHECKPOINT_S, STARTUP_S = 0.1, 0.5, 0.3, 2.0
REAL_SAMPLE_GRID = pixrun.train.sample_grid


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def costing(trainer: Trainer, clock: FakeClock, monkeypatch, stop_after: int | None = None) -> None:
    """The trainer's steps, grids and checkpoints take fixed times on `clock`; `stop_after`: a stop signal then."""
    real_step, real_save = trainer.step, trainer.checkpointer.save

    def step(k):
        clock.now += STEP_S
        if stop_after is not None and k + 1 == stop_after:
            trainer.stop_requested = True
        return real_step(k)

    def save(*args, **kwargs):
        clock.now += CHECKPOINT_S
        return real_save(*args, **kwargs)

    def grid(*args, **kwargs):
        clock.now += SAMPLE_S
        return REAL_SAMPLE_GRID(*args, **kwargs)

    trainer.step, trainer.checkpointer.save = step, save
    monkeypatch.setattr(pixrun.train, "sample_grid", grid)
    clock.now += STARTUP_S


def budgeted(tiny_config, run="budget", **overrides):
    return tiny_config(run, train__budget="30s", train__steps=1000, train__sample_every=100,
                       train__checkpoint_every=40, optim__warmup_steps=5, optim__cooldown=0.2, **overrides)


def lr_by_step(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))}


def test_durations_and_money_give_seconds():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400 and parse_duration("2d") == 172800
    for bad in ("", "15", "15x", "m15", "0m", "15m junk"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    # $1,500 at $2 per GPU-hour on 32 GPUs buys 23.4 h: less than a 24 h budget
    assert budget_seconds("24h", 1500, 2.0, 32) == pytest.approx(1500 / 64 * 3600)
    assert budget_seconds("1h", 1500, 2.0, 32) == 3600
    assert budget_seconds("", 0, 0, 1) is None


def test_bad_budgets_are_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="train.budget"):
        tiny_config(train__budget="15 minutes")
    with pytest.raises(ConfigError, match="device_hour_price"):
        tiny_config(train__budget_money=100)


def test_stages_share_the_budget_by_samples_unless_told():
    assert stage_shares([100, 120], [1024, 512], [None, None]) == pytest.approx([10 / 11, 1 / 11])
    assert stage_shares([100, 120], [1024, 512], [3.0, 1.0]) == [0.75, 0.25]


def test_events_come_on_their_schedules_and_those_to_come_are_counted_with_the_final_one():
    every_40 = Schedule(40)
    assert every_40.between(10, 100, final=True) == 3  # 40, 80 and the last step
    assert every_40.between(10, 120, final=True) == 3  # 40, 80, 120 = the last
    assert every_40.between(10, 100, final=False) == 2
    assert Schedule(0).between(0, 100, final=True) == 0  # 0: never, not even at the end
    assert [done for done in range(101) if every_40.should_run(done, last=100)] == [40, 80, 100]
    assert [done for done in range(101) if Schedule(40, at_start=True).should_run(done, 100)] == [0, 40, 80, 100]
    assert not any(Schedule(0, at_start=True).should_run(done, 100) for done in range(101))


def stages(*ends: int, batch: int = 8) -> list[StageConfig]:
    return [StageConfig(end, 32 * (i + 1), batch) for i, end in enumerate(ends)]


def controller(seconds, ends, clock, shares=None, cooldown=0.2, events=None, warmup_steps=5) -> Budget:
    configured = stages(*ends)
    return Budget(seconds, configured, shares or stage_shares(ends, [8] * len(ends), [None] * len(ends)),
                  OptimConfig(cooldown=cooldown, warmup_steps=10), events or {}, warmup_steps, clock)


def test_a_plan_fits_steps_and_events_into_the_time_left():
    budget = controller(100.0, [1000], FakeClock(0.0), events={"sample": Schedule(50), "checkpoint": Schedule(0)})
    plan = budget.replan(0, 20, 10.0, 0.5, {"sample": 2.0, "checkpoint": 1.0})
    steps = plan.total - 20

    def cost(n):
        return n * 0.5 + 2.0 * Schedule(50).between(20, 20 + n, True)

    assert cost(steps) <= 90.0 < cost(steps + 1)
    assert budget.plan == Plan.of(stages(1000))  # a plan is made, never changed in place


def test_an_event_not_yet_timed_is_reserved_from_its_estimate_and_the_final_one_once():
    events = {"sample": Schedule(50, at_start=True), "evaluation": AtEnd()}
    budget = controller(100.0, [1000], FakeClock(0.0), events=events)
    budget.estimates = {"evaluation": ("sample", 24.0)}
    assert budget.event_cost("evaluation") == 0.0  # nothing timed yet
    budget.event_seconds["sample"] = 0.5
    assert budget.event_cost("evaluation") == 12.0  # 24 grids' worth
    budget.event_seconds["evaluation"] = 10.0
    assert budget.event_cost("evaluation") == 10.0  # as timed, once it is
    plan = budget.replan(0, 20, 10.0, 0.5, {"sample": 0.5, "evaluation": 12.0})
    n = plan.total - 20
    assert n * 0.5 + 0.5 * Schedule(50).between(20, plan.total, True) + 12.0 <= 90.0  # the evaluation fits
    assert AtEnd().between(20, plan.total, True) == 1 and AtEnd().between(20, plan.total - 1, False) == 0
    assert AtEnd().should_run(plan.total, plan.total) and not AtEnd().should_run(0, plan.total)


def test_the_final_evaluation_runs_inside_the_budget_and_its_scores_are_printed(tiny_config, monkeypatch, capsys):
    config = budgeted(tiny_config, eval__at_end=True)
    clock = FakeClock(1000.0)
    trainer = Trainer(config, clock=clock)
    costing(trainer, clock, monkeypatch)
    real_evaluate = pixrun.train.evaluate_pipeline
    evaluations = []

    def evaluate(*args, **kwargs):  # the evaluator generates 2 x 6 x 1 images: as much as 6 grids of 2
        evaluations.append(clock.now)
        clock.now += 6 * SAMPLE_S
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pixrun.train, "evaluate_pipeline", evaluate)
    trainer.run()
    trainer.close()
    assert len(evaluations) == 1 and clock.now - 1000.0 == pytest.approx(30.0, rel=0.02)  # reserved before it ran
    scores = json.loads((Path(config.run_dir) / "eval.json").read_text())
    assert scores["step"] == trainer.plan.total and 0 <= scores["overall"] <= 1 and scores["weights"] == "ema"
    printed = capsys.readouterr().out
    assert f"strict scores of the EMA model: overall {scores['overall']:.3f}" in printed and "samples:" in printed


def test_a_staged_plan_ends_its_stage_at_its_deadline_and_scales_the_next():
    budget = controller(100.0, [400, 480], FakeClock(0.0), shares=[0.5, 0.5])
    plan = budget.replan(0, 10, 5.0, 0.25, {})
    assert plan.ends[0] == 10 + 180  # 45 s left of stage 0's 50 s
    assert plan.ends[1] == plan.ends[0] + round(80 * 190 / 400)  # stage 1 as long, relative to the config, as 0
    assert controller(100.0, [100, 120], FakeClock(0.0), shares=[0.5, 0.5]).replan(0, 10, 5.0, 0.25, {}).ends == [
        100, 120]  # with both a budget and steps, the first limit reached ends each stage


def simulate(budget: Budget, clock: FakeClock, step_seconds, log_every=10, costs=None) -> tuple[list[float], list]:
    """Drives `budget` as the trainer does, on `clock`: step k takes step_seconds(k, stage) seconds, each event
    `costs[name]`. Returns the lr factor of every step and the plan after every logging step."""
    costs = costs or {}
    optim, factors, plans = budget.optim, [], []
    for name, schedule in budget.events.items():
        if schedule.should_run(0, budget.plan.total):
            with budget.timed(name):
                clock.now += costs[name]
    budget.begin(0)
    step = 0
    while step < budget.plan.total:
        stage, _ = budget.plan.stage_at(step)
        factors.append(budget.plan.lr_factor(step, optim))
        clock.now += step_seconds(step, stage)
        done = step + 1
        if done % log_every == 0 or done == budget.plan.total:
            plans.append(budget.update(done))
        for name, schedule in budget.events.items():
            if schedule.should_run(done, budget.plan.total):
                with budget.timed(name):
                    clock.now += costs[name]
        step = done
    return factors, plans


EVENTS = {"sample": Schedule(200, at_start=True), "checkpoint": Schedule(100)}
COSTS = {"sample": 0.5, "checkpoint": 0.3}


@pytest.mark.parametrize("slower", [0.7, 1.0, 1.6])
def test_a_two_stage_budget_ends_on_time_and_its_lr_never_rises_in_the_decay_whatever_stage_1_costs(slower):
    # stage 1 is a fifth of the steps; the decay (the last 30 %) begins inside stage 0, as in prx-speedrun.yaml
    clock = FakeClock(0.0)
    budget = controller(120.0, [16_000, 20_000], clock, cooldown=0.3, events=EVENTS)  # more than 120 s buy
    factors, plans = simulate(budget, clock, lambda k, stage: 0.05 * (slower if stage.resolution == 64 else 1.0),
                              costs=COSTS)
    assert clock.now == pytest.approx(120.0, rel=0.02)
    assert len(factors) == plans[-1].total
    peak = factors.index(max(factors))
    assert all(later <= earlier for earlier, later in itertools.pairwise(factors[peak:]))  # never rises again
    falls = [earlier - later for earlier, later in itertools.pairwise(factors[peak:])]
    assert max(falls) < 0.02  # no jump: the decay goes on from where it is
    assert factors[-1] < 0.02  # and ends at the last step


def test_a_transient_slowdown_changes_the_plan_by_less_than_5_percent():
    def run(slow_steps):
        clock = FakeClock(0.0)
        budget = controller(300.0, [100_000], clock, events=EVENTS)
        _, plans = simulate(budget, clock, lambda k, stage: 0.1 * (10 if k in slow_steps else 1), costs=COSTS)
        return plans

    steady = run(())[-1].total
    slowed = run(range(996, 1004))  # 8 steps at 10x, across a logging step
    assert 2000 < steady < 3000
    assert all(abs(plan.total - steady) < 0.05 * steady for plan in slowed[20:])
    assert abs(slowed[-1].total - steady) < 0.05 * steady


def test_without_a_budget_train_steps_is_the_run_and_with_one_the_first_limit_ends_it(tiny_config):
    config = tiny_config("steps", train__steps=7, train__checkpoint_every=100, train__sample_every=100)
    assert config.train.budget == ""
    Trainer(config).run()
    assert max(lr_by_step(config.run_dir)) == 7
    assert list_checkpoints(config.run_dir)[-1].name == "step_0000007"

    # a budget of an hour for 12 steps: the steps end the run, and the decay with it
    config = tiny_config("both", train__steps=12, train__budget="1h", train__checkpoint_every=100,
                         train__sample_every=100, optim__cooldown=0.5, optim__warmup_steps=1)
    trainer = Trainer(config, clock=FakeClock(0.0))
    trainer.run()
    trainer.close()
    lrs = lr_by_step(config.run_dir)
    assert max(lrs) == 12 and lrs[12] == pytest.approx(config.optim.lr / 6)

    # a budget that ends first: 3 s at 0.1 s a step for 1000 steps
    clock = FakeClock(0.0)
    budget = controller(3.0, [1000], clock, warmup_steps=1)
    simulate(budget, clock, lambda k, stage: 0.1, log_every=1)
    assert budget.plan.total < 40 and 3.0 - 0.1 <= clock.now <= 3.0  # within a step of the budget


def test_a_budgeted_run_ends_at_its_budget_and_its_decay_at_its_last_step(tiny_config, monkeypatch):
    config = budgeted(tiny_config)
    clock = FakeClock(1000.0)
    trainer = Trainer(config, clock=clock)
    costing(trainer, clock, monkeypatch)
    trainer.run()
    trainer.close()
    assert clock.now - 1000.0 == pytest.approx(30.0, rel=0.02)
    last = trainer.plan.total
    checkpoints = [int(p.name.removeprefix("step_")) for p in list_checkpoints(config.run_dir)]
    assert checkpoints[-1] == last and all(step % 40 == 0 for step in checkpoints[:-1])  # none at unplanned steps
    grids = [int(p.stem.removeprefix("step_")) for p in (Path(config.run_dir) / "samples").glob("step_*.png")]
    assert all(step % 100 == 0 or step == last for step in grids)
    lrs = lr_by_step(config.run_dir)
    assert max(lrs) == last
    peak = max(lrs.values())
    decay = [lrs[k] for k in range(min(k for k in lrs if k > 10 and lrs[k] < peak) - 1, last + 1)]
    assert all(a > b for a, b in itertools.pairwise(decay))  # falls at every step to the run's last
    assert lrs[last] < 0.05 * peak
    assert config.train.steps == 1000 and trainer.config.train.steps == 1000  # the plan is not written into it


def test_a_resumed_budgeted_run_keeps_its_plan_and_counts_the_time_before(tiny_config, monkeypatch):
    config = budgeted(tiny_config)
    first_clock = FakeClock(1000.0)
    first = Trainer(config, clock=first_clock)
    costing(first, first_clock, monkeypatch, stop_after=150)
    first.run()
    first.close()
    stopped = list_checkpoints(config.run_dir)[-1]
    assert stopped.name == "step_0000150"
    saved = load_state(stopped)["budget"]
    assert saved["spent"] == pytest.approx(first_clock.now - 1000.0)  # with the checkpoint's own time

    second_clock = FakeClock(50_000.0)
    second = Trainer(config, resume="latest", clock=second_clock)
    assert second.plan.ends == saved["ends"] and second.config.train.steps == 1000
    assert second.plan.lr_factor(150, config.optim) == pytest.approx(lr_by_step(config.run_dir)[150] / config.optim.lr,
                                                                     rel=0.2)  # the decay goes on where it was
    costing(second, second_clock, monkeypatch)
    second.run()
    second.close()
    used = (first_clock.now - 1000.0) + (second_clock.now - 50_000.0)
    assert used == pytest.approx(30.0, rel=0.02)
    lrs = lr_by_step(config.run_dir)
    assert max(lrs) == second.plan.total and lrs[second.plan.total] < 0.05 * config.optim.lr


STAGES = "[{until_step: 4, resolution: 16, batch_size: 8}, {until_step: 6, resolution: 32, batch_size: 4}]"


def test_plan_times_each_stage_at_its_per_device_batch(tiny_config, monkeypatch):
    timed = []

    def bench(config, steps, warmup, device, stage):
        stage_config = config.stages[stage]
        timed.append((stage_config.resolution, stage_config.batch_size))
        return {"step_ms": 250.0 * (stage + 1), "device_name": "test"}

    monkeypatch.setattr(pixrun.plan, "run_bench", bench)
    config = tiny_config(stages=STAGES, train__steps=6, data__resolution=32)
    rows = pixrun.plan.plan_stages(config, 3600.0, devices=2, price=2.0)
    assert timed == [(16, 4), (32, 2)]
    assert [r["share"] for r in rows] == pytest.approx([0.8, 0.2])  # 4 x 8 samples against 2 x 4
    assert [r["steps"] for r in rows] == [11520, 1440]  # 2880 s at 0.25 s, 720 s at 0.5 s
    assert [r["images"] for r in rows] == [11520 * 8, 1440 * 4]
    assert sum(r["cost"] for r in rows) == pytest.approx(1.0 * 2 * 2.0)  # one hour of two devices at 2


def test_plan_command_benches_and_refuses_what_cannot_split(tiny_config, capsys):
    from pixrun.cli import main

    config = tiny_config(stages=STAGES, train__steps=6, data__resolution=32)
    args = ["plan", f"run_dir={config.run_dir}", *TINY_OVERRIDES, f"stages={STAGES}", "train.steps=6"]
    assert main([*args, "--budget", "1h", "--devices", "2", "--steps", "1", "--warmup", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["resolution"] for r in printed["stages"]] == [16, 32] and all(r["steps"] > 0 for r in printed["stages"])
    assert main([*args, "--budget", "1h", "--devices", "3"]) == 2
    assert "does not split over 3 devices" in capsys.readouterr().err


def test_a_staged_budget_gives_each_stage_its_share_and_resumes_on_shards_in_a_moved_stage(
        tiny_config, tmp_path, monkeypatch):
    from pixrun.data.prepare import PrepareOptions, prepare_dataset
    from tests.helpers import image_folder

    prepare_dataset(image_folder(tmp_path / "images", 24), tmp_path / "prepared",
                    PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1))
    stages = ("[{until_step: 400, resolution: 16, batch_size: 4, budget_share: 1},"
              " {until_step: 500, resolution: 32, batch_size: 4, budget_share: 1}]")  # more than 20 s buy
    config = tiny_config(train__budget="20s", train__steps=500, stages=stages, data__resolution=32,
                         data__source="shards", data__shards=str(tmp_path / "prepared"), data__num_workers=0,
                         data__partitions=1, train__sample_every=1000, train__checkpoint_every=1000)
    resolutions = {}

    def run(clock, stop_after=None, resume=None):
        trainer = Trainer(config, resume=resume, clock=clock)
        costing(trainer, clock, monkeypatch, stop_after)
        stepping = trainer.step

        def step(k):
            resolutions[k] = (trainer.plan.stage_at(k)[0].resolution, clock.now - clock.start)
            return stepping(k)

        trainer.step = step
        trainer.run()
        trainer.close()
        return trainer

    first_clock = FakeClock(0.0)
    first_clock.start = 0.0
    first = run(first_clock, stop_after=None)
    stage_end = first.plan.ends[0]
    assert stage_end < 400  # planned, not configured
    # the first stage gets half of the 20 s: its last step starts before 10 s, the next one's first after
    assert resolutions[stage_end - 1][0] == 16 and resolutions[stage_end][0] == 32
    assert resolutions[stage_end][1] == pytest.approx(10.0, abs=3 * STEP_S)
    assert first_clock.now == pytest.approx(20.0, rel=0.02)

    resumed_dir = tmp_path / "resumed"
    config.run_dir = str(resumed_dir)
    clock_a = FakeClock(0.0)
    clock_a.start = 0.0
    run(clock_a, stop_after=stage_end + 5)  # stopped in the second stage, whose start the plan moved
    clock_b = FakeClock(100.0)
    clock_b.start = 100.0
    resumed = run(clock_b, resume="latest")
    assert resumed.plan.ends[0] == stage_end
    assert (clock_a.now - 0.0) + (clock_b.now - 100.0) == pytest.approx(20.0, rel=0.02)
