"""Budgets: the accepted forms, plans refused above budget x (1 - margin), the floor named."""
import pytest
import torch

from dynatune.errors import DynatuneError
from dynatune.memory import (BudgetError, MemoryModel, check_budget_floor, parse_budget, resolve_budget, smallest_plan,
                             usable_budget)
from dynatune.methods import build_method
from dynatune.methods.baselines import TopK, TopKConfig
from dynatune.plan import Plan

from scripted import plan, step, tuner
from tiny import causal_lm, collate, config, lm_examples

SHAPE = (4, 32)


def lm_cfg():
    c = config("llama")
    c.pad_token_id = 0
    return c


@pytest.fixture(scope="module")
def mm():
    return MemoryModel.from_config(lm_cfg(), device_type="cpu", batch_shape=SHAPE)


@pytest.mark.parametrize("value,expected", [
    ("12GiB", 12 * 2**30), ("500MB", 500 * 10**6), ("1.5GB", 1_500_000_000), ("1.5e9B", 1_500_000_000),
    ("64KiB", 65536), ("2TiB", 2 * 2**40), ("100B", 100), ("+3MiB", 3 * 2**20),
])
def test_byte_budgets(value, expected):
    assert resolve_budget(value) == expected


def test_fraction_budgets():
    assert resolve_budget(0.6, full_peak_bytes=1000) == 600
    assert resolve_budget("0.25", full_peak_bytes=1000) == 250
    assert resolve_budget(1, full_peak_bytes=1000) == 1000
    with pytest.raises(DynatuneError, match="needs the memory model's prediction"):
        resolve_budget(0.6)


@pytest.mark.parametrize("value,why", [
    ("12 GB", "space"), (" 12GB", "space"), ("-1", "negative"), (-1, "positive"), ("200%", "percentage in"),
    ("0%", "percentage in"), ("60%%", "percent sign"), ("1.5", "above 1"), (1.5, "above 1"), ("12G", "unknown unit"), ("12gib", "unknown unit"),
    ("twelve", "not understood"), ("0", "positive"), (0, "positive"), ("", "not understood"), (None, "not a budget"),
])
def test_bad_budgets_say_why_and_the_accepted_forms(value, why):
    with pytest.raises(DynatuneError) as err:
        resolve_budget(value, full_peak_bytes=1000)
    msg = str(err.value)
    assert why in msg
    assert "12GiB" in msg and "(0, 1]" in msg          # the accepted forms, in the same sentence
    assert msg.replace("e.g. ", "").count(". ") == 0 and msg.endswith(".")  # one sentence


def test_config_checks_the_budget_form():
    from dynatune.config import load_config
    assert load_config(None, ["budget=12GiB"]).margin == 0.03
    assert load_config(None, ["budget=0.6", "margin=0.1"]).budget == "0.6"
    for bad in ("budget=200%", "budget=-1", "budget=1.5", "budget=12 GB"):
        with pytest.raises(DynatuneError, match="budget"):
            load_config(None, [bad])
    with pytest.raises(DynatuneError, match="margin"):
        load_config(None, ["budget=1GiB", "margin=1.5"])
    assert parse_budget("12GiB") == ("bytes", 12 * 2**30)


def test_tuner_refuses_the_larger_plan_and_applies_the_smaller(mm):
    small, large = plan("block.3", "norm"), plan("block.1", "block.2", "block.3", "norm")
    ps, pl = mm.predict(small).predicted_peak_bytes, mm.predict(large).predicted_peak_bytes
    assert ps < pl
    margin = 0.03
    budget = int((ps + pl) / 2 / (1 - margin))  # between the two, after the margin
    t = tuner(causal_lm("llama"), [large])
    t.set_budget(mm, budget, margin)
    with pytest.raises(BudgetError, match="above the budget") as err:
        t.begin_step()
    assert err.value.predicted_bytes == pl
    assert t.plan is None  # nothing was applied
    t.method.plans = [small]
    step(t, collate(lm_examples(SHAPE[0], seq=SHAPE[1])))
    assert t.plan == small
    # the margin counts: a budget the plan fits only without the margin is refused
    t.set_budget(mm, ps + 1, margin)
    with pytest.raises(BudgetError):
        t.apply(small)
    t.set_budget(mm, ps, 0.0)
    t.apply(small)


class BudgetTopK(TopK):
    """topk that picks the largest k whose plan the budget admits (the pattern a budget-aware method follows)."""

    name = "budget_topk"

    def _plan_k(self, k):
        n = self.units.n_blocks
        return Plan.of(self.with_head({u.name for u in self.units.of_kind("norm")} | self.block_units(range(n - k, n))))

    def candidates(self):
        return sorted(self._plan_k(self.units.n_blocks).update)

    def plan(self, step):
        t = self.tuner
        plans = [self._plan_k(k) for k in range(1, self.units.n_blocks + 1)]
        best = t.memory_model.largest_fitting(plans, t.budget_bytes, t.budget_margin)
        if best is None:
            raise BudgetError("even top1 does not fit")
        return best


