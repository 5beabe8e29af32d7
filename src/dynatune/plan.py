"""Plans: what the next step does with each unit.

A plan has three parts (see docs/architecture.md):
- `update`: units whose parameters get a gradient and an optimizer step;
- `probe`: units whose *output* gradient is read for a signal; their parameters stay frozen,
  so backward reaches their output but does not go through their weights (TriMS reads the
  gradient at block l-1's output this way);
- `probe_params`: units whose parameters receive a gradient so a signal can read it, without
  an update (AdaGradSelect's exploration); their gradients are freed before the optimizer step
  unless the method promotes them;
- `exit_depth`: the forward stops after block `exit_depth - 1`; the final norm and the task head
  run on that output (None = every block runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DynatuneError
from .units import Units


@dataclass(frozen=True)
class Plan:
    update: frozenset[str]
    probe: frozenset[str] = frozenset()
    probe_params: frozenset[str] = frozenset()
    exit_depth: int | None = None
    # Tied embeddings: train the output (head) side only; the input side's use is detached so
    # backward does not run through every block to reach the embedding lookup.
    detach_tied_input: bool = False
    note: str = field(default="", compare=False)  # why the method chose it (logged)

    @staticmethod
    def of(update, probe=(), probe_params=(), exit_depth=None, detach_tied_input=False, note="") -> "Plan":
        return Plan(frozenset(update), frozenset(probe), frozenset(probe_params), exit_depth,
                    detach_tied_input, note)

    def validate(self, units: Units) -> None:
        for name in self.update | self.probe | self.probe_params:
            units[name]  # raises with the list of valid names
        if self.exit_depth is not None:
            if not 1 <= self.exit_depth <= units.n_blocks:
                raise DynatuneError(f"exit depth {self.exit_depth} is outside 1..{units.n_blocks}.")
            for name in self.update | self.probe | self.probe_params:
                u = units[name]
                if self.exit_depth <= u.depth < units.n_blocks:
                    raise DynatuneError(f"unit {name} is at depth {u.depth}, past the exit depth "
                                        f"{self.exit_depth}: an exited block cannot train.")

    def lowest_depth(self, units: Units) -> int | None:
        """Depth of the lowest unit that backward must reach (None: nothing needs a gradient)."""
        depths = [units[n].depth for n in self.update | self.probe | self.probe_params]
        return min(depths) if depths else None

    def to_dict(self) -> dict:
        return {"update": sorted(self.update), "probe": sorted(self.probe),
                "probe_params": sorted(self.probe_params), "exit_depth": self.exit_depth,
                "detach_tied_input": self.detach_tied_input, "note": self.note}

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        return Plan.of(d["update"], d.get("probe", ()), d.get("probe_params", ()), d.get("exit_depth"),
                       d.get("detach_tied_input", False), d.get("note", ""))
