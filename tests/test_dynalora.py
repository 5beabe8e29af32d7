"""DynaLoRA / DynaVeRA (shared/papers/001): inactive adapter modules cost nothing, counted and
priced per module; allocators, eq. 1, local clocks and resume against hand computations."""
import json

import pytest
import torch

from dynatune.engine import Tuner
from dynatune.loop import fit, make_tuner
from dynatune.memory import MemoryModel
from dynatune.methods import build_method
from dynatune.optim import linear_factor
from dynatune.plan import Plan

from scripted import adam_state_bytes, step
from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg

B, S = 3, 20
R = 4
I, H = 64, 32  # tiny Llama's MLP and hidden widths (tests/tiny.py)
PRICED_S = 48  # the probe runs S in {16, 24, 32}: priced at a length it never ran


def down_proj_run(k, **kw):
    """DynaLoRA on tiny Llama's four down_proj linears; random importance + top-k picks the first k
    modules in model order (ties), so the plan is known: block.0 .. block.{k-1}."""
    method = build_method("dynalora", targets="down_proj", r=R, k=k, importance="random", allocator="topk", **kw)
    t = Tuner(causal_lm("llama"), method, lr=1e-2)
    return t


def test_inactive_adapters_get_no_gradient_no_step_and_save_no_input(one_thread):
    batch = collate(lm_examples(B, seq=S))
    runs = {}
    for k in (2, 3):
        t = down_proj_run(k)
        before = {n: p.detach().clone() for n, p in t.params.items()}
        grads = {}
        step(t, batch, inspect=lambda t: grads.update({n: p.grad is not None for n, p in t.params.items()}))
        active = {f"block.{i}.mlp.down_proj" for i in range(k)}
        assert set(t.plan.update) == active
        for u in t.units.of_kind("adapter"):
            for n in u.param_names:
                assert grads[n] == (u.name in active), n                       # no gradient when inactive
                assert (t.params[n] in t.optimizer.state) == (u.name in active), n  # no optimizer state
                if u.name not in active:
                    assert torch.equal(t.params[n], before[n]), n                # no step
        params = [t.params[n] for n in t.units.param_names(active)]
        assert t.record.gradients == sum(p.numel() * 4 for p in params)
        assert t.record.optimizer == adam_state_bytes(params)
        runs[k] = t.record
    # block.2's adapter active or not; backward runs through block.2 either way (block.0 is lowest).
    # Active, it saves its input (act(gate) * up: B x S x I, which nothing else saves: the frozen base
    # linear needs only its weight) for lora_A, and lora_A's output (B x S x r) for lora_B. Nothing else.
    assert runs[3].activations - runs[2].activations == B * S * (I + R) * 4
    one = (R * I + H * R) * 4                    # lora_A (r x I) and lora_B (H x r), fp32
    assert runs[3].gradients - runs[2].gradients == one
    assert runs[3].optimizer - runs[2].optimizer == 2 * one + 2 * 4   # two moments, a step per tensor


def test_backward_stops_at_the_lowest_active_adapter(one_thread):
    method = build_method("dynalora", targets="q_proj,v_proj", r=R, k=1, importance="random", allocator="topk")
    t = Tuner(causal_lm("llama"), method)
    # the top block's v_proj alone (topk on uniform importance would pick block.0's q_proj)
    method.active = ["block.3.self_attn.v_proj"]
    method._resolved = True
    method.reallocates = lambda s: False
    t.begin_step()
    loss = t.model(**collate(lm_examples(B, seq=S))).loss
    by_block = dict(t.counter.by_block)
    loss.backward()
    t.after_backward()
    assert by_block.get("block.0", 0) == by_block.get("block.1", 0) == by_block.get("block.2", 0) == 0
    assert by_block["block.3"] > 0
    assert all(p.grad is None for n, p in t.params.items() if n not in t.units["block.3.self_attn.v_proj"].param_names)
    t.abort_step()


