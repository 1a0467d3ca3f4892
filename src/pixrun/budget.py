"""Runs planned to a budget: a duration (and, optionally, money at a price per device-hour) instead of a step count.

The trainer times its steps after a warm-up, averaged over ranks, and plans how many steps fit so that the run,
with its sample grids, checkpoints and evaluations, ends at the budget. It re-plans on logging steps until the
learning rate's decay begins, so the decay ends exactly at the last step. A staged run gives each stage a share of
the budget, in proportion to its configured samples (steps x batch) unless `stages[i].budget_share` says otherwise;
a stage's end is planned while it runs, and the stages after it are scaled alike until their turn. The plan
travels in checkpoints: a resumed run keeps it, and the time spent before the stop counts against the budget.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pixrun.optim import OptimConfig, cooldown_steps

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)")
SECONDS_PER_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
EVENTS = ("sample", "checkpoint", "metrics")  # what a run does besides steps, each timed when it happens


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


@dataclass
class Periodic:
    """Events every `every` steps (0: never) and after the last step, costing `seconds` each."""

    every: int
    seconds: float
    at_end: bool = True

    def between(self, done: int, end: int, final: bool) -> int:
        """How many happen after step `done` up to and including step `end` (counted in finished steps)."""
        count = (end // self.every - done // self.every) if self.every else 0
        if final and self.at_end and (not self.every or end % self.every):
            count += 1
        return count


@dataclass
class BudgetPlan:
    """The plan of a budgeted run. `ends[i]` is where stage i ends (planned for the stages run so far, scaled from
    the config for the rest); `spent` is the seconds the run had used when last saved."""

    seconds: float
    shares: list[float]
    ends: list[int]
    configured_ends: list[int]
    spent: float = 0.0
    frozen: bool = False  # the decay has begun: the last step stays where it is
    step_seconds: float = 0.0
    event_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def deadline(self, stage: int) -> float:
        """Seconds into the run at which stage `stage` should end."""
        return self.seconds * sum(self.shares[: stage + 1])

    def replan(self, stage: int, done: int, elapsed: float, step_seconds: float, events: dict[str, Periodic],
               optim: OptimConfig) -> None:
        """Plan the end of stage `stage` after `done` finished steps, `elapsed` seconds into the run, at
        `step_seconds` a step, with `events` still to come; the stages after it are scaled alike. Nothing moves
        once the last stage's decay has begun."""
        if self.frozen:
            return
        self.step_seconds = step_seconds
        last = stage == len(self.ends) - 1
        left = self.deadline(stage) - elapsed
        def cost(steps: int) -> float:
            return steps * step_seconds + self._event_cost(events, done, done + steps, last)

        # the events' cost spread over the steps gives a start within a few steps of the most that fit
        per_step = step_seconds + sum(event.seconds / event.every for event in events.values() if event.every)
        steps = max(1, math.floor(left / per_step))
        while steps > 1 and cost(steps) > left:
            steps -= 1
        while cost(steps + 1) <= left:
            steps += 1
        stage_start = self.ends[stage - 1] if stage else 0
        self.ends[stage] = max(done + steps, stage_start + 1)
        scale = (self.ends[stage] - stage_start) / (self.configured_ends[stage] - self.configured_start(stage))
        for later in range(stage + 1, len(self.ends)):
            length = self.configured_ends[later] - self.configured_start(later)
            self.ends[later] = self.ends[later - 1] + max(1, round(length * scale))
        if last and done >= self.total_steps - cooldown_steps(optim, self.total_steps):
            self.frozen = True

    def configured_start(self, stage: int) -> int:
        return self.configured_ends[stage - 1] if stage else 0

    def _event_cost(self, events: dict[str, Periodic], done: int, end: int, final: bool) -> float:
        return sum(event.seconds * event.between(done, end, final) for event in events.values())

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "BudgetPlan":
        return cls(**state)

    @classmethod
    def start(cls, seconds: float, stage_ends: Sequence[int], batches: Sequence[int],
              shares: Sequence[float | None]) -> "BudgetPlan":
        """A new plan from the configured stages (their ends and batch sizes)."""
        return cls(seconds, stage_shares(stage_ends, batches, shares), list(stage_ends), list(stage_ends))
