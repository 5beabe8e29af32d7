"""Signals: importance estimates read from training, one small class each.

Every signal gives one score per unit (a dict unit name -> float) for the step that just ran.
They attach hooks to the model once and are reset by the engine at the start of each step.
Gradient-based signals use post-accumulate-grad hooks, so the full gradient never has to be kept
to read its norm.
"""
from __future__ import annotations

import torch
from torch import nn

from .units import Units, get_submodule


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


class Signal:
    """Base: `attach(model, units, params)`, `reset()`, `values` (unit -> score)."""

    name = "signal"

    def __init__(self):
        self._handles: list = []
        self.values: dict[str, float] = {}

    def attach(self, model: nn.Module, units: Units, params: dict[str, nn.Parameter]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.values = {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ActivationGradNorm(Signal):
    """L2 norm of the loss gradient at each block's output (TriMS's g^(j)); tensor hooks.

    Only blocks whose output takes part in backward report a value (updated blocks, probed
    blocks and everything between them and the loss).
    """

    name = "act_grad_norm"

    def attach(self, model, units, params):
        blocks = get_submodule(model, units.blocks_path)
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_hook(self._on_forward(f"block.{i}")))

    def _on_forward(self, label):
        def hook(mod, args, out):
            t = first_tensor(out)
            if t is not None and t.requires_grad:
                t.register_hook(lambda g: self._add(label, g))
        return hook

    def _add(self, label, g):
        sq = g.detach().float().pow(2).sum().item()
        self.values[label] = (self.values.get(label, 0.0) ** 2 + sq) ** 0.5


class ParamGradNorm(Signal):
    """L2 norm of each unit's parameter gradient, read as it is accumulated."""

    name = "grad_norm"

    def attach(self, model, units, params):
        self._sq: dict[str, float] = {}
        self._unit_sum: dict[str, float] = {}
        self._unit_of = units.unit_of_param()
        for n, p in params.items():
            if n in self._unit_of:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad(n)))

    def reset(self):
        super().reset()
        self._sq = {}
        self._unit_sum = {}

    def _on_grad(self, pname):
        def hook(p):
            # .grad holds the sum over micro-batches so far: replace this parameter's share, do not add
            new = self.score(p)
            unit = self._unit_of[pname]
            total = self._unit_sum.get(unit, 0.0) + new - self._sq.get(pname, 0.0)
            self._sq[pname], self._unit_sum[unit] = new, total
            self.values[unit] = self.combine(total)
        return hook

    @staticmethod
    def score(p):
        return p.grad.detach().float().pow(2).sum().item()

    @staticmethod
    def combine(total):
        return total ** 0.5


class TaylorImportance(ParamGradNorm):
    """First-order Taylor importance sum |w * g| per unit."""

    name = "taylor"

    @staticmethod
    def score(p):
        return (p.detach().float() * p.grad.detach().float()).abs().sum().item()

    @staticmethod
    def combine(total):
        return total


class WeightMagnitude(Signal):
    """L2 norm of each unit's weights (no hooks; read on demand)."""

    name = "weight_norm"

    def attach(self, model, units, params):
        self._units, self._params = units, params

    def reset(self):
        self.values = {u.name: sum(self._params[p].detach().float().pow(2).sum().item()
                                   for p in u.param_names) ** 0.5 for u in self._units}


class ActivationNorm(Signal):
    """L2 norm of each module-or-block unit's forward output (DynaLoRA's forward importance)."""

    name = "act_norm"

    def attach(self, model, units, params):
        blocks_path = units.blocks_path
        for u in units:
            if u.kind == "block":
                mod = get_submodule(model, f"{blocks_path}.{u.depth}")
            elif u.kind in ("module", "adapter"):
                mod = get_submodule(model, f"{blocks_path}.{u.name[len('block.'):]}")
            else:
                continue
            if mod is not None:
                self._handles.append(mod.register_forward_hook(self._on_forward(u.name)))

    def _on_forward(self, label):
        def hook(mod, args, out):
            t = first_tensor(out)
            if t is not None:
                sq = t.detach().float().pow(2).sum().item()
                self.values[label] = (self.values.get(label, 0.0) ** 2 + sq) ** 0.5
        return hook


SIGNALS = {cls.name: cls for cls in (ActivationGradNorm, ParamGradNorm, TaylorImportance, WeightMagnitude,
                                     ActivationNorm)}