@pytest.mark.parametrize("arch,targets", [("llama", "q_proj,v_proj"), ("bert", "query,value")])
def test_memory_model_prices_each_adapter_module(arch, targets, one_thread):
    """Plans with some of a block's adapters active: weights, gradients and optimizer state exact,
    saved activations within 2%, and cheaper than the same blocks with every adapter active."""
    q, v = targets.split(",")
    if arch == "bert":
        q, v = f"attention.self.{q}", f"attention.self.{v}"
        make, batch = (lambda: classifier("bert")), collate(cls_examples(B, seq=PRICED_S))
    else:
        q, v = f"self_attn.{q}", f"self_attn.{v}"
        make, batch = (lambda: causal_lm("llama")), collate(lm_examples(B, seq=PRICED_S))
    plans = [[f"block.1.{v}", f"block.2.{q}"],
             [f"block.0.{q}", f"block.2.{q}", f"block.2.{v}", f"block.3.{v}"],
             [f"block.1.{q}"]]
    for active in plans:
        method = build_method("dynalora", targets=targets, r=R, k=len(active), importance="random",
                              allocator="topk", train_head=False)
        t = Tuner(make(), method)
        method.active, method._resolved, method.reallocates = list(active), True, (lambda s: False)
        mm = MemoryModel.from_tuner(t, batch_shape=(B, PRICED_S), device_type="cpu")
        step(t, batch)
        pred = mm.predict(t.plan)
        assert pred.weights == t.record.weights
        assert pred.gradients == t.record.gradients
        assert pred.optimizer == t.record.optimizer
        acts = pred.activations + pred.activations_outside
        assert abs(acts - t.record.activations) <= 0.02 * t.record.activations, (active, acts, t.record.activations)
        # the same blocks with all their adapters active, as blocks used to be priced
        whole = {u.name for u in t.units.of_kind("adapter") if u.depth in {t.units[a].depth for a in active}}
        assert mm.predict(Plan.of(whole)).activations > pred.activations


# -- allocators ----------------------------------------------------------------------------------------
def allocator(name, counts=None, **kw):
    m = build_method("dynalora", allocator=name, seed=5, **kw)
    m.counts = list(counts) if counts is not None else [0, 0, 0, 0]
    return m


Y = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)


def test_topk_and_threshold_equal_hand_computation():
    assert allocator("topk").allocate(Y, 2) == [0, 2]
    # most important first: 0.4, 0.3 (0.7 < 0.8), 0.2 (0.9 >= 0.8): three modules
    assert allocator("threshold", threshold=0.8).allocate(Y, 4) == [0, 2, 3]
    assert allocator("threshold", threshold=0.4).allocate(Y, 4) == [0]
    assert allocator("threshold", threshold=0.8).allocate(Y, 2) == [0, 2]  # never more than k


def test_stochastic_allocators_draw_from_the_hand_computed_categorical():
    g = torch.Generator().manual_seed(5)
    assert allocator("stochastic").allocate(Y, 2) == sorted(torch.multinomial(Y, 2, generator=g).tolist())
    # eq. 3 with C + 1: y / (C + 1) = [0.4/4, 0.1/1, 0.3/2, 0.2/1] = [0.1, 0.1, 0.15, 0.2], / 0.55
    q = torch.tensor([0.1, 0.1, 0.15, 0.2], dtype=torch.float64) / 0.55
    g = torch.Generator().manual_seed(5)
    assert allocator("discounted-stochastic", counts=[3, 0, 1, 0]).allocate(Y, 2) == \
        sorted(torch.multinomial(q, 2, generator=g).tolist())
    # many draws: frequencies follow q (first draws of multinomial without replacement)
    m = allocator("discounted-stochastic", counts=[3, 0, 1, 0])
    firsts = torch.tensor([torch.multinomial(q, 1, generator=m.generator).item() for _ in range(4000)])
    freq = torch.bincount(firsts, minlength=4).double() / 4000
    assert torch.allclose(freq, q, atol=0.03)
    # independent draws: each module with probability min(1, k q_m), from the method's generator
    m = allocator("stochastic", independent=True)
    u = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert m.allocate(Y, 2) == [i for i in range(4) if u[i] < min(1.0, 2 * float(Y[i]))]


