"""Runs to a budget: a duration (and, optionally, money at a price per device-hour) instead of a step count.

A run's course is a `Plan`: where each stage ends and how the learning rate falls at the end. It is immutable;
without a budget it is the config's, and with one a `Budget` controller emits a new plan on logging steps, from
what it reads on its clock. The controller never runs anything to time it: it times the steps between logging
steps (the median of a recent window, so one slow minute neither stretches nor cuts the run) and the events
(sample grids, checkpoints, metrics) when they happen, reserving time for those still to come. It never writes
into the config; the loop, the data and the learning rate ask the plan.

Each stage gets a share of the budget, in proportion to its configured samples (steps x batch) unless
`stages[i].budget_share` says otherwise; a stage ends at its deadline or at its configured `until_step`, whichever
comes first (with both a budget and train.steps, the first limit reached ends the run), and the stages after it
are scaled alike until their turn. The learning rate never jumps and never rises inside its decay: once a step is
inside the decay, a new plan continues the decay from the factor it has reached, linearly to 0 at the new last
step. The controller's state travels in checkpoints: a resumed run keeps its plan, and the time spent before
the stop counts against the budget.
"""

import math
import re
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from pixrun.optim import OptimConfig, cooldown_steps, schedule_factor

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)")
SECONDS_PER_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
STEP_WINDOW = 9  # logging intervals whose median is the step time: a few slow ones move nothing


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "1h30m", "1.5h" or "2d"; ValueError on anything else."""
    compact = text.replace(" ", "").lower()
    parts = DURATION.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h30m or 24h")
    seconds = sum(float(number) * SECONDS_PER_UNIT[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def budget_seconds(duration: str, money: float, price: float, devices: int) -> float | None:
    """The run's budget in seconds: the duration, or what `money` buys at `price` per device-hour on `devices`
    devices, whichever ends first; None when neither is set."""
    limits = []
    if duration:
        limits.append(parse_duration(duration))
    if money > 0:
        limits.append(money / (price * devices) * 3600)
    return min(limits) if limits else None


def stage_shares(ends: Sequence[int], batches: Sequence[int], shares: Sequence[float | None]) -> list[float]:
    """Each stage's share of the budget, from the stages' configured ends and batch sizes: the configured shares,
    normalised, or else its share of the samples."""
    if all(share is not None for share in shares):
        weights = list(shares)
    else:
        starts = [0, *ends[:-1]]
        weights = [(end - start) * batch for start, end, batch in zip(starts, ends, batches)]
    total = sum(weights)
    return [weight / total for weight in weights]


@dataclass(frozen=True)
class Schedule:
    """When an event runs, counted in finished steps: every `every` steps (0: never), before the first step
    (`at_start`) and after the last (`at_end`)."""

    every: int
    at_start: bool = False
    at_end: bool = True

    def should_run(self, done: int, last: int) -> bool:
        if not self.every:
            return False
        if done == 0:
            return self.at_start
        return done % self.every == 0 or (self.at_end and done == last)

    def between(self, done: int, end: int, final: bool) -> int:
        """How many happen after step `done` up to and including step `end`; `final`: `end` is the run's last."""
        if not self.every:
            return 0
        return end // self.every - done // self.every + int(final and self.at_end and end % self.every > 0)


@dataclass(frozen=True)
class AtEnd:
    """When an event runs once, after the last step (the final evaluation)."""

    every = 0  # not periodic: the plan spreads no share of its cost over the steps

    def should_run(self, done: int, last: int) -> bool:
        return done == last

    def between(self, done: int, end: int, final: bool) -> int:
        return int(final and end > done)


