"""A budget on a run: resolved against full fine-tuning's predicted peak, checked against the
method's smallest plan, installed on the tuner; and the largest prediction a run reports."""
from __future__ import annotations

import copy
import math

import torch

from ..plan import Plan
from ..units import Units, unwrap_peft
from .budget import DEFAULT_MARGIN, BudgetError, check_margin, fmt_bytes, parse_budget, resolve_budget, usable_budget
from .model import MemoryModel, Prediction
from .probe import build_small_like


def smallest_plan(method, units: Units) -> Plan:
    """The method's smallest admissible plan (each method knows its own; see Method.smallest_plan)."""
    return method.smallest_plan(units)


def check_budget_floor(memory_model: MemoryModel, budget_bytes: int, plan: Plan, margin: float = DEFAULT_MARGIN,
                       batch_shape=None, what: str = "the smallest plan", settings=()) -> Prediction:
    """Reject, before training, a budget below `plan` (the method's smallest, or the largest of a
    method whose plans are fixed by its options): the error names the minimum (that plan's
    predicted peak) and the budget it needs with the margin, and advises only what lowers this
    run's price (`settings`: the method's options that do)."""
    pred = memory_model.predict(plan, batch_shape)
    need = math.ceil(pred.predicted_peak_bytes / (1.0 - margin))
    if pred.predicted_peak_bytes > usable_budget(budget_bytes, margin):
        raise BudgetError(
            f"the budget of {budget_bytes} bytes ({fmt_bytes(budget_bytes)}) is below what {what} needs: it is "
            f"predicted to peak at {pred.predicted_peak_bytes} bytes ({fmt_bytes(pred.predicted_peak_bytes)}), so "
            f"with margin {margin:g} the budget must be at least {need} bytes ({fmt_bytes(need)}); "
            f"{_advice(memory_model, settings)}.",
            predicted_bytes=pred.predicted_peak_bytes, budget_bytes=budget_bytes, required_budget_bytes=need)
    return pred


def _advice(memory_model: MemoryModel, settings) -> str:
    fixes = ["raise the budget", "lower batch_size or max_length", *(f"lower {s}" for s in settings)]
    if memory_model.causal_lm and memory_model.loss == "hf":  # full fp32 logits: only an LM head has them
        fixes.append("use a chunked loss (chunked_loss=1024)")
    return ", ".join(fixes[:-1]) + ", or " + fixes[-1]


def full_finetuning_peak(memory_model: MemoryModel, batch_shape=None) -> int:
    """Predicted peak of full fine-tuning of the same model (without adapters, if it has any):
    what a fractional budget ("0.6") is a fraction of."""
    mm = memory_model
    if mm.units.granularity == "block":
        return mm.predict(Plan.of(u.name for u in mm.units), batch_shape).predicted_peak_bytes
    inner = unwrap_peft(mm.model)
    cfg = copy.deepcopy(inner.config)
    cls = type(inner)
    with torch.device("meta"):
        base = cls._from_config(cfg)
    if mm.precision == "bf16":
        base.to(torch.bfloat16)
    full = MemoryModel(base, precision=mm.precision, optimizer=mm.optimizer, device_type=mm.device_type,
                       batch_shape=mm.batch_shape, loss=mm.loss, chunk_tokens=mm.chunk_tokens,
                       grad_accum=mm.grad_accum, gradient_checkpointing=mm.gradient_checkpointing,
                       hold_logits=mm.hold_logits, build_small=build_small_like(base, mm.precision, prepare=None))
    return full.predict(Plan.of(u.name for u in full.units), batch_shape).predicted_peak_bytes


def install_budget(tuner, budget, *, batch_shape: tuple[int, int], precision: str = "fp32",
                   margin: float = DEFAULT_MARGIN, **kw) -> MemoryModel:
    """What a training loop does before its first step when a budget is set.

    Builds the memory model of the tuner's run (kw: loss, chunk_tokens, grad_accum, hold_logits,
    device_type, gradient_checkpointing, ...), resolves the budget to bytes (a fraction is of full
    fine-tuning's predicted peak), rejects a budget below the method's smallest plan (BudgetError
    naming the minimum), and calls tuner.set_budget so that every plan applied is checked. A
    method whose plans its options fix (Method.schedules_under_budget False) is also refused when
    its largest plan does not fit, so no plan is refused mid-run.
    """
    margin = check_margin(margin)
    mm = MemoryModel.from_tuner(tuner, precision=precision, batch_shape=batch_shape, **kw)
    kind, _ = parse_budget(budget)
    full = full_finetuning_peak(mm) if kind == "fraction" else None
    budget_bytes = resolve_budget(budget, full)
    method = tuner.method
    check_budget_floor(mm, budget_bytes, smallest_plan(method, tuner.units), margin,
                       what=f"{method.name}'s smallest plan", settings=method.cheaper_settings(largest=False))
    if not method.schedules_under_budget:  # fixed plans: the largest must fit now, not fail mid-run
        # alone: keep's pile-up on top of it either fits or switches to offload (set_budget), so a
        # refusal comes before that switch's warning, as the only line a refused run prints
        check_budget_floor(mm, budget_bytes, method.largest_plan(tuner.units), margin,
                           what=f"{method.name}'s largest plan with these options",
                           settings=method.cheaper_settings(largest=True))
    tuner.set_budget(mm, budget_bytes, margin)  # may switch state_policy keep to offload
    return mm


def largest_prediction(memory_model: MemoryModel, plans, price=None) -> dict:
    """Of the plans a run applied, the one with the largest predicted peak (for metrics.json:
    memory.predicted_peak_bytes and memory.predicted_counted_bytes). price(plan, kept_state), when
    given, is the engine's budget price (Tuner.predict_peak): a method's own price for a plan (such
    as AdaGradSelect's step that explores every block) replaces the memory model's peak, so the
    figure is the one each step was admitted at; the counted bytes and terms stay the model's."""
    best = None
    for item in set(plans):  # a plan, or (plan, units whose optimizer state it kept) as Tuner records them
        p, kept = item if isinstance(item, tuple) else (item, frozenset())
        pred = memory_model.predict(p, kept_state=kept)
        peak = pred.predicted_peak_bytes if price is None else price(p, kept)
        if best is None or peak > best[2]:
            best = (p, pred, peak)
    if best is None:
        return {}
    p, pred, peak = best
    return {"predicted_peak_bytes": peak, "predicted_counted_bytes": pred.predicted_counted_bytes,
            "predicted_peak_phase": pred.peak_phase if peak == pred.predicted_peak_bytes else "the method's own price",
            "predicted_terms": pred.terms,
            # the plan, less its note: equal plans carry the note of whichever step applied them
            "predicted_for_plan": {k: v for k, v in p.to_dict().items() if k != "note"}}