# -- importance --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2])
def test_forward_importance_is_eq1_per_sample_over_non_padding_tokens(p, one_thread):
    method = build_method("dynalora", targets="query,value", r=R, norm=p, fraction=0.5)
    t = Tuner(classifier("bert"), method)
    examples = cls_examples(4, seq=S)
    for j, e in enumerate(examples):  # padding at the end of three samples
        e["attention_mask"] = torch.ones(S, dtype=torch.long)
        e["attention_mask"][S - 3 * j:] = 0 if j else 1
    batch = collate(examples)
    outs = {}
    mods = {n: dict(t.model.named_modules())[f"{t.units.blocks_path}.{n[len('block.'):]}"] for n in method.modules}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.detach())) for n, m in mods.items()]
    step(t, batch)
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].bool()
    for n, i in method.index.items():
        by_hand = sum(torch.linalg.vector_norm(outs[n][b][mask[b]].flatten(), ord=p) for b in range(4))
        assert torch.isclose(method.acc[i], by_hand.float(), rtol=1e-5), n
    if p == 2:  # one L2 norm of the whole batch would be smaller (eq. 1 sums per-sample norms; L1 is additive)
        whole = torch.linalg.vector_norm((outs[method.modules[0]] * mask.unsqueeze(-1)).flatten(), ord=2)
        assert method.acc[0] > 1.1 * whole
    y = method.importance()  # eq. 2
    assert torch.allclose(y, method.acc.double() / method.acc.double().sum())


def test_backward_importance_is_the_adapter_gradient_norm_and_inactive_modules_keep_their_score(one_thread):
    method = build_method("dynalora", targets="q_proj,v_proj", r=R, k=3, importance="backward", period=2, seed=1)
    t = Tuner(causal_lm("llama"), method, lr=1e-2)
    norms = {}

    def read(t):
        for n in t.plan.update:
            g = [t.params[p].grad for p in t.units[n].param_names]
            norms.setdefault(n, []).append(float(torch.sqrt(sum(x.pow(2).sum() for x in g))))
    data = lm_examples(2 * B, seq=S)
    for s in range(2):
        step(t, collate(data[s * B:(s + 1) * B]), inspect=read)
    first = set(t.plan.update)
    y = method.importance()
    means = {n: sum(v) / len(v) for n, v in norms.items()}
    fill = sum(means.values()) / len(means)  # never trained: the mean of the measured scores
    raw = torch.tensor([means.get(n, fill) for n in method.modules], dtype=torch.float64)
    assert torch.allclose(y, raw / raw.sum(), rtol=1e-5)
    assert len(first) == 3
    # a module inactive in the next period keeps its score
    kept = dict(zip(method.modules, method.scores))
    method.seen.zero_()
    y2 = method.importance()
    assert torch.allclose(y2, torch.tensor([kept[n] for n in method.modules], dtype=torch.float64) /
                          sum(kept.values()))


# -- optimisation ---------------------------------------------------------------------------------------
def test_local_clocks_advance_only_when_selected(one_thread):
    steps, period = 8, 2
    method = build_method("dynalora", targets="q_proj,v_proj", r=R, k=3, period=period, optimisation="local",
                          seed=2)
    cfg = loop_cfg(max_steps=steps, warmup_ratio=0.25, lr=1e-2, batch_size=B, max_length=S)
    t = make_tuner(causal_lm("llama"), method, cfg, torch.device("cpu"))
    used = []  # the rate each active unit's group steps at
    t.optimizer.register_step_pre_hook(lambda opt, a, kw: used.append(
        {u: g["lr"] for u, (g,) in t._unit_groups.items() if any(p.grad is not None for p in g["params"])}))
    fit(t.model, method, lm_examples(steps * B, seq=S), collate, cfg, tuner=t)
    M = len(method.modules)
    horizon = steps * 3 / M
    warm = int(0.25 * horizon)
    clocks = {n: 0 for n in method.modules}
    for s, rates in enumerate(used):
        active = t.history[s]["update"]
        assert set(rates) == set(active)
        for n in active:
            assert rates[n] == pytest.approx(1e-2 * linear_factor(clocks[n], warm, round(horizon)))
            clocks[n] += 1
    assert [clocks[n] for n in method.modules] == method.clocks == method.counts
    assert len(set(method.clocks)) > 1  # modules trained for different numbers of steps


