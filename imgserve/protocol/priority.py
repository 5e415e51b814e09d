"""Priority levels and the weighted fair share by which a worker takes jobs from them.

Each shard has one queue list per level (keys.py): `high`, `normal` (the shard's original queue list, so that
default traffic, the KEDA triggers and the ACL rules stay as they were) and `low`. A job names its level on the
wire (job.py, `priority`), so that releasing or reaping it returns it to its own level's list (scripts.py).

A worker chooses the level of each job it claims by smooth weighted round robin over the levels that have jobs
waiting (PRIORITY_WEIGHTS, default 8,4,1): each pick adds every such level's weight to its credit, takes the one
with the most credit and charges it the sum of those weights. While a set of levels stays non-empty, each gets
its weight's share of the picks, off by less than one pick at any moment: a flood of `high` never starves `low`
(with 8,4,1 and all three busy, low gets 1 job in 13; with only high and low, 1 in 9). A level with nothing
waiting is skipped and banks no credit, so the others take its share meanwhile (the claim is work-conserving) and
it gets no burst when jobs return to it. Strict priority (Triton's, RQ's) is the limit of very unequal weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PRIORITIES = ("high", "normal", "low")  # in this order everywhere: PRIORITY_WEIGHTS, keys, metrics
DEFAULT_PRIORITY = "normal"
DEFAULT_WEIGHTS = (8, 4, 1)


class FairShare:
    """The level-chooser of one worker's claims in one shard (smooth weighted round robin, see above)."""

    def __init__(self, weights: Sequence[int] = DEFAULT_WEIGHTS) -> None:
        if len(weights) != len(PRIORITIES) or any(w < 1 for w in weights):
            raise ValueError(f"one weight of at least 1 per level ({', '.join(PRIORITIES)}), got {list(weights)}")
        self.weights = dict(zip(PRIORITIES, weights, strict=True))
        self.credit = dict.fromkeys(PRIORITIES, 0)
        self.last = DEFAULT_PRIORITY  # the level picked last: where an idle claim blocks (worker_queue.py)

    def pick(self, waiting: Mapping[str, int]) -> str | None:
        """The level to take the next job from, among those with jobs `waiting`; None when all are empty."""
        levels = [level for level in PRIORITIES if waiting.get(level, 0) > 0]
        if not levels:
            return None
        for level in levels:
            self.credit[level] += self.weights[level]
        chosen = max(levels, key=lambda level: self.credit[level])  # ties: the higher level (PRIORITIES order)
        self.credit[chosen] -= sum(self.weights[level] for level in levels)
        self.last = chosen
        return chosen

    def plan(self, waiting: Mapping[str, int], count: int) -> list[str]:
        """The levels of the next `count` jobs (fewer when fewer wait), one pick each, `waiting` counted down."""
        left, levels = dict(waiting), []
        while len(levels) < count and (level := self.pick(left)) is not None:
            left[level] -= 1
            levels.append(level)
        return levels

    def took(self, level: str) -> None:
        """Count a job taken from `level` without a pick (the one a blocking claim waited for)."""
        self.pick({level: 1})


def parse_priority(value: object) -> str | None:
    """`value` as a level name, None when it is not one."""
    return value if isinstance(value, str) and value in PRIORITIES else None