def test_budget_aware_topk_picks_the_largest_k_that_fits(mm):
    preds = {k: mm.predict(plan(*[f"block.{i}" for i in range(4 - k, 4)], "norm")).predicted_peak_bytes
             for k in range(1, 5)}
    assert preds[1] < preds[2] < preds[3] < preds[4]
    budget = int((preds[2] + preds[3]) / 2 / 0.97)
    t = tuner(causal_lm("llama"), [])
    t.method = BudgetTopK(TopKConfig())
    t.method.setup(t)
    t.set_budget(mm, budget, 0.03)
    step(t, collate(lm_examples(SHAPE[0], seq=SHAPE[1])))
    assert t.plan.update == {"block.2", "block.3", "norm"}  # k=2: k=3 is over the budget
    assert t.peak.counted > 0


def test_a_budget_below_the_smallest_plan_is_rejected_naming_the_minimum(mm):
    method = build_method("topk", TopKConfig(k=3))
    t = tuner(causal_lm("llama"), [])
    method.setup(t)
    low = smallest_plan(method, t.units)
    assert low.update == {"block.3", "norm"}  # top1
    need = mm.predict(low).predicted_peak_bytes
    with pytest.raises(BudgetError) as err:
        check_budget_floor(mm, need, low, margin=0.03)   # the margin makes it just too small
    assert err.value.minimum_bytes == need
    assert str(need) in str(err.value)
    assert err.value.required_budget_bytes >= need / 0.97
    assert check_budget_floor(mm, err.value.required_budget_bytes, low, 0.03).predicted_peak_bytes == need
    assert usable_budget(err.value.required_budget_bytes, 0.03) >= need


def test_smallest_plans_of_the_baselines(mm):
    units = mm.units
    for name, cfg, expect in [("bottomk", TopKConfig(k=2), {"block.0"}),
                              ("full", None, {u.name for u in units})]:
        m = build_method(name, cfg)
        assert smallest_plan(m, units).update == expect
    lisa = smallest_plan(build_method("lisa"), units)
    assert "embedding" in lisa.update and len([u for u in lisa.update if u.startswith("block.")]) == 1