@dataclass(frozen=True)
class Plan:
    """A run's course: `stages` with their planned ends (`until_step`), and the learning rate's decay. Without
    `decay_from` the schedule is optim's warm-up-stable-decay over the last step; with `(step, level)` the decay
    was re-planned inside itself: from `level` at `step`, linearly to 0 at the last step."""

    stages: tuple  # StageConfig, each ending at its planned until_step
    decay_from: tuple[int, float] | None = None

    @classmethod
    def of(cls, stages: Sequence, ends: Sequence[int] | None = None, decay_from=None) -> "Plan":
        """The plan of the configured `stages`, ending at `ends` (default: their own)."""
        ends = ends or [stage.until_step for stage in stages]
        return cls(tuple(replace(stage, until_step=end) for stage, end in zip(stages, ends, strict=True)),
                   None if decay_from is None else tuple(decay_from))

    @property
    def ends(self) -> list[int]:
        return [stage.until_step for stage in self.stages]

    @property
    def total(self) -> int:
        return self.stages[-1].until_step

    def stage_at(self, step: int) -> tuple[Any, int]:
        """The stage step `step` belongs to, and the step it starts at."""
        start = 0
        for stage in self.stages:
            if step < stage.until_step:
                return stage, start
            start = stage.until_step
        raise ValueError(f"step {step} is past the last stage")

    def decay(self, step: int, optim: OptimConfig) -> float:
        """The factor of the decay alone (1 before it) at step `step`."""
        if self.decay_from is None:
            decay = cooldown_steps(optim, self.total)
            return 1.0 if decay == 0 else min(1.0, (self.total - step) / decay)
        start, level = self.decay_from
        return level * min(1.0, (self.total - step) / max(1, self.total - start))

    def lr_factor(self, step: int, optim: OptimConfig) -> float:
        """The learning rate at step `step`, as a factor of optim.lr (and optim.muon_lr)."""
        if self.decay_from is None:
            return schedule_factor(step, optim, self.total)
        return min(1.0, (step + 1) / max(1, optim.warmup_steps)) * self.decay(step, optim)

    def in_decay(self, step: int, optim: OptimConfig) -> bool:
        return self.decay_from is not None or step > self.total - cooldown_steps(optim, self.total)


