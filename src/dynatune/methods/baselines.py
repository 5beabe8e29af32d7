"""Baselines on the engine: full, topk, bottomk, lisa, random units."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan
from .base import Method, MethodConfig, opt, register


@register
class Full(Method):
    name = "full"
    summary = "plain fine-tuning: every unit updates every step"
    default_lr = 5e-5

    def plan(self, step):
        return Plan.of(u.name for u in self.units)

    def smallest_plan(self, units):
        return Plan.of(u.name for u in units)


@dataclass
class TopKConfig(MethodConfig):
    k: int = opt(2, "number of blocks that train (the last k for topk, the first k for bottomk)")


@register
class TopK(Method):
    name = "topk"
    Config = TopKConfig
    summary = "the last k blocks + final norm + task head train; embeddings frozen"
    default_lr = 1e-4

    def candidates(self):
        return sorted(self._plan().update)

    def _plan(self, units=None, k=None):
        units = units or self.units
        n = units.n_blocks
        k = k or self.check_k(self.config.k)
        top = {u.name for u in units.of_kind("norm", "pooler")} | self.block_units(range(n - k, n))
        return Plan.of(top | self.fresh_heads(units))

    def plan(self, step):
        return self._plan()

    def smallest_plan(self, units):
        return self._plan(units, k=1)

    def cheaper_settings(self, largest):
        return (f"{self.name}.k",) if largest else ()  # the smallest plan is k=1 whatever k is


@register
class BottomK(TopK):
    name = "bottomk"
    summary = "the first k blocks + task head train (backward runs through every block)"

    def _plan(self, units=None, k=None):
        units = units or self.units
        return Plan.of(self.block_units(range(k or self.check_k(self.config.k))) | self.fresh_heads(units))


@dataclass
class LisaConfig(MethodConfig):
    k: int = opt(2, "blocks sampled uniformly at random to train in each period")
    period: int = opt(50, "steps between re-draws of the sampled blocks (LISA's K)")
    train_embedding: bool = opt(True, "embeddings always train, as LISA does")
    state_policy: str = opt("drop", "optimizer state of blocks that leave: drop (default, frees it), keep, offload")


@register
class Lisa(Method):
    name = "lisa"
    Config = LisaConfig
    summary = "k random blocks re-drawn every `period` steps, plus embeddings, final norm and head"
    default_lr = 5e-5

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        self.current: list[int] = []

    def plan(self, step):
        if step % self.config.period == 0 or not self.current:
            k = self.check_k(self.config.k)
            self.current = sorted(torch.randperm(self.units.n_blocks, generator=self.generator)[:k].tolist())
        return Plan.of(self._always(self.units) | self.block_units(self.current), note=f"blocks {self.current}")

    def _always(self, units) -> set[str]:
        """Final norm, embeddings (as LISA trains them) and a fresh head: in every plan."""
        always = {u.name for u in units.of_kind("norm", "pooler")} | self.fresh_heads(units)
        if self.config.train_embedding:
            always |= {u.name for u in units.of_kind("embedding")}
        return always

    def smallest_plan(self, units):
        return Plan.of(self._always(units) | {f"block.{units.n_blocks - 1}"})

    def largest_plan(self, units):
        """k blocks from the bottom: with trainable embeddings every draw runs backward through every
        block, and the bottom k are as large as any k (blocks share one shape)."""
        return Plan.of(self._always(units) | self.block_units(range(self.check_k(self.config.k))))

    def cheaper_settings(self, largest):
        return ("lisa.k",) if largest else ()  # the smallest plan is one block whatever k is

    def state_dict(self):
        return {**super().state_dict(), "current": list(self.current)}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.current = list(sd["current"])


@dataclass
class RandomConfig(MethodConfig):
    fraction: float = opt(0.25, "fraction of the units (at the chosen granularity) trained at each draw")
    period: int = opt(1, "steps between re-draws")
    granularity: str = opt("module", "block or module")


@register
class RandomUnits(Method):
    name = "random"
    Config = RandomConfig
    summary = ("a random fraction of units (modules by default), re-drawn every `period` steps; under a budget "
               "a draw priced above it is drawn again")
    # draws differ in price (unit sizes, how deep backward runs): under a budget each is checked
    schedules_under_budget = True
    MAX_DRAWS = 100

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        self.granularity = self.config.granularity
        self.current: list[str] = []

    def _pool(self, units) -> list[str]:
        return [u.name for u in units if u.kind in ("block", "module")]

    def _draw_size(self, pool) -> int:
        return max(1, round(self.config.fraction * len(pool)))

    def plan(self, step):
        pool = self._pool(self.units)
        if step % self.config.period == 0 or not self.current:
            self.current = self._draw_within_budget(pool)
        return Plan.of(self.with_head(self.current))

    def _draw_within_budget(self, pool) -> list[str]:
        """A uniform draw; under a budget, drawn again (same generator) while priced above it, and
        after MAX_DRAWS the cheapest draw (smallest_plan, which the budget was checked to admit)."""
        limit = self.tuner.usable_budget
        for _ in range(self.MAX_DRAWS if limit is not None else 1):
            idx = torch.randperm(len(pool), generator=self.generator)[:self._draw_size(pool)].tolist()
            draw = sorted(pool[i] for i in idx)
            if limit is None or self.tuner.predict_peak(Plan.of(self.with_head(draw))) <= limit:
                return draw
        return sorted(self.smallest_plan(self.units).update - self.fresh_heads(self.units))

    def smallest_plan(self, units):
        """The cheapest draw: the smallest units, the highest among them (backward stops soonest)."""
        pool = self._pool(units)
        size = {n: self.tuner.params_in([n]) for n in pool}
        cheapest = sorted(pool, key=lambda n: (size[n], -units[n].depth))[:self._draw_size(pool)]
        return Plan.of(set(cheapest) | self.fresh_heads(units))

    def largest_plan(self, units):
        """The largest draw: the biggest units, with one of the lowest among them so backward runs
        as deep as any draw can make it."""
        pool = self._pool(units)
        size = {n: self.tuner.params_in([n]) for n in pool}
        biggest = sorted(pool, key=lambda n: -size[n])[:self._draw_size(pool)]
        lowest = min(pool, key=lambda n: (units[n].depth, -size[n]))
        if lowest not in biggest:
            biggest[-1] = lowest
        return Plan.of(set(biggest) | self.fresh_heads(units))

    def cheaper_settings(self, largest):
        return ("random.fraction",)

    def state_dict(self):
        return {**super().state_dict(), "current": list(self.current)}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.current = list(sd["current"])