def test_estimate_lists_every_family_and_marks_the_largest_fitting(capsys):
    import json

    from dynatune.planner import run_estimate
    args = ["model=arch:tiny-llama", "batch_size=4", "seq_len=32", "precision=amp-bf16", "budget=0.7", "device_type=cpu"]
    assert run_estimate(args, as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["config"] for r in rows}
    n = 4
    assert {"full", "top1", f"top{n}", "bottom1", "lisa2", "lora_r1", "lora_r64", "exit2_top1"} <= names
    for r in rows:
        assert r["predicted_peak_bytes"] >= r["predicted_counted_bytes"] > 0
        assert r["fits"] == (r["predicted_peak_bytes"] <= r["usable_budget_bytes"])
    full = next(r for r in rows if r["config"] == "full")
    assert rows[0]["budget_bytes"] == int(0.7 * full["predicted_peak_bytes"])
    best = {r["family"]: r for r in rows if r["fits_best"]}
    assert "full" not in best and best["top"]["fits"]
    k = best["top"]["setting"]
    if k < n:  # the next larger top-k does not fit
        assert not next(r for r in rows if r["config"] == f"top{k + 1}")["fits"]
    for fam, r in best.items():  # nothing larger in its family fits
        assert all(not o["fits"] or o is r for o in rows if o["family"] == fam and o["predicted_peak_bytes"] >
                   r["predicted_peak_bytes"] and fam != "exit")
    assert run_estimate(["model=arch:tiny-llama", "budget=12 GB"]) == 2
    assert run_estimate(["model=arch:tiny-llama", "bogus=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_install_budget_resolves_a_fraction_and_checks_the_floor():
    from dynatune.memory import install_budget, largest_prediction
    method = build_method("topk", TopKConfig(k=2))
    t = tuner(causal_lm("llama"), [])
    t.method = method
    method.setup(t)
    mm = install_budget(t, "0.8", batch_shape=SHAPE, device_type="cpu")
    full = mm.predict(Plan.of(u.name for u in mm.units)).predicted_peak_bytes
    assert t.budget_bytes == int(0.8 * full) and t.memory_model is mm and t.budget_margin == 0.03
    step(t, collate(lm_examples(SHAPE[0], seq=SHAPE[1])))
    got = largest_prediction(mm, [t.plan])
    assert got["predicted_peak_bytes"] == mm.predict(t.plan).predicted_peak_bytes
    t2 = tuner(causal_lm("llama"), [])
    t2.method = build_method("topk", TopKConfig(k=2))
    t2.method.setup(t2)
    with pytest.raises(BudgetError, match="topk's smallest plan"):
        install_budget(t2, "100KiB", batch_shape=SHAPE, device_type="cpu")
    assert t2.budget_bytes is None


def test_a_fraction_of_full_fine_tuning_means_the_model_without_adapters(mm):
    from dynatune.memory import full_finetuning_peak
    from dynatune.methods.adapters import LoraConfig
    lora = MemoryModel.from_config(lm_cfg(), method=build_method("lora", LoraConfig(r=4)), device_type="cpu",
                                   batch_shape=SHAPE)
    assert full_finetuning_peak(lora) == full_finetuning_peak(mm) == \
        mm.predict(Plan.of(u.name for u in mm.units)).predicted_peak_bytes


@pytest.mark.parametrize("name,options", [("topk", {"k": 4}), ("lisa", {"k": 4, "train_embedding": False})])
def test_fixed_plans_above_the_budget_are_refused_before_training_naming_the_minimum(name, options):
    """topk and lisa plans are fixed by their options: a budget that admits k=1 but not k=4 is refused
    at install time (not at a later re-draw), and the sentence names the budget k=4 needs."""
    from dynatune.memory import install_budget

    def installed(k, budget):
        t = tuner(causal_lm("llama"), [])
        t.method = build_method(name, **{**options, "k": k})
        t.method.setup(t)
        return t, install_budget(t, budget, batch_shape=SHAPE, device_type="cpu")

    t, mm = installed(1, "1.0")
    small = mm.predict(t.method.largest_plan(t.units)).predicted_peak_bytes
    t.method.config.k = 4
    big = mm.predict(t.method.largest_plan(t.units)).predicted_peak_bytes
    budget = int((small + big) / 2 / 0.97)  # k=1 fits under the margin, k=4 does not
    assert installed(1, f"{budget}B")[0].budget_bytes == budget
    with pytest.raises(BudgetError, match=f"{name}'s largest plan with these options") as err:
        installed(4, f"{budget}B")
    assert err.value.predicted_bytes == big and err.value.required_budget_bytes > budget
    assert str(err.value.required_budget_bytes) in str(err.value)


def test_estimate_prices_dynalora_at_its_worst_and_cheapest_placement(capsys):
    """dynatune estimate's DynaLoRA rows: k in M/3, 2M/3, M of the M q/v modules. The worst placement
    is block 0's largest module then the largest others (backward through every block); the
    cheapest is the k highest modules; k = M is one plan. The worst k=3 row is what a tuner training
    that very plan counts."""
    import json

    from dynatune.engine import Tuner
    from dynatune.planner import run_estimate
    args = ["model=arch:tiny-llama", "batch_size=4", "seq_len=32", "device_type=cpu", "families=dynalora",
            "dynalora_r=4"]
    assert run_estimate(args, as_json=True) == 0
    by = {r["config"]: r for r in json.loads(capsys.readouterr().out) if r["family"].startswith("dynalora")}
    assert sorted({r["setting"] for r in by.values()}) == [3, 5, 8]  # M = 4 blocks x (q_proj, v_proj)
    for k in (3, 5):
        worst, top = by[f"dynalora_k{k}"], by[f"dynalora_k{k}_top"]
        assert worst["block_states"][0].startswith("first_adapter")
        assert top["block_states"][0] == "idle"
        assert top["predicted_counted_bytes"] < worst["predicted_counted_bytes"]
    assert by["dynalora_k8"]["predicted_counted_bytes"] == by["dynalora_k8_top"]["predicted_counted_bytes"]
    # q_proj (64 -> 64) carries more LoRA parameters than v_proj (64 -> 32): block 0's, then blocks 1 and 2's
    worst = [f"block.{i}.self_attn.q_proj" for i in range(3)]
    method = build_method("dynalora", r=4, k=3, importance="random", allocator="topk")
    from transformers import AutoModelForCausalLM

    from dynatune.models import resolve_config
    torch.manual_seed(0)
    t = Tuner(AutoModelForCausalLM.from_config(resolve_config("arch:tiny-llama")), method)
    method.active, method._resolved, method.reallocates = list(worst), True, (lambda s: False)
    step(t, collate(lm_examples(4, seq=32)))
    assert set(t.plan.update) == set(worst)
    row = by["dynalora_k3"]
    assert row["trainable_params"] == sum(t.params[p].numel() for u in worst for p in t.units[u].param_names)
    c = row["counted_terms"]
    assert (c["weights"], c["gradients"], c["optimizer"]) == (t.record.weights, t.record.gradients, t.record.optimizer)
    acts = c["activations"]
    assert abs(acts - t.record.activations) <= 0.02 * t.record.activations
