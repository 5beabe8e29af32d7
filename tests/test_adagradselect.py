"""AdaGradSelect and gradselect: sampling, streaming top-m, budgets, offload + prefetch, resume."""
import copy
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynatune.engine import Tuner
from dynatune.errors import DynatuneError
from dynatune.methods import METHODS, build_method
from dynatune.report import read_log
from dynatune.methods.adagradselect import (AdaGradSelectConfig, GradSelectConfig, dirichlet, draw_blocks,
                                            log_gamma)

from scripted import step
from tiny import causal_lm, classifier, cls_examples, collate, lm_examples


def batches(n, seed=1, kind="lm"):
    data = lm_examples(4 * n, seed=seed) if kind == "lm" else cls_examples(4 * n, seed=seed)
    return [collate(data[4 * i:4 * i + 4]) for i in range(n)]


def ada(model, seed=0, **cfg):
    cfg.setdefault("steps_per_epoch", 4)
    return Tuner(model, build_method("adagradselect", AdaGradSelectConfig(**cfg), seed), lr=1e-3)


# 6 blocks, m=2; a flatter Dirichlet and a slower decay so that in 8 steps blocks come and go and
# step 4 explores right after a switch (its promoted block's state comes back from the host)
SWITCHY = dict(k=0.34, delta=4.0, decay=0.3, steps_per_epoch=6, seed=0)


def grad_norm_score(params):
    """The paper's block score: sum of the parameters' L2 gradient norms (Algorithm 1, line 5)."""
    return sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float32)) for p in params if p.grad is not None)


# -- optimizer state offload + prefetch --------------------------------------------------------------
def test_offloaded_and_prefetched_adamw_equals_all_resident_bitwise():
    data = batches(8)
    runs = {}
    for policy in ("keep", "offload"):
        model = causal_lm("llama")
        t = ada(model, state_policy=policy, **SWITCHY)
        losses = [step(t, b) for b in data]
        runs[policy] = (model, t, losses)
    (km, kt, kl), (om, ot, ol) = runs["keep"], runs["offload"]
    assert [h["update"] for h in kt.history] == [h["update"] for h in ot.history]  # same selection sequence
    assert ot.history[4]["method_log"]["explore"] and ot.history[3]["update"] != ot.history[4]["update"]
    assert ot.history[4]["bytes_moved"] > 0  # the explored step fetched a promoted block's state
    assert len({tuple(h["update"]) for h in ot.history}) > 3  # blocks really came and went
    assert ol == kl
    for (n, a), (_, b) in zip(km.named_parameters(), om.named_parameters()):
        assert torch.equal(a, b), n
    # no state lost: every parameter's state, resident or in its host copy, equals the all-resident run's
    for n, p in kt.params.items():
        ks = kt.optimizer.state.get(p)
        os_ = ot.optimizer.state.get(ot.params[n]) or ot.states.host.get(n)
        assert (ks is None) == (os_ is None), n
        if ks is not None:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ks[key], os_[key]), (n, key)
                if key == "step":
                    assert os_[key].device.type == "cpu" and os_[key].dim() == 0  # where AdamW keeps it
    # traffic is logged, and only the selected blocks' state stays resident
    assert all(h["bytes_moved"] == 0 for h in kt.history)
    assert sum(h["bytes_moved"] for h in ot.history) > 0
    for h in ot.history:  # exp_avg + exp_avg_sq of the updated blocks, and their 4-byte step counters
        names = ot.units.param_names(h["update"])
        assert h["memory"]["optimizer"] == sum(2 * ot.params[q].numel() * 4 + 4 for q in names)
    assert ot.history[-1]["memory"]["optimizer"] < kt.history[-1]["memory"]["optimizer"]
    # the host copies persist and are reused (updated in place) on later evictions
    assert set(ot.states.store.buffers) >= set(ot.states.host)