def test_every_module_active_equals_plain_lora_bit_for_bit(one_thread):
    cfg = loop_cfg(max_steps=6, batch_size=B, max_length=S)
    a, _ = fit(causal_lm("llama"), build_method("lora", targets="q_proj,v_proj", r=R), lm_examples(6 * B, seq=S),
               collate, cfg)
    b, _ = fit(causal_lm("llama"), build_method("dynalora", r=R, fraction=1.0, period=2), lm_examples(6 * B, seq=S),
               collate, cfg)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n


@pytest.mark.parametrize("options", [dict(importance="forward", optimisation="global", state_policy="offload"),
                                     dict(importance="backward", optimisation="local", state_policy="drop")])
def test_train_n_equals_half_save_resume_half(options, tmp_path, one_thread):
    steps = 8
    cfg = loop_cfg(max_steps=steps, batch_size=B, max_length=S, checkpoint_every=steps // 2, keep_checkpoints=5)
    data = lm_examples(steps * B, seq=S)
    opts = dict(targets="q_proj,v_proj", r=R, k=3, period=3, **options)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = fit(causal_lm("llama"), build_method("dynalora", seed=4, **opts), data, collate, cfg, out_dir=tmp_path / "a")
    cfg_b = loop_cfg(**{**vars(cfg), "resume": str(tmp_path / "a" / "checkpoints" / f"step-{steps // 2}")})
    b, _ = fit(causal_lm("llama", seed=7), build_method("dynalora", seed=99, **opts), data, collate, cfg_b,
               out_dir=tmp_path / "b")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["update"] for h in a.history] == [h["update"] for h in b.history]
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
    sa, sb = a.method.state_dict(), b.method.state_dict()
    for key in ("counts", "clocks", "scores", "active", "k", "measured"):
        assert sa[key] == sb[key], key
    assert torch.equal(sa["acc"], sb["acc"]) and torch.equal(sa["generator"], sb["generator"])


# -- budget ----------------------------------------------------------------------------------------------
def test_k_from_a_budget_is_the_largest_whose_worst_plan_fits(one_thread):
    cfg = loop_cfg(max_steps=4, batch_size=B, max_length=S, budget=None, margin=0.03, precision="fp32")

    def tuner_with(budget, **kw):
        c = loop_cfg(**{**vars(cfg), "budget": budget})
        return make_tuner(causal_lm("llama"), build_method("dynalora", targets="q_proj,v_proj", r=R, **kw), c,
                          torch.device("cpu"))
    probe = tuner_with(None, k=1)
    probe_mm = MemoryModel.from_tuner(probe, batch_shape=(B, S), device_type="cpu")
    k3 = probe_mm.predict(probe.method.worst_plan(3)).predicted_peak_bytes  # no optimizer state yet
    t = tuner_with(f"{int(k3 / 0.97) + 8}B", k=None, fraction=None)
    fit(t.model, t.method, lm_examples(4 * B, seq=S), collate, cfg, tuner=t)
    m = t.method
    assert m.k >= 3
    assert t.predict_peak(m.worst_plan(m.k)) <= t.usable_budget
    if m.k < len(m.pool()):
        assert t.predict_peak(m.worst_plan(m.k + 1)) > t.usable_budget
    assert all(h["memory"]["counted"] <= t.budget_bytes for h in t.history)


