"""The calibration phase: what a method may see of the training data before its modules go in.

A method that chooses its structure from data (SPSFT's Taylor importance) asks for
`calibration_examples()` examples; before the tuner exists (so before `prepare_model`), the loop
draws them from the training split, and the method runs its own forwards and backwards on them in
`calibrate(model, calibration)`. What this phase guarantees:

- the run is not disturbed: the examples are drawn with their own generator (the training order
  is a function of seed and epoch alone, loop.epoch_order), and the global RNG (dropout) is forked
  around the phase, so a run with a calibration phase trains exactly as it would without one;
- the model comes back in train mode with no gradient and every requires_grad as it was;
- under a budget the phase is priced before it runs: the method names the parameters whose
  gradients it holds at once (`calibration_gradients`), and the phase takes the largest
  micro-batch (the run's, halved) whose price fits; none fitting is one DynatuneError.

A phase is priced as backward through every block (every block's inputs saved, an upper bound of
what a partial backward saves) at the micro-batch, plus the named gradients, without optimizer
state (nothing steps): `price(names, micro)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import BudgetError
from .plan import Plan


@dataclass
class Calibration:
    """What `Method.calibrate` is handed.

    examples: the drawn training examples (dicts as the task yields them, labels included).
    micro_batch: examples per forward (the run's micro-batch, smaller if the budget asks).
    loss(model, examples): collate, move to the device, run under the run's autocast, return the loss.
    budget_bytes / usable: the run's budget in bytes and what a plan may be priced at (None: no budget).
    price(names, micro) -> bytes, memory_model(model) -> MemoryModel of the run for `model` (both
    only under a budget).
    """

    examples: list
    micro_batch: int
    loss: Callable
    device: torch.device
    has_budget: bool = False
    # under a budget: () -> (budget bytes, usable bytes), resolved on first use (a fraction of full
    # fine-tuning needs a probe: a method that never asks pays nothing)
    resolve: Callable | None = None
    price: Callable | None = None
    memory_model: Callable | None = None
    _resolved: tuple | None = field(default=None, repr=False)

    def _budget(self) -> tuple:
        if self._resolved is None:
            self._resolved = self.resolve() if self.has_budget else (None, None)
        return self._resolved

    @property
    def budget_bytes(self) -> int | None:
        return self._budget()[0]

    @property
    def usable(self) -> int | None:
        return self._budget()[1]

    def batches(self, examples=None) -> list[list]:
        ex = self.examples if examples is None else examples
        return [ex[i:i + self.micro_batch] for i in range(0, len(ex), self.micro_batch)]

    def label_of(self, example) -> int | None:
        """The example's class, or None when its labels are not one class (a causal LM's tokens)."""
        y = example.get("labels")
        if isinstance(y, torch.Tensor):
            return int(y.item()) if y.numel() == 1 and not y.is_floating_point() else None
        return y if isinstance(y, int) else None


def draw(n_examples: int, want: int, seed: int) -> list[int]:
    """Indices of the calibration examples: their own generator, never the run's order or RNG."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919)
    return torch.randperm(n_examples, generator=g)[:min(want, n_examples)].tolist()


def block_price(mm, names_bytes: int, micro: int, seq: int) -> int:
    """Backward through every block at (micro, seq), the given gradient bytes, no optimizer state."""
    plan = Plan.of(u.name for u in mm.units if u.kind == "block")
    pred = mm.predict(plan, (micro, seq))
    return int(pred.predicted_peak_bytes - pred.terms["optimizer"] - pred.terms["gradients"] + names_bytes)


def fit_micro_batch(price: Callable[[int], int], usable: int, start: int, what: str) -> int:
    """The largest micro-batch (start, halved) whose price fits `usable`; one sentence if none does."""
    micro = max(1, start)
    while True:
        p = price(micro)
        if p <= usable:
            return micro
        if micro == 1:
            raise BudgetError(f"{what} is predicted at {p} bytes even with micro-batches of one example, above the "
                              f"budget's usable {usable} bytes; raise the budget, lower max_length, or make the "
                              "calibration hold fewer gradients at once (spsft.layerwise or spsft.streaming).",
                              predicted_bytes=p)
        micro = (micro + 1) // 2


def restore(model, requires_grad: dict) -> None:
    """The model as it was before calibration: requires_grad as recorded, no gradients, train mode."""
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad[n])
        p.grad = None
    model.train()