def test_exploration_steps_keep_resident_state_of_blocks_they_promote_again():
    """An explored step whose top-m overlaps the last selection moves only the difference."""
    model = causal_lm("llama")
    t = ada(model, k=0.5, state_policy="offload", eps0=1.0, decay=0.0)  # epoch 1 always explores
    for b in batches(3):
        step(t, b)
    h = t.history
    assert all(r["method_log"]["explore"] for r in h)
    sizes = {u: sum(t.params[q].numel() * 4 * 2 for q in t.units[u].param_names) for u in t.method.pool}
    evicted = set()
    for prev, cur in zip(h, h[1:]):
        left, came = set(prev["update"]) - set(cur["update"]), set(cur["update"]) - set(prev["update"])
        assert cur["bytes_moved"] == sum(sizes[u] for u in left) + sum(sizes[u] for u in came & evicted)
        evicted |= left


# -- sampling ---------------------------------------------------------------------------------------
def numpy_inclusion(alpha, m, n, seed):
    rng = np.random.default_rng(seed)
    ps = rng.dirichlet(alpha, size=n)
    hits = np.zeros(len(alpha))
    for p in ps:
        hits[rng.choice(len(alpha), size=m, replace=False, p=p / p.sum())] += 1
    return hits / n


def assert_close_frequencies(ours, ref, n_ours, n_ref, sigmas=4.0):
    for i, (a, b) in enumerate(zip(ours, ref)):
        pbar = (a * n_ours + b * n_ref) / (n_ours + n_ref)
        se = math.sqrt(max(pbar * (1 - pbar), 1e-12) * (1 / n_ours + 1 / n_ref))
        assert abs(a - b) <= sigmas * se + 1e-12, (i, a, b, se)