def test_a_budget_below_backward_through_every_block_keeps_the_draws_above_a_depth(one_thread):
    """Budget between a top-block module's plan and any block-0 module's: k comes with a lowest depth,
    the one admitting the largest k, and every draw stays above it, within the budget."""
    cfg = loop_cfg(max_steps=6, batch_size=B, max_length=S, budget=None, margin=0.03, precision="fp32")
    opts = dict(targets="q_proj,v_proj", r=R, period=2, k=None, fraction=None)
    probe = Tuner(causal_lm("llama"), build_method("dynalora", **opts))
    probe.set_budget(MemoryModel.from_tuner(probe, batch_shape=(B, S), device_type="cpu"), None)
    deepest = probe.predict_peak(probe.method.worst_plan(1, 0))
    top = probe.predict_peak(probe.method.worst_plan(1, 3))
    assert top < deepest
    budget = int((top + deepest) / 2 / 0.97)
    t = make_tuner(causal_lm("llama"), build_method("dynalora", **opts),
                   loop_cfg(**{**vars(cfg), "budget": f"{budget}B"}), torch.device("cpu"))
    fit(t.model, t.method, lm_examples(6 * B, seq=S), collate, cfg, tuner=t)
    m = t.method
    assert m.lowest_depth > 0
    # the largest k whose worst plan fits at each depth, by a linear scan (the method bisects)
    by_depth = {d: max((k for k in range(1, 1 + sum(t.units[n].depth >= d for n in m.modules)) if m._fits(k, d)),
                       default=0) for d in range(4)}
    assert by_depth[0] == 0 and m.k == max(by_depth.values())
    assert m.lowest_depth == min(d for d, k in by_depth.items() if k == m.k)
    for h in t.history:
        assert all(t.units[u].depth >= m.lowest_depth for u in h["update"])
        assert h["memory"]["counted"] <= budget


# -- adapters ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter,params", [("lora", {"lora_A", "lora_B"}),
                                            ("dora", {"lora_A", "lora_B", "lora_magnitude_vector"}),
                                            ("vera", {"vera_lambda_b", "vera_lambda_d"})])
def test_one_unit_per_adapted_linear_for_every_adapter_type(adapter, params, one_thread):
    name = "dynavera" if adapter == "vera" else "dynalora"
    opts = {} if adapter == "vera" else {"adapter": adapter}
    t = Tuner(causal_lm("llama"), build_method(name, targets="q_proj,v_proj", r=R, k=5, **opts))
    units = t.units.of_kind("adapter")
    assert len(units) == 8 and len(t.method.modules) == 8
    for u in units:
        assert {next(x for x in p.split(".") if x.startswith(("lora_", "vera_"))) for p in u.param_names} == params, u
    step(t, collate(lm_examples(B, seq=S)))
    assert len(t.plan.update) == 5


