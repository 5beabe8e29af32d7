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
    """Base: `attach(model, units, params)`, `reset()`, `values` (unit -> score).

    Hooks never synchronise with the device: each reading is a 0-dim float32 tensor kept in
    `parts` (unit -> tensors). `read_signals` turns every signal's parts into floats with one host
    transfer, after backward; `combine` maps a unit's summed parts to its score.
    """

    name = "signal"
    reads_gradient = False  # a score linear in the loss's gradient: divided by the loss scale (amp-fp16)
    # data parallelism (distributed.agree_signals): True when each rank's parts are its share of the
    # global batch's (summed over ranks); False when every rank already reads the global value
    additive = True
    # True: read from parameter gradients as they accumulate, so under data parallelism the gradients
    # are reduced in hooks that run before this signal's (distributed.Replicas.reduce_in_hooks)
    reads_gradients_in_backward = False

    def __init__(self):
        self._handles: list = []
        self.parts: dict[str, list[torch.Tensor]] = {}

    def attach(self, model: nn.Module, units: Units, params: dict[str, nn.Parameter]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.parts = {}

    def pending(self) -> dict[str, list[torch.Tensor]]:
        """unit -> the 0-dim device tensors whose sum is its (uncombined) score."""
        return self.parts

    def _add(self, label: str, t: torch.Tensor) -> None:
        self.parts.setdefault(label, []).append(t)

    @staticmethod
    def combine(total: float) -> float:
        return total ** 0.5  # most signals are L2 norms: parts are squared sums

    @property
    def values(self) -> dict[str, float]:
        """This signal alone (one host transfer); the engine reads all of them at once instead."""
        return read_signals([self])[0]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def squared_sum(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).sum()


def read_signals(signals) -> list[dict[str, float]]:
    """Every signal's unit -> score, from one stacked tensor and one `.tolist()` per device.

    Parts are summed on the host in float64, in the order they arrived, as the old per-hook
    `.item()` sums were: the scores are the same floats, read once per step instead of per block.
    """
    return combine_sums(signals, signal_sums(signals))


def combine_sums(signals, sums: dict[tuple[int, str], float]) -> list[dict[str, float]]:
    """(signal index, label) -> summed parts, as each signal's unit -> score."""
    out: list[dict[str, float]] = [{} for _ in signals]
    for (i, label), total in sums.items():
        out[i][label] = signals[i].combine(total)
    return out


def signal_sums(signals) -> dict[tuple[int, str], float]:
    """(signal index, label) -> the sum of its parts (float64 on the host, in arrival order)."""
    flat = [(i, label, t) for i, s in enumerate(signals) for label, ts in s.pending().items() for t in ts]
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, _, t) in enumerate(flat):
        by_device.setdefault(t.device, []).append(k)
    floats = [0.0] * len(flat)
    for ks in by_device.values():
        for k, v in zip(ks, torch.stack([flat[k][2] for k in ks]).tolist()):
            floats[k] = v
    sums: dict[tuple[int, str], float] = {}
    for (i, label, _), v in zip(flat, floats):
        sums[i, label] = sums.get((i, label), 0.0) + v
    return sums


class ActivationGradNorm(Signal):
    """L2 norm of the loss gradient at each block's output (TriMS's g^(j)); tensor hooks.

    Only blocks whose output takes part in backward report a value (updated blocks, probed
    blocks and everything between them and the loss).
    """

    name = "act_grad_norm"
    reads_gradient = True

    def attach(self, model, units, params):
        blocks = get_submodule(model, units.blocks_path)
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_hook(self._on_forward(f"block.{i}")))

    def _on_forward(self, label):
        def hook(mod, args, out):
            t = first_tensor(out)
            if t is not None and t.requires_grad:
                t.register_hook(lambda g: self._add(label, squared_sum(g)))
        return hook


class ParamGradNorm(Signal):
    """L2 norm of each unit's parameter gradient, read as it is accumulated."""

    name = "grad_norm"
    reads_gradient = True
    additive = False  # the gradient it reads is the global one already
    reads_gradients_in_backward = True

    def attach(self, model, units, params):
        self._latest: dict[str, torch.Tensor] = {}
        self._unit_of = units.unit_of_param()
        for n, p in params.items():
            if n in self._unit_of:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad(n)))

    def reset(self):
        super().reset()
        self._latest = {}

    def pending(self):
        parts: dict[str, list[torch.Tensor]] = {}
        for pname, t in self._latest.items():
            parts.setdefault(self._unit_of[pname], []).append(t)
        return parts

    def _on_grad(self, pname):
        def hook(p):
            # .grad holds the sum over micro-batches so far: replace this parameter's share, do not add
            self._latest[pname] = self.score(p)
        return hook

    @staticmethod
    def score(p):
        return squared_sum(p.grad)


class TaylorImportance(ParamGradNorm):
    """First-order Taylor importance sum |w * g| per unit."""

    name = "taylor"

    @staticmethod
    def score(p):
        return (p.detach().float() * p.grad.detach().float()).abs().sum()

    @staticmethod
    def combine(total):
        return total


class WeightMagnitude(Signal):
    """L2 norm of each unit's weights (no hooks; read at the start of each step)."""

    name = "weight_norm"
    additive = False  # every rank holds the same weights

    def attach(self, model, units, params):
        self._units, self._params = units, params

    def reset(self):
        self.parts = {u.name: [squared_sum(self._params[p]) for p in u.param_names] for u in self._units}


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
                self._add(label, squared_sum(t))
        return hook


SIGNALS = {cls.name: cls for cls in (ActivationGradNorm, ParamGradNorm, TaylorImportance, WeightMagnitude,
                                     ActivationNorm)}