@pytest.mark.parametrize("counts,delta,m", [([5, 0, 2, 9, 1, 0], 1.0, 2), ([3, 0, 0, 12, 1, 4, 0], 0.3, 3)])
def test_dirichlet_then_multinomial_matches_numpy_reference(counts, delta, m):
    alpha = np.array(counts, dtype=float) + delta
    n = 20000
    g = torch.Generator().manual_seed(11)
    idx = draw_blocks(torch.tensor(alpha), m, g, n=n)
    assert idx.shape == (n, m) and all(len(set(r)) == m for r in idx.tolist())  # without replacement
    ours = np.bincount(idx.flatten().numpy(), minlength=len(alpha)) / n
    ref = numpy_inclusion(alpha, m, n // 2, seed=3)
    assert_close_frequencies(ours, ref, n, n // 2)


def test_gamma_and_dirichlet_moments():
    g = torch.Generator().manual_seed(0)
    n = 40000
    for a in (0.2, 1.0, 4.5):  # the boost branch (a < 1) and Marsaglia-Tsang proper
        x = log_gamma(torch.full((n,), a, dtype=torch.float64), g).exp()
        assert abs(x.mean().item() - a) <= 4 * math.sqrt(a / n)
        assert abs(x.var().item() - a) <= 4 * a * math.sqrt((2 + 6 / a) / n)  # Gamma's excess kurtosis 6/a
    alpha = torch.tensor([0.5, 2.0, 7.5], dtype=torch.float64)
    p = dirichlet(alpha, g, n=n)
    assert p.dtype == torch.float64 and torch.allclose(p.sum(-1), torch.ones(n, dtype=torch.float64))
    mean = alpha / alpha.sum()
    sd = (mean * (1 - mean) / (alpha.sum() + 1) / n).sqrt()
    assert ((p.mean(0) - mean).abs() <= 4 * sd).all()


def test_method_plans_sample_the_reference_distribution():
    """The method's own exploitation plans (epoch 2) follow Dirichlet(f + delta) then m without replacement."""
    t = ada(causal_lm("llama"), k=0.34, steps_per_epoch=1)  # B=6 -> m=2
    meth = t.method
    counts = {"embedding": 4, "block.0": 0, "block.1": 7, "block.2": 1, "block.3": 0, "norm": 2}
    hits = dict.fromkeys(meth.pool, 0)
    n = 2000
    for s in range(n):
        meth.counts = dict(counts)  # fixed counts: plans only, no end_step
        plan = meth.plan(1 + s)
        assert not plan.probe_params and len(plan.update) == 2
        for u in plan.update:
            hits[u] += 1
    ours = [hits[u] / n for u in meth.pool]
    ref = numpy_inclusion(np.array([counts[u] + 1.0 for u in meth.pool]), 2, 10000, seed=5)
    assert_close_frequencies(ours, ref, n, 10000)


def test_exploration_rate_follows_epsilon_and_global_rng_is_untouched():
    spe = 1500
    t = ada(causal_lm("llama"), k=0.5, steps_per_epoch=spe)
    meth = t.method
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    explored, eps = [], []
    for s in range(spe + 200):
        plan = meth.plan(s)
        explored.append(bool(plan.probe_params))
        eps.append(meth._step_info["eps"])
        if not plan.probe_params:
            meth.end_step(s, None)  # counts grow: later draws use the updated Dirichlet
    meth._drop_tracker()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist() and random.getstate() == py_state
    expect = [math.exp(-5.0 / spe * s) for s in range(spe)]
    assert eps[:spe] == pytest.approx(expect) and eps[spe:] == [0.0] * 200
    assert explored[0]  # eps_0 = 1: the first step always explores (paper, Fig. 2)
    assert not any(explored[spe:])  # epoch 2: pure exploitation
    mean, sd = sum(expect), math.sqrt(sum(e * (1 - e) for e in expect))
    assert abs(sum(explored[:spe]) - mean) <= 4 * sd, (sum(explored[:spe]), mean, sd)
    assert sum(meth.counts.values()) == 3 * (spe + 200 - sum(explored))  # m=3 per exploited step


def test_state_dict_round_trip_gives_identical_future_selections():
    t = ada(causal_lm("llama"), k=0.5, steps_per_epoch=1)
    a = t.method
    for s in range(1, 30):
        a.plan(s)
        a.end_step(s, None)
    sd = copy.deepcopy(a.state_dict())
    future = []
    for s in range(30, 80):
        future.append(sorted(a.plan(s).update))
        a.end_step(s, None)
    t2 = ada(causal_lm("llama"), k=0.5, steps_per_epoch=1, seed=123)  # another seed: the state decides
    b = t2.method
    b.load_state_dict(sd)
    assert b.counts == sd["counts"]
    again = []
    for s in range(30, 80):
        again.append(sorted(b.plan(s).update))
        b.end_step(s, None)
    assert again == future and a.counts == b.counts


def test_train_half_save_resume_half_equals_straight_run():
    """Exploration, exploitation and offloaded state all resume exactly (losses, plans, weights)."""
    data = batches(8)
    ref_model = causal_lm("llama")
    ref = ada(ref_model, state_policy="offload", **SWITCHY)
    ref_losses = [step(ref, b) for b in data]

    first = causal_lm("llama")
    t1 = ada(first, state_policy="offload", **SWITCHY)
    losses = [step(t1, b) for b in data[:4]]
    sd = copy.deepcopy(t1.state_dict())
    weights = {n: v.clone() for n, v in first.state_dict().items()}
    second = causal_lm("llama", seed=9)
    second.load_state_dict(weights)
    t2 = ada(second, state_policy="offload", **{**SWITCHY, "seed": 99})  # the state decides, not the seed
    t2.load_state_dict(sd)
    losses += [step(t2, b) for b in data[4:]]
    assert ref.history[4]["method_log"]["explore"]  # the first step after the resume explores
    assert losses == ref_losses
    assert [h["update"] for h in t2.history] == [h["update"] for h in ref.history]
    for (n, a), (_, b) in zip(ref_model.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), n


# -- gradselect: streaming top-m ---------------------------------------------------------------------
class LiveGradMeter:
    """Independent of the method: post-accumulate-grad hooks that sum live pool gradient bytes."""

    def __init__(self, t):
        self.pool = {u: [t.params[q] for q in t.units[u].param_names] for u in t.method.pool}
        self.peak_bytes = self.peak_blocks = 0
        self.handles = [p.register_post_accumulate_grad_hook(self.measure) for ps in self.pool.values() for p in ps]

    def measure(self, _):
        live = {u: sum(p.grad.numel() * p.grad.element_size() for p in ps if p.grad is not None)
                for u, ps in self.pool.items()}
        self.peak_bytes = max(self.peak_bytes, sum(live.values()))
        self.peak_blocks = max(self.peak_blocks, sum(1 for v in live.values() if v))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("arch,k", [("llama", 0.34), ("llama", 0.5), ("qwen2", 0.3), ("bert", 0.25)])
def test_gradselect_equals_naive_top_m_with_at_most_m_plus_1_blocks_of_gradients(arch, k):
    if arch == "bert":
        make = lambda: classifier("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # noqa: E731
        data = batches(2, kind="cls")
    else:
        make = lambda: causal_lm(arch)  # noqa: E731
        data = batches(2)
    model = make()
    t = Tuner(model, build_method("gradselect", GradSelectConfig(k=k)), lr=1e-3)
    meth = t.method
    B, m = len(meth.pool), meth.m
    assert m == max(1, round(k * B))
    fresh = {u.name for u in t.units.fresh_heads}
    assert not fresh & set(meth.pool) and (arch != "bert" or fresh == {"head"})
    for batch in data:
        # the naive way: every gradient kept, on an identical copy
        naive = make()
        naive.load_state_dict(model.state_dict())
        for p in naive.parameters():
            p.requires_grad_(True)
        naive(**batch).loss.backward()
        nparams = dict(naive.named_parameters())
        scores = {u: grad_norm_score([nparams[q] for q in t.units[u].param_names]) for u in meth.pool}
        top = sorted(meth.pool, key=lambda u: -scores[u])[:m]

        meter = LiveGradMeter(t)
        seen = {}

        def inspect(t):
            seen["with_grad"] = {u.name for u in t.units if any(t.params[q].grad is not None for q in u.param_names)}
        step(t, batch, inspect=inspect)
        meter.close()
        assert set(t.promoted) == set(top)
        assert t.history[-1]["update"] == sorted(set(top) | fresh)
        assert seen["with_grad"] == set(top) | fresh  # only the winners (and the head) reach the optimizer
        for u, s in meth.last_tracker.scores.items():
            assert s == pytest.approx(scores[u], rel=1e-4)
        sizes = sorted((sum(p.numel() * p.element_size() for p in ps) for ps in meter.pool.values()), reverse=True)
        assert meter.peak_blocks <= m + 1
        assert meter.peak_bytes <= sum(sizes[:m + 1])
        assert meth.last_tracker.peak_live_bytes <= sum(sizes[:m + 1])
        assert meth.last_tracker.peak_live_blocks <= m + 1


def test_gradselect_with_gradient_accumulation_ranks_the_summed_gradient():
    model = causal_lm("llama")
    t = Tuner(model, build_method("gradselect", GradSelectConfig(k=0.34)), lr=1e-3)
    t.method.micro_batches = 2
    halves = [collate(lm_examples(8, seed=4)[i:i + 4]) for i in (0, 4)]
    naive = causal_lm("llama")
    naive.load_state_dict(model.state_dict())
    for h in halves:
        (naive(**h).loss * 0.5).backward()
    nparams = dict(naive.named_parameters())
    scores = {u: grad_norm_score([nparams[q] for q in t.units[u].param_names]) for u in t.method.pool}
    top = set(sorted(t.method.pool, key=lambda u: -scores[u])[:t.method.m])
    t.begin_step()
    for h in halves:
        (t.model(**h).loss * 0.5).backward()
    t.after_backward()
    assert set(t.promoted) == top
    for u in top:  # the full accumulated gradient reaches the optimizer, not a part of it
        for q in t.units[u].param_names:
            assert torch.allclose(t.params[q].grad, nparams[q].grad, atol=1e-7)
    t.abort_step()

    t.method.micro_batches = 1  # announced wrong: ranking after the first pass would lose gradients
    t.begin_step()
    for h in halves:
        (t.model(**h).loss * 0.5).backward()
    with pytest.raises(DynatuneError, match="micro_batches"):
        t.after_backward()
    t.abort_step()


# -- k, the 1/B rule and budgets -------------------------------------------------------------------
def test_k_below_one_over_b_is_refused_with_the_rule():
    for name, Cfg in (("adagradselect", AdaGradSelectConfig), ("gradselect", GradSelectConfig)):
        with pytest.raises(DynatuneError, match=r"1/B = 1/6.*min% >= 1/B"):
            Tuner(causal_lm("llama"), build_method(name, Cfg(k=0.1)))  # B = 4 blocks + embedding + norm
    t = Tuner(causal_lm("llama"), build_method("adagradselect", AdaGradSelectConfig(k=1 / 6)))
    assert t.method.m == 1 and t.method.pool == ["embedding", "block.0", "block.1", "block.2", "block.3", "norm"]
    with pytest.raises(DynatuneError, match=r"in \(0, 1\]"):
        build_method("gradselect", GradSelectConfig(k=1.5))


class FakeMemoryModel:
    """Peak = gradient + 2 AdamW states (3x) of updated units + gradients of probed parameters."""

    def __init__(self, t):
        self.t, self.calls = t, 0

    def size(self, names):
        return sum(self.t.params[q].numel() * 4 for q in self.t.units.param_names(names))

    def predict(self, plan, kept_state=()):  # offloaded state: nothing is kept on the device
        self.calls += 1
        peak = 3 * self.size(plan.update) + self.size(plan.probe_params)
        return SimpleNamespace(predicted_peak_bytes=peak, predicted_counted_bytes=peak, phases={})

    def check_admitted(self, plan, budget_bytes, margin):  # the engine's check of every applied plan
        peak = self.predict(plan).predicted_peak_bytes
        if peak > int(budget_bytes * (1 - margin)):
            raise DynatuneError(f"fake: over budget ({peak} > {budget_bytes})")


def test_budget_derives_k_and_exploration_that_does_not_fit_falls_back():
    model = causal_lm("llama")
    t = ada(model, k=None, steps_per_epoch=4)
    mm = FakeMemoryModel(t)
    sizes = sorted((mm.size([u]) for u in t.method.pool), reverse=True)
    t.memory_model, t.budget_margin = mm, 0.0
    t.budget_bytes = 3 * sum(sizes[:2]) + 1  # two of the largest blocks fit, three do not;
    # an exploration step (3 x top-2 + one more block's gradient) does not fit either
    data = batches(2)
    step(t, data[0])
    assert t.method.m == 2
    rec = t.history[0]
    assert rec["method_log"]["eps"] == 1.0 and rec["method_log"]["fallback"] and not rec["method_log"]["explore"]
    assert "over budget" in rec["note"] and "promoted" not in rec
    assert len(set(rec["update"])) == 2

    # with room for one more gradient the same m explores, streaming (priced as m+1 gradients)
    t2 = ada(causal_lm("llama"), k=None, steps_per_epoch=4)
    t2.memory_model, t2.budget_margin = (mm2 := FakeMemoryModel(t2)), 0.0
    t2.budget_bytes = 3 * sum(sizes[:2]) + sizes[2]
    assert t2.method.exploration_peak(2) == 3 * sum(sizes[:2]) + sizes[2]
    step(t2, data[0])
    assert t2.method.m == 2 and t2.history[0]["method_log"]["explore"] and len(t2.history[0]["promoted"]) == 2
    assert mm2.calls > 0

    # gradselect: m from the exploration price
    t3 = Tuner(causal_lm("llama"), build_method("gradselect", GradSelectConfig(k=None)), lr=1e-3)
    t3.memory_model = FakeMemoryModel(t3)
    t3.budget_bytes = 3 * sum(sizes[:3]) + sizes[3]
    t3.budget_margin = 0.0
    step(t3, data[1])
    assert t3.method.m == 3
    # the default margin (3%, as TriMS) leaves less room: one block fewer
    t4 = Tuner(causal_lm("llama"), build_method("gradselect", GradSelectConfig(k=None)), lr=1e-3)
    t4.memory_model, t4.budget_bytes = FakeMemoryModel(t4), t3.budget_bytes
    t4.begin_step()
    assert t4.method.m == 2
    t4.abort_step()


def test_exploration_priced_by_the_memory_model_holds_m_plus_1_gradients_at_the_end_of_backward():
    """With the real memory model: the streaming step is the all-gradients plan with only m+1 blocks'
    gradients at its `backward_end` phase; other phases are as predicted; k=null picks m by it."""
    from dynatune.memory import MemoryModel
    from dynatune.plan import Plan
    t = Tuner(causal_lm("llama"), build_method("gradselect", GradSelectConfig(k=None)), lr=1e-3)
    # a tiny batch: gradients, not activations, make the peak (the case streaming is for)
    t.memory_model = mm = MemoryModel(t.model, units=t.units, device_type="cpu", batch_shape=(1, 2), params=t.params)
    meth = t.method
    sizes = meth._sizes()
    order = sorted(meth.pool, key=lambda u: -sizes[u])
    for m in (1, 2, 3):
        full = mm.predict(Plan.of(order[:m], probe_params=order[m:]))
        assert full.peak_phase == "backward_end"
        freed = sum(sizes[u] for u in order[m + 1:])
        want = max(v - (freed if k == "backward_end" else 0) for k, v in full.phases.items())
        assert meth.exploration_peak(m) == want < full.predicted_peak_bytes
        # ranked after backward (FSDP2's shards): every probed gradient lives to the end of backward
        meth.streaming = False
        assert meth.exploration_peak(m) == full.predicted_peak_bytes
        meth.streaming = True
    t.budget_bytes = int(meth.exploration_peak(2) / 0.97) + 1
    step(t, batches(1)[0])
    assert meth.m == 2 and len(t.promoted) == 2
    # metrics.json reports the price the step was admitted at, not the bare plan's lower model price
    from dynatune.loop import predicted_memory
    from dynatune.memory import largest_prediction
    reported = predicted_memory(t, None, "cpu")
    assert reported["predicted_peak_bytes"] == meth.exploration_peak(2) == t.history[-1]["predicted_peak_bytes"]
    assert reported["predicted_peak_phase"] == "the method's own price"
    assert largest_prediction(mm, t.applied_plans)["predicted_peak_bytes"] < meth.exploration_peak(2)
    # the bare exploration plan (every block probed, nothing updated) misses the m winners' optimizer
    # state and keeps every gradient; the engine admits it by the method's own price (plan_peak)
    raw = mm.predict(Plan.of((), probe_params=meth.pool)).predicted_peak_bytes
    assert raw != meth.exploration_peak(2)
    t.budget_bytes = int((raw + meth.exploration_peak(2)) / 2 / 0.97)  # the raw plan fits, the real step not
    with pytest.raises(DynatuneError, match="usable"):
        t.begin_step()


def test_explicit_k_over_budget_and_k_null_without_budget_are_refused():
    t = ada(causal_lm("llama"), k=0.5)
    t.memory_model = FakeMemoryModel(t)
    t.budget_bytes = 10
    with pytest.raises(DynatuneError, match="over the usable budget"):
        t.begin_step()
    t = ada(causal_lm("llama"), k=None)
    with pytest.raises(DynatuneError, match="no budget"):
        t.begin_step()
    t = ada(causal_lm("llama"), k=0.5, steps_per_epoch=0)
    with pytest.raises(DynatuneError, match="steps_per_epoch"):
        t.begin_step()
    t.method.configure_loop(1, 3)  # what the training loop does when the config says 0
    t.begin_step()
    t.abort_step()


# -- plots ----------------------------------------------------------------------------------------
def test_plot_reads_the_run_log(tmp_path):
    t = ada(causal_lm("llama"), k=0.5, steps_per_epoch=3)
    with open(tmp_path / "log.jsonl", "w") as f:
        for b in batches(5):
            step(t, b)
            f.write(json.dumps(t.history[-1]) + "\n")
    rec = t.history[-1]
    assert {"eps", "explore", "fallback", "selected"} <= set(rec["method_log"])
    assert "optimizer" in rec["memory"] and "bytes_moved" in rec
    paths = METHODS["adagradselect"].plots(tmp_path, read_log(tmp_path))  # how `dynatune report` draws it
    assert paths == [tmp_path / "adagradselect.png"] and paths[0].stat().st_size > 10_000