def test_plots_and_options(tmp_path, one_thread):
    cfg = loop_cfg(max_steps=4, batch_size=B, max_length=S)
    t, _ = fit(causal_lm("llama"), build_method("dynalora", r=R, period=2), lm_examples(4 * B, seq=S), collate, cfg,
               out_dir=tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    files = type(t.method).plots(tmp_path, log)
    assert [f.name for f in files] == ["dynalora_active.png", "dynalora_active_steps.png"]
    assert all(f.stat().st_size > 0 for f in files)
    from dynatune.methods import config_help, METHODS
    opts = {n: d for n, d, _ in config_help(METHODS["dynalora"].Config)}
    assert opts["period"] == 50 and opts["allocator"] == "discounted-stochastic" and opts["fraction"] == 0.6667
    assert opts["optimisation"] == "global" and opts["importance"] == "forward"


def test_offload_keeps_only_active_modules_state_on_the_device(one_thread):
    """state_policy=offload: the device holds the AdamW state of this allocation's modules only."""
    method = build_method("dynalora", targets="q_proj,v_proj", r=R, k=3, period=1, state_policy="offload", seed=3)
    t = Tuner(causal_lm("llama"), method, lr=1e-2)
    data = lm_examples(6 * B, seq=S)
    offloaded = []
    for s in range(6):
        step(t, collate(data[s * B:(s + 1) * B]))
        active = [t.params[n] for n in t.units.param_names(t.plan.update)]
        assert t.record.optimizer == adam_state_bytes(active)
        offloaded.append(t.record.offloaded)
    assert len({tuple(h["update"]) for h in t.history}) > 1 and max(offloaded) > 0


def test_once_schedule_reallocates_at_the_start_and_after_once_after_steps():
    method = build_method("dynalora", schedule="once", once_after=5)
    assert [s for s in range(20) if method.reallocates(s)] == [0, 5]
    method = build_method("dynalora", period=4)
    assert [s for s in range(13) if method.reallocates(s)] == [0, 4, 8, 12]


def test_a_peft_model_handed_in_is_used_as_it_is(one_thread):
    from peft import LoraConfig as PeftLora, get_peft_model

    model = get_peft_model(causal_lm("llama"), PeftLora(r=2, target_modules=["k_proj", "o_proj"]))
    t = Tuner(model, build_method("dynalora", k=3))  # its own targets (q_proj, v_proj) are not injected
    assert t.model is model
    assert sorted(n.rsplit(".", 1)[-1] for n in t.method.modules) == ["k_proj"] * 4 + ["o_proj"] * 4
    step(t, collate(lm_examples(B, seq=S)))
    assert len(t.plan.update) == 3


def test_trainer_callback_matches_the_plain_loop_and_refuses_local(tmp_path, one_thread):
    from dynatune.errors import DynatuneError
    from dynatune.integrations.hf import DynatuneCallback, prepare
    from test_hf import loop_like_trainer

    cfg = loop_cfg(max_steps=6)
    data = lm_examples()
    opts = dict(targets="q_proj,v_proj", r=R, k=3, period=2, seed=1)
    loop_tuner, _ = fit(causal_lm(), build_method("dynalora", **opts), data, collate, cfg)
    method = build_method("dynalora", **opts)
    callback = DynatuneCallback(method)
    trainer = loop_like_trainer(prepare(causal_lm(), method), data, cfg, tmp_path, callback)
    trainer.train()
    assert len({tuple(h["update"]) for h in loop_tuner.history}) > 1  # reallocated within the run
    assert [h["update"] for h in callback.tuner.history] == [h["update"] for h in loop_tuner.history]
    assert [h["loss"] for h in callback.tuner.history] == [h["loss"] for h in loop_tuner.history]

    # local optimisation needs a group per unit: a stock Trainer's optimizer is refused in one sentence
    local = build_method("dynalora", optimisation="local", **opts)
    trainer = loop_like_trainer(prepare(causal_lm(), local), data, cfg, tmp_path / "local", DynatuneCallback(local))
    with pytest.raises(DynatuneError, match="use dynatune.integrations.hf.DynatuneTrainer"):
        trainer.train()


def local_trainer(tmp_path, data, cfg, opts, **args):
    """DynatuneTrainer building its own optimizer (split by unit) with the plain loop's settings."""
    from dynatune.integrations.hf import DynatuneCallback, prepare
    from test_hf import OrderedDynatuneTrainer, hf_args
    from dynatune.loop import epoch_order

    method = build_method("dynalora", optimisation="local", **opts)
    callback = DynatuneCallback(method)
    ordered = [data[i] for i in epoch_order(len(data), cfg.seed, 0)]
    targs = hf_args(tmp_path, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                    max_grad_norm=cfg.grad_clip, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                    warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), optim="adamw_torch", **args)
    return OrderedDynatuneTrainer(model=prepare(causal_lm(), method), args=targs, train_dataset=ordered,
                                  callbacks=[callback]), callback