class Budget:
    """The controller of a budgeted run: on logging steps (`update`) it reads `clock` and emits a new `plan`.

    `stages` are the configured ones (their ends are the most each stage runs), `shares` their shares of
    `seconds`; `events` the schedules of what the run does besides steps, by name, each timed by `timed` when it
    happens (one not yet timed is reserved at its `estimates` entry (another event's name and a factor: the final
    evaluation is so many sample grids), or else at the cost of the dearest timed); `average` agrees a list of figures
    over the ranks (every rank then plans the same). `warmup_steps` of each stage, and after a resume, are not
    timed (compiling, allocator growth). The budget counts from `started` (a reading of `clock`; default: now)."""

    def __init__(self, seconds: float, stages: Sequence, shares: Sequence[float], optim: OptimConfig,
                 events: dict[str, Schedule], warmup_steps: int, clock: Callable[[], float],
                 average: Callable[[list[float]], list[float]] = list, started: float | None = None,
                 estimates: dict[str, tuple[str, float]] | None = None):
        self.seconds, self.shares, self.optim, self.events = seconds, list(shares), optim, events
        self.estimates = estimates or {}
        self.configured = list(stages)
        self.warmup_steps, self.clock, self.average = warmup_steps, clock, average
        self.plan = Plan.of(stages)
        self.started = clock() if started is None else started
        self.spent_before = 0.0
        self.event_seconds: dict[str, float] = {}
        self.event_began: float | None = None  # the clock when the event under way began
        self.events_total = 0.0  # seconds in events since the start: taken out of the step timings
        self.window: deque[float] = deque(maxlen=STEP_WINDOW)  # seconds per step of recent logging intervals
        self.mark: tuple[int, int, float, float] | None = None  # stage, steps done, clock, events_total
        self.first_step = 0  # of this process: the warm-up after a resume is not timed

    def elapsed(self) -> float:
        """Seconds of budget used: this process's, and the runs' before a resume."""
        return self.spent_before + self.clock() - self.started

    @contextmanager
    def timed(self, event: str):
        """Times one event as it happens: the plan reserves its cost for those still to come."""
        begun = self.event_began = self.clock()
        try:
            yield
        finally:
            seconds = self.clock() - begun
            self.event_seconds[event] = seconds
            self.events_total += seconds
            self.event_began = None

    def begin(self, step: int) -> None:
        """The loop starts at `step` (0, or a resumed run's)."""
        self.first_step = step

    def update(self, done: int) -> Plan:
        """After `done` steps, on a logging step (the device has caught up): time the steps since the last
        logging step of this stage and, once their window is not empty, plan the stage's end again."""
        stage = next(i for i, end in enumerate(self.plan.ends) if done - 1 < end)
        stage_start = self.plan.ends[stage - 1] if stage else 0
        now = self.clock()
        warm = done - max(stage_start, self.first_step) >= self.warmup_steps
        if done >= self.plan.ends[stage] or not warm:
            self.mark = None
            return self.plan
        if self.mark is None or self.mark[0] != stage:
            self.window.clear()
        else:
            _, marked, begun, events_before = self.mark
            self.window.append((now - begun - (self.events_total - events_before)) / (done - marked))
        self.mark = (stage, done, now, self.events_total)
        if not self.window:
            return self.plan
        elapsed, step_seconds, *costs = self.average(
            [self.elapsed(), statistics.median(self.window), *(self.event_cost(name) for name in self.events)])
        self.plan = self.replan(stage, done, elapsed, step_seconds, dict(zip(self.events, costs)))
        return self.plan

    def event_cost(self, name: str) -> float:
        """Seconds one `name` event takes: as timed, or else estimated from another's time, or else the dearest
        timed event's."""
        if name in self.event_seconds:
            return self.event_seconds[name]
        basis, factor = self.estimates.get(name, ("", 0.0))
        if basis in self.event_seconds:
            return factor * self.event_seconds[basis]
        return max(self.event_seconds.values(), default=0.0)

    def replan(self, stage: int, done: int, elapsed: float, step_seconds: float, costs: dict[str, float]) -> Plan:
        """The plan that ends stage `stage` at its deadline (or its configured end), after `done` steps and
        `elapsed` seconds, at `step_seconds` a step with `costs` per event; the stages after it scaled alike."""
        last = stage == len(self.configured) - 1
        left = self.seconds * sum(self.shares[: stage + 1]) - elapsed

        def cost(steps: int) -> float:
            events = sum(costs[name] * schedule.between(done, done + steps, last)
                         for name, schedule in self.events.items())
            return steps * step_seconds + events

        configured = [s.until_step for s in self.configured]
        limit = configured[stage] - done  # with train.steps too, the first limit reached ends the stage
        # the events' cost spread over the steps gives a start within a few steps of the most that fit
        per_step = step_seconds + sum(costs[name] / s.every for name, s in self.events.items() if s.every)
        steps = limit if per_step <= 0 else min(limit, max(0, math.floor(left / per_step)))
        while steps > 0 and cost(steps) > left:
            steps -= 1
        while steps < limit and cost(steps + 1) <= left:
            steps += 1
        ends = list(self.plan.ends)
        stage_start = ends[stage - 1] if stage else 0
        ends[stage] = max(done, stage_start + 1, done + steps)
        configured_start = configured[stage - 1] if stage else 0
        scale = (ends[stage] - stage_start) / (configured[stage] - configured_start)
        for later in range(stage + 1, len(ends)):
            length = configured[later] - configured[later - 1]
            ends[later] = min(configured[later], ends[later - 1] + max(1, round(length * scale)))
        planned = Plan.of(self.configured, ends)
        if self.plan.in_decay(done, self.optim) or planned.in_decay(done, self.optim):
            # inside the decay: continue it from where it is, so the learning rate neither jumps nor rises
            planned = Plan.of(self.configured, ends, (done, self.plan.decay(done, self.optim)))
        return planned

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the plan, the event costs, and the seconds used, counting the checkpoint
        that asks (under way) as long as the last one took."""
        now = self.clock() if self.event_began is None else self.event_began
        spent = self.spent_before + now - self.started + self.event_seconds.get("checkpoint", 0.0)
        return {"ends": self.plan.ends, "decay_from": self.plan.decay_from, "spent": spent,
                "event_seconds": dict(self.event_seconds)}

    def load_state_dict(self, state: dict) -> None:
        self.plan = Plan.of(self.configured, state["ends"], state["decay_from"])
        self.spent_before = state["spent"]
        self.event_seconds = dict(state["event_seconds"])
