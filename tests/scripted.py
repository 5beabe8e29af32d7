"""A scripted method (its plans are given by the test) and a short manual training loop.

The loop is the engine's per-step contract written out, so a test can look at gradients between
the optimizer step and zero_grad.
"""
import torch

from dynatune.engine import Tuner
from dynatune.methods.base import Method, MethodConfig
from dynatune.plan import Plan


class Scripted(Method):
    """`plans`: one Plan, a list (step i uses plans[min(i, len-1)]) or a callable step -> Plan."""

    name = "scripted"

    def __init__(self, plans, granularity="block", signals=(), state_policy="keep", candidates=None, seed=0):
        super().__init__(MethodConfig(state_policy=state_policy), seed)
        self.plans = plans
        self.granularity = granularity
        self.signals = tuple(signals)
        self._candidates = candidates

    def candidates(self):
        return list(self._candidates) if self._candidates is not None else super().candidates()

    def plan(self, step):
        p = self.plans
        if callable(p):
            return p(step)
        if isinstance(p, (list, tuple)):
            return p[min(step, len(p) - 1)]
        return p


def plan(*update, probe=(), probe_params=(), exit_depth=None, detach_tied_input=False):
    return Plan.of(update, probe, probe_params, exit_depth, detach_tied_input)


def tuner(model, plans, lr=1e-3, **kw):
    layers = kw.pop("layers", None)
    return Tuner(model, Scripted(plans, **kw), lr=lr, layers=layers)


def step(t, batch, inspect=None, compute_loss=None):
    """One optimizer step through the engine's contract; `inspect(t)` runs before zero_grad.
    compute_loss(model, batch) replaces the model's own loss (a chunked loss, autocast)."""
    t.begin_step()
    loss = compute_loss(t.model, batch) if compute_loss else t.model(**batch).loss
    loss.backward()
    t.after_backward()
    t.optimizer.step()
    t.after_optimizer_step()
    if inspect is not None:
        inspect(t)
    t.optimizer.zero_grad(set_to_none=True)
    t.end_step(loss.item())
    return loss.item()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adam_state_bytes(params):
    """AdamW's state for these parameters, by hand: exp_avg + exp_avg_sq (same dtype) + a 4-byte step."""
    return sum(p.numel() * p.element_size() * 2 + 4 for p in params)


def output_requires_grad_recorder(blocks):
    """Forward hooks that record, per block index, whether its output requires grad."""
    seen = {}
    handles = []
    for i, b in enumerate(blocks):
        def hook(mod, args, out, i=i):
            t = out if isinstance(out, torch.Tensor) else out[0]
            seen.setdefault(i, []).append(t.requires_grad)
        handles.append(b.register_forward_hook(hook))
    return seen, handles