def test_local_optimisation_in_dynatune_trainer_matches_the_plain_loop_and_resumes(tmp_path, one_thread):
    """DynatuneTrainer gives each adapter module optimizer groups of its own, so dynalora's local
    clocks drive them as in the plain loop: the same plans and losses (to float rounding of the
    Trainer's AdamW implementation), unlike the global schedule's; a resume from a checkpoint saved
    mid-run ends on the straight run's weights, bit for bit."""
    cfg = loop_cfg(max_steps=6)
    data = lm_examples()
    opts = dict(targets="q_proj,v_proj", r=R, k=3, period=2, seed=1)
    loop_local, _ = fit(causal_lm(), build_method("dynalora", optimisation="local", **opts), data, collate, cfg)
    loop_global, _ = fit(causal_lm(), build_method("dynalora", **opts), data, collate, cfg)
    trainer, callback = local_trainer(tmp_path / "straight", data, cfg, opts)
    trainer.train()
    assert len(callback.tuner._unit_groups) == 8  # 4 blocks x (q_proj, v_proj), each in groups of its own
    assert [h["update"] for h in callback.tuner.history] == [h["update"] for h in loop_local.history]
    ours = [h["loss"] for h in callback.tuner.history]
    assert ours == pytest.approx([h["loss"] for h in loop_local.history], rel=1e-5, abs=1e-6)
    assert ours[-1] != pytest.approx(loop_global.history[-1]["loss"], rel=1e-6)  # local clocks took effect

    first, _ = local_trainer(tmp_path / "resumed", data, cfg, opts, save_strategy="steps", save_steps=3)
    first.args.max_steps = 6
    first.train()  # saves checkpoint-3 and checkpoint-6; resume from 3
    resumed, rcb = local_trainer(tmp_path / "resumed", data, cfg, opts, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert [h["update"] for h in rcb.tuner.history][-3:] == [h["update"] for h in callback.tuner.history][-3:]
    for (n, a), (_, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch,how", [("bert", "blocks=top:2"), ("llama", "blocks=1,3"),
                                      ("llama", "peft layers_to_transform=[2, 3]")])
def test_adapters_on_some_blocks_are_priced_as_counted(arch, how, one_thread):
    """LoRA on some blocks only (`lora.blocks`, or a user's peft model with layers_to_transform):
    backward stops below the lowest adapted block, and the memory model prices exactly that. The
    probe once adapted its own few blocks by the target's block indices, so a plan of the top
    blocks was priced as if they carried no adapters (a 6-block MiniLM with top:1 at 25 KB of
    activations for 18 MB counted)."""
    targets = "query,value" if arch == "bert" else "q_proj,v_proj"
    make = (lambda: classifier("bert")) if arch == "bert" else (lambda: causal_lm("llama"))
    batch = collate(cls_examples(B, seq=PRICED_S)) if arch == "bert" else collate(lm_examples(B, seq=PRICED_S))
    model = make()
    if how.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=R, target_modules=targets.split(","), layers_to_transform=[2, 3]))
        method = build_method("lora", train_head=False)
    else:
        method = build_method("lora", targets=targets, r=R, train_head=False, blocks=how.split("=", 1)[1])
    t = Tuner(model, method)
    adapted = sorted({u.depth for u in t.units.of_kind("adapter")})
    assert adapted == {"blocks=top:2": [2, 3], "blocks=1,3": [1, 3]}.get(how, [2, 3])
    mm = MemoryModel.from_tuner(t, batch_shape=(B, PRICED_S), device_type="cpu")
    step(t, batch)
    pred = mm.predict(t.plan)
    assert (pred.weights, pred.gradients, pred.optimizer) == (t.record.weights, t.record.gradients,
                                                              t.record.optimizer)
    acts = pred.activations + pred.activations_outside
    assert abs(acts - t.record.activations) <= 0.02 * t.record.activations, (acts, t.record.activations)
    assert pred.block_states[:adapted[0]] == ["idle"] * adapted[0]  # below the lowest adapter: nothing saved


def test_blocks_option_names_valid_blocks():
    from dynatune.errors import DynatuneError
    from dynatune.methods.adapters import adapted_blocks
    assert adapted_blocks("all", 4) == {0, 1, 2, 3}
    assert adapted_blocks("top:1", 4) == {3}
    assert adapted_blocks("0,2", 4) == {0, 2}
    assert adapted_blocks("top:4", 4) == {0, 1, 2, 3}
    for bad in ("top:0", "top:5", "top:x", "4", "", "1,9"):
        with pytest.raises(DynatuneError, match="names no valid blocks"):
            adapted_blocks(bad, 4)
