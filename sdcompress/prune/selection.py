"""Which transformer blocks a student keeps.

Two decisions: how deep each attention stack becomes (fixed by a preset or
`--depths`, or found greedily for `--drop-transformer-blocks N`), and which
teacher blocks of a stack survive. Methods:

- `importance`: blocks carry a score (how much the teacher's prediction
  changes when that block alone is skipped); a stack keeps its highest-scoring
  blocks, and `N` removals go greedily to the cheapest blocks anywhere.
- `uniform`: removals go to the deepest stacks first; a stack keeps blocks
  evenly spaced over its depth (first and last included).
- `last`: removals go to the deepest stacks first; a stack keeps its first blocks.

Every greedy step leaves a layout diffusers can build: a stack keeps at least
one block unless its whole level loses attention at once, and the mid block's
depth moves together with the first attention of the deepest down level
(diffusers ties them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sdcompress.arch.families import Config
from sdcompress.errors import SdcError
from sdcompress.prune.surgery import MID_STACK, Skeleton, Stack, expressible

METHODS = ("importance", "uniform", "last")

Scores = dict[str, float]  # teacher block path ("down_blocks.2.attentions.0.transformer_blocks.3") -> score


def block_path(stack_path: str, index: int) -> str:
    return f"{stack_path}.transformer_blocks.{index}"


def ranked(stack: Stack, scores: Scores) -> list[int]:
    """Teacher block indices of a stack, most important first (ties: earlier block first)."""
    return sorted(range(stack.teacher_depth), key=lambda j: (-scores[block_path(stack.teacher, j)], j))


def kept_blocks(stack: Stack, depth: int, method: str, scores: Scores | None) -> tuple[int, ...]:
    """The teacher block indices a student stack of `depth` keeps, in their original order."""
    t = stack.teacher_depth
    if depth >= t:
        return tuple(range(t))
    if depth <= 0:
        return ()
    if method == "importance":
        if scores is None:
            raise ValueError("importance selection needs scores")
        return tuple(sorted(ranked(stack, scores)[:depth]))
    if method == "last":
        return tuple(range(depth))
    if method == "uniform":
        if depth == 1:
            return (0,)
        return tuple(sorted({round(i * (t - 1) / (depth - 1)) for i in range(depth)}))
    raise SdcError(f"--select must be one of {', '.join(METHODS)}, not {method!r}.")


@dataclass(frozen=True)
class Move:
    stacks: tuple[str, ...]  # student stacks that each lose one block
    cost: float
    order: int


def _moves(skeleton: Skeleton, depths: Mapping[str, int], cost: Callable[[Stack, int], float]) -> list[Move]:
    stacks = skeleton.stacks()
    moves: list[Move] = []
    for pos, s in enumerate(stacks):
        if depths[s.student] >= 2:
            moves.append(Move((s.student,), cost(s, depths[s.student]), pos))
    groups: dict[str, list[Stack]] = {}
    for s in stacks:
        groups.setdefault(s.group, []).append(s)
    for name, members in groups.items():  # a whole level loses its attention
        if name != "mid" and all(depths[m.student] == 1 for m in members):
            c = sum(cost(m, 1) for m in members) / len(members)
            moves.append(Move(tuple(m.student for m in members), c, stacks.index(members[0])))
    if MID_STACK in depths and depths[MID_STACK] >= 2:  # diffusers ties these two depths
        deepest = f"down_blocks.{skeleton.levels - 1}.attentions.0"
        if depths.get(deepest, 0) >= 2:
            mid = next(s for s in stacks if s.student == MID_STACK)
            first = next(s for s in stacks if s.student == deepest)
            c = (cost(mid, depths[MID_STACK]) + cost(first, depths[deepest])) / 2
            moves.append(Move((deepest, MID_STACK), c, stacks.index(first)))
    return moves


def reachable(skeleton: Skeleton, depths: Mapping[str, int], count: int) -> bool:
    """Whether exactly `count` more blocks can still go (so a greedy step never walks into a dead end).

    Counts only: single removals (any number up to their capacity), the mid/deepest pair (two at a
    time) and whole levels (their size) -- a close, cheap stand-in for searching every sequence.
    """
    if count == 0:
        return True
    stacks = [s for s in skeleton.stacks() if depths[s.student] > 0]
    deepest = f"down_blocks.{skeleton.levels - 1}.attentions.0"
    tied = {MID_STACK, deepest} if depths.get(MID_STACK, 0) > 0 and depths.get(deepest, 0) > 0 else set()
    singles = sum(depths[s.student] - 1 for s in stacks if s.student not in tied)
    pairs = min(depths[t] for t in tied) - 1 if tied else 0
    groups: dict[str, int] = {}
    for s in stacks:
        if s.group != "mid":
            groups[s.group] = groups.get(s.group, 0) + 1
    sums = {0}
    for size in groups.values():
        sums |= {x + size for x in sums}
    return any(0 <= count - 2 * p - lv <= singles for p in range(pairs + 1) for lv in sums)


def greedy_drop(
    teacher_cfg: Config,
    skeleton: Skeleton,
    depths: Mapping[str, int],
    n: int,
    cost: Callable[[Stack, int], float],
) -> dict[str, int]:
    """Remove `n` more blocks, one cheapest valid move at a time; depths per student stack after it."""
    current = dict(depths)
    left = n
    while left > 0:
        best: tuple[float, int, dict[str, int]] | None = None
        for move in _moves(skeleton, current, cost):
            if len(move.stacks) > left:
                continue
            trial = dict(current)
            for s in move.stacks:
                trial[s] -= 1
            if (
                (best is None or (move.cost, move.order) < best[:2])
                and reachable(skeleton, trial, left - len(move.stacks))
                and expressible(teacher_cfg, skeleton, trial)
            ):
                best = (move.cost, move.order, trial)
        if best is None:
            raise SdcError(
                f"cannot remove {n} transformer blocks from this student: at most "
                f"{max_droppable(teacher_cfg, skeleton, depths)} can go while every attention stack keeps at least "
                "one block in a layout diffusers can build; choose a smaller number."
            )
        removed = sum(current[k] - best[2][k] for k in current)
        current = best[2]
        left -= removed
    return current


def positional_cost(stack: Stack, depth: int) -> float:
    """uniform / last: take from the deepest stacks first (earlier stacks first among equals)."""
    return -float(depth)


def importance_cost(scores: Scores) -> Callable[[Stack, int], float]:
    """The score of the weakest block the stack still keeps at this depth."""

    def cost(stack: Stack, depth: int) -> float:
        return scores[block_path(stack.teacher, ranked(stack, scores)[depth - 1])]

    return cost


def max_droppable(teacher_cfg: Config, skeleton: Skeleton, depths: Mapping[str, int]) -> int:
    """How many more blocks the greedy can remove (the bound quoted in errors)."""
    current = dict(depths)
    count = 0
    while True:
        options = []
        for move in _moves(skeleton, current, positional_cost):
            trial = dict(current)
            for s in move.stacks:
                trial[s] -= 1
            if expressible(teacher_cfg, skeleton, trial):
                options.append((len(move.stacks), trial))
        if not options:
            return count
        size, current = min(options, key=lambda o: o[0])
        count += size
