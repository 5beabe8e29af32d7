"""IST (shared/papers/004): suppression scales exactly the adapter delta, importance updates are eq. 9-10,
the importance forwards leave training untouched, all layers is plain LoRA, resume is exact, inactive
layers hold nothing, and N_u is checked against (or derived from) a budget."""
import json
import math

import pytest
import torch

from dynatune.cli import main
from dynatune.engine import Tuner
from dynatune.errors import DynatuneError
from dynatune.loop import fit, make_tuner
from dynatune.memory import BudgetError, MemoryModel
from dynatune.methods import build_method
from dynatune.plan import Plan

from scripted import adam_state_bytes, step
from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

B, S, R = 4, 12, 4
ADAPTERS = ["lora", "dora", "series", "parallel"]


def ist(**kw):
    kw.setdefault("r", R)
    kw.setdefault("bottleneck", 8)
    return build_method("ist", **kw)


def randomise_adapters(model, seed=5):
    """Adapters start as the identity (B = 0, up = 0): give every adapter weight a value so deltas are real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "adapter_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "magnitude" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


# -- eq. 8: suppression -----------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_suppression_is_base_plus_beta_times_the_adapter_delta(adapter):
    t = Tuner(causal_lm("llama"), ist(adapter=adapter, dropout=0.0))
    randomise_adapters(t.model)
    m = t.method
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    layer = m.layers[1]
    assert layer, "layer 1 has adapter units"
    for unit in layer:
        mod = m._module(unit)
        xin = x if mod.base_layer.in_features == 32 else torch.randn(2, 5, mod.base_layer.in_features)
        with torch.no_grad():
            adapted, base = mod(xin), mod.base_layer(xin)
            assert not torch.equal(adapted, base)  # the adapter answers something
            with m.suppress([unit], 0.25):
                out = mod(xin)
            assert torch.equal(out, base + 0.25 * (adapted - base))
            assert torch.equal(mod(xin), adapted)  # the hook is gone afterwards
            with m.suppress([unit], 0.0):
                assert torch.equal(mod(xin), base)  # beta = 0 drops the adapter
    if adapter == "lora":  # semantically: LoRA's delta is linear in its scaling, so beta scales it
        mod = m._module(layer[0])
        with torch.no_grad():
            with m.suppress([layer[0]], 0.25):
                out = mod(x if mod.base_layer.in_features == 32 else xin)
            for k in mod.scaling:
                mod.scaling[k] *= 0.25
            ref = mod(x if mod.base_layer.in_features == 32 else xin)
        assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_suppressing_every_layer_with_beta_zero_is_the_base_model(adapter):
    base = causal_lm("llama")
    t = Tuner(causal_lm("llama"), ist(adapter=adapter, dropout=0.0))
    randomise_adapters(t.model)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = t.model(input_ids=ids).logits
        with t.method.suppress([u for layer in t.method.layers for u in layer], 0.0):
            none = t.model(input_ids=ids).logits
        ref = base(input_ids=ids).logits
    assert not torch.allclose(adapted, ref, atol=1e-4)
    assert torch.allclose(none, ref, atol=1e-5)


# -- eq. 9-10: importance --------------------------------------------------------------------------
def test_importance_update_equals_hand_computation():
    t = Tuner(causal_lm("llama"), ist(mu=10.0))
    m = t.method
    sets, losses = [[0, 1], [1, 3], [2, 3]], [2.0, 1.5, 3.0]
    e = [math.exp(-v) for v in losses]
    mean = sum(e) / 3
    want = [0.0] * 4
    for S_, ej in zip(sets, e):
        for i in S_:
            want[i] += 10.0 * (ej - mean)
    m.update_importance(sets, losses)
    assert m.importance.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the set with the lowest loss gains: layer 1 is in it and in a worse set, layer 2 only in the worst one
    assert m.importance[1] > 0 > m.importance[2]
    m.update_importance(sets, losses)
    assert m.importance.tolist() == pytest.approx([2 * w for w in want], rel=1e-12, abs=1e-15)


def test_the_importance_loop_uses_the_losses_of_the_suppressed_forwards():
    """forwards(): N_c candidate sets of N_v layers, each loss from run() with the others suppressed."""
    t = Tuner(causal_lm("llama"), ist(n_c=3, n_v=2, beta=0.25, dropout=0.0))
    randomise_adapters(t.model)
    m = t.method
    batch = collate(lm_examples(B, seq=S))
    seen = []

    def run():
        with torch.no_grad():
            loss = float(t.model(**batch).loss)
        seen.append(loss)
        return loss
    before = m.importance.clone()
    g = m.generator.get_state()
    m.forwards(0, run)
    m.generator.set_state(g)
    sets = m.candidate_sets()
    assert sets == m.last_sets and all(len(s) == 2 for s in sets)
    for S_, loss in zip(sets, seen):  # each loss is the model with the layers outside S_ suppressed
        with torch.no_grad(), m.suppress([u for i in range(4) if i not in S_ for u in m.layers[i]], 0.25):
            assert float(t.model(**batch).loss) == loss
    m.importance = before
    m.update_importance(sets, seen)
    assert torch.equal(m.importance, t.method.importance)


# -- eq. 6-7: the fine-tuning loop -----------------------------------------------------------------
def test_draws_are_the_top_n_u_of_uniforms_scaled_by_sigmoid_importance():
    t = Tuner(causal_lm("llama"), ist(n_u=2))
    m = t.method
    m.importance = torch.tensor([3.0, -3.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    m.generator.manual_seed(0)
    for _ in range(20):
        p = torch.rand(4, generator=g, dtype=torch.float64) * torch.sigmoid(m.importance)
        want = sorted(torch.topk(p, 2).indices.tolist())
        assert m.draw() == want
    # a default run trains ceil(25%) of the layers; random selection draws uniformly and never scores
    assert Tuner(causal_lm("llama", num_hidden_layers=5), ist()).method.n_u == 2
    r = ist(selection="random")
    assert not r.wants_forwards(9)
    assert ist().wants_forwards(9) and not ist().wants_forwards(8) and not ist(t_c=0).wants_forwards(9)


def test_inverted_sampling_draws_training_layers_from_sigmoid_of_minus_importance():
    t = Tuner(causal_lm("llama"), ist(n_u=1, sampling="inverted"))
    m = t.method
    m.importance = torch.tensor([4.0, -4.0, 0.0, 0.0], dtype=torch.float64)
    m.generator.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        want = torch.multinomial(torch.sigmoid(-m.importance), 1, generator=g).tolist()
        assert m.draw() == want
    counts = [0] * 4
    for _ in range(400):
        counts[m.draw()[0]] += 1
    assert counts[1] > counts[2] > counts[0]  # the least important layer trains most


# -- the importance forwards leave training alone ---------------------------------------------------
def test_extra_forwards_leave_rng_weights_state_and_modes_alone():
    t = Tuner(causal_lm("llama"), ist(dropout=0.1, t_c=1))
    batch = collate(lm_examples(B, seq=S))
    step(t, batch)
    t.model.model.layers[2].eval()  # a module the user put in eval mode stays so
    params = {n: p.detach().clone() for n, p in t.params.items()}
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in t.optimizer.state.items()}
    rng = torch.get_rng_state()
    calls = []

    def loss():
        calls.append([m.training for m in t.model.modules()])
        assert not torch.is_grad_enabled()
        torch.rand(3)  # a draw inside the forwards does not reach the training step's RNG
        return t.model(**batch).loss
    t.extra_forwards(loss)
    assert len(calls) == t.method.config.n_c and not any(any(c) for c in calls)  # dropout off in all
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, params[n]) for n, p in t.params.items())
    assert all(torch.equal(v, state[k][n]) for k, s in t.optimizer.state.items() for n, v in s.items())
    assert not t.model.model.layers[2].training and t.model.model.layers[1].training
    assert all(p.grad is None for p in t.params.values())


def test_every_layer_with_the_importance_loop_on_equals_plain_lora_bit_for_bit():
    """N_u = all layers: the draws do not matter, and the importance forwards (every step, with adapter
    dropout on) change no weight, no optimizer state, no data order and no dropout mask."""
    cfg = loop_cfg(max_steps=6, batch_size=B, max_length=S)
    opts = dict(r=R, alpha=8.0, dropout=0.1, targets="q_proj,v_proj,down_proj")
    a, _ = fit(causal_lm("llama"), build_method("lora", **opts), lm_examples(6 * B, seq=S), collate, cfg)
    for t_c in (0, 1):
        b, _ = fit(causal_lm("llama"), build_method("ist", n_u=4, t_c=t_c, **opts), lm_examples(6 * B, seq=S),
                   collate, cfg)
        assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
        for n, p in a.params.items():
            assert torch.equal(p, b.params[n]), n
        assert (b.method.importance != 0).any() == bool(t_c)


def test_importance_forwards_change_nothing_of_a_partial_run():
    """A run with the importance loop every step and one without it, forced to the same plans: same
    losses, weights and optimizer state (dropout on, so the global RNG is compared too)."""
    cfg = loop_cfg(max_steps=6, batch_size=B, max_length=S)
    data = lm_examples(6 * B, seq=S)
    a, _ = fit(causal_lm("llama"), ist(n_u=2, t_c=1, dropout=0.1, mu=100.0), data, collate, cfg)
    drawn = [h["method_log"]["active_layers"] for h in a.history]
    assert len({tuple(d) for d in drawn}) > 1
    forced = ist(n_u=2, t_c=0, dropout=0.1)
    it = iter(drawn)
    forced.draw = lambda: list(next(it))
    b, _ = fit(causal_lm("llama"), forced, data, collate, cfg)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["update"] for h in a.history] == [h["update"] for h in b.history]
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
    for n, p in a.params.items():  # AdamW's moments and step, parameter by parameter
        sa, sb = a.optimizer.state.get(p, {}), b.optimizer.state.get(b.params[n], {})
        assert sa.keys() == sb.keys(), n
        assert all(torch.equal(sa[k], sb[k]) for k in sa), n


# -- memory: inactive layers hold nothing; predicted == counted ---------------------------------------
def test_inactive_layers_get_no_gradient_and_no_state_and_are_priced_as_counted():
    model = causal_lm("llama")
    t = make_tuner(model, ist(n_u=1, t_c=2, state_policy="drop"),
                   loop_cfg(batch_size=B, max_length=S, budget=None, margin=0.03), torch.device("cpu"))
    mm = MemoryModel.from_tuner(t, batch_shape=(B, S), device_type="cpu")
    batch = collate(lm_examples(B, seq=S))
    seen = []

    def inspect(t):
        active = set(t.units.param_names(t.plan.update))
        for n, p in t.candidate_params.items():
            assert (p.grad is not None) == (n in active), n
            assert (p in t.optimizer.state) == (n in active), n
        pred = mm.predict(t.plan)
        seen.append(t.method.active[:])
        assert t.record.gradients == pred.gradients == sum(p.numel() * 4 for n, p in t.params.items() if n in active)
        assert t.record.optimizer == pred.optimizer == adam_state_bytes([t.params[n] for n in active])
        assert abs(pred.activations + pred.activations_outside - t.record.activations) <= 0.02 * t.record.activations
    for _ in range(4):
        step(t, batch, inspect)
    assert len({tuple(s) for s in seen}) > 1


def test_extra_forwards_are_priced_in_the_predicted_peak():
    cfg = loop_cfg(batch_size=B, max_length=S, budget="1.0", margin=0.03)
    t = make_tuner(causal_lm("llama"), ist(n_u=1), cfg, torch.device("cpu"))
    plan = t.method.plan_of([3])
    train = t.predict(plan).predicted_peak_bytes
    fwd = t.extra_forward_peak(plan)
    assert fwd == t.memory_model.predict_eval(B, S, plan)["predicted_peak_bytes"]
    assert t.predict_peak(plan) == max(train, fwd)


def test_n_u_from_a_budget_is_the_largest_whose_worst_plan_fits():
    cfg = loop_cfg(batch_size=B, max_length=S, budget=None, margin=0.03)
    probe = make_tuner(causal_lm("llama"), ist(n_u=1), cfg, torch.device("cpu"))
    mm = MemoryModel.from_tuner(probe, batch_shape=(B, S), device_type="cpu")
    probe.set_budget(mm, 10**12)
    peaks = [probe.predict_peak(probe.method.worst_plan(n, 0)) for n in (1, 2, 3, 4)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    budget = int((peaks[1] + peaks[2]) / 2 / 0.97)
    t = make_tuner(causal_lm("llama"), ist(n_u=None, fraction=None),
                   loop_cfg(batch_size=B, max_length=S, budget=f"{budget}B", margin=0.03), torch.device("cpu"))
    t.begin_step()
    usable = t.usable_budget
    # by hand: per lowest depth d, the most layers at or above d whose worst plan fits; the best d (lowest on ties)
    fits = {d: max([n for n in range(1, 5 - d) if probe.predict_peak(probe.method.worst_plan(n, d)) <= usable],
                   default=0) for d in range(4)}
    best = max(fits.values())
    assert (t.method.n_u, t.method.lowest_depth) == (best, min(d for d in fits if fits[d] == best))
    assert fits[0] == 2 and best >= 2
    assert t.predict_peak(t.plan) <= t.usable_budget
    assert all(probe.units[u].depth >= t.method.lowest_depth for u in t.plan.update if u != "head")
    # a given N_u that cannot fit anywhere is refused before training (set_budget asks for the largest plan)
    with pytest.raises(BudgetError, match="do not fit the budget") as err:
        make_tuner(causal_lm("llama"), ist(n_u=4),
                   loop_cfg(batch_size=B, max_length=S, budget=f"{budget}B", margin=0.03), torch.device("cpu"))
    assert err.value.predicted_bytes > usable


# -- resume ------------------------------------------------------------------------------------------
def test_train_n_equals_half_save_resume_half(tmp_path):
    steps = 8
    cfg = loop_cfg(max_steps=steps, batch_size=B, max_length=S, checkpoint_every=steps // 2, keep_checkpoints=5)
    data = lm_examples(steps * B, seq=S)
    opts = dict(r=R, n_u=2, t_c=3, dropout=0.1, mu=100.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = fit(causal_lm("llama"), ist(seed=4, **opts), data, collate, cfg, out_dir=tmp_path / "a")
    cfg_b = loop_cfg(**{**vars(cfg), "resume": str(tmp_path / "a" / "checkpoints" / f"step-{steps // 2}")})
    b, _ = fit(causal_lm("llama", seed=7), ist(seed=99, **opts), data, collate, cfg_b, out_dir=tmp_path / "b")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["method_log"] for h in a.history] == [h["method_log"] for h in b.history]
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert torch.equal(sa["importance"], sb["importance"]) and torch.equal(sa["generator"], sb["generator"])
    assert (sa["importance"] != 0).any()


def test_cli_resume_equals_the_straight_run(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dynatune.loop.plot_run", lambda run_dir: [])
    args = [f"model={tiny_bert_dir}", "task=trec", "data.max_train=32", "data.max_eval=8", "batch_size=4",
            "max_length=24", "progress=false", "lr=3e-3", "method=ist", "ist.r=4", "ist.t_c=3", "ist.n_u=1",
            "max_steps=8", "checkpoint_every=8", "save_model=false"]
    assert main(["train", *args, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["train", *args, f"output_dir={tmp_path / 'b'}", "stop_after=5"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["method_log"] for r in la] == [r["method_log"] for r in lb]
    assert any("candidate_losses" in r["method_log"] for r in lb[5:])


# -- a peft model in a stock Trainer ----------------------------------------------------------------
def test_a_peft_model_in_the_trainer_callback_matches_the_plain_loop(tmp_path):
    from peft import LoraConfig as PeftLora, get_peft_model

    from dynatune.integrations.hf import DynatuneCallback, prepare
    from test_hf import loop_like_trainer

    cfg = loop_cfg(max_steps=6)
    data = lm_examples()
    opts = dict(n_u=2, t_c=2, seed=1, mu=100.0)

    def peft_model():
        return get_peft_model(causal_lm(), PeftLora(r=2, target_modules=["q_proj", "down_proj"]))
    loop_tuner, _ = fit(peft_model(), ist(**opts), data, collate, cfg)
    method = ist(**opts)
    callback = DynatuneCallback(method)
    trainer = loop_like_trainer(prepare(peft_model(), method), data, cfg, tmp_path, callback)
    trainer.train()
    assert sorted({n.rsplit(".", 1)[-1] for n in method.units.by_name if n != "head"}) == ["down_proj", "q_proj"]
    assert [h["update"] for h in callback.tuner.history] == [h["update"] for h in loop_tuner.history]
    assert [h["loss"] for h in callback.tuner.history] == [h["loss"] for h in loop_tuner.history]
    assert torch.equal(method.importance, loop_tuner.method.importance) and (method.importance != 0).any()


# -- options, plots ------------------------------------------------------------------------------------
def test_bad_options_are_one_sentence():
    for kw, msg in ((dict(beta=1.5), "beta"), (dict(sampling="x"), "sampling"), (dict(selection="x"), "selection"),
                    (dict(adapter="x"), "adapter"), (dict(t_c=-1), "t_c")):
        with pytest.raises(DynatuneError, match=msg):
            ist(**kw)
    with pytest.raises(DynatuneError, match="n_u=9"):
        Tuner(causal_lm("llama"), ist(n_u=9))


def test_plot_of_importance_over_steps(tmp_path):
    cfg = loop_cfg(max_steps=4, batch_size=B, max_length=S)
    t, _ = fit(causal_lm("llama"), ist(t_c=2), lm_examples(4 * B, seq=S), collate, cfg)
    files = t.method.plots(tmp_path, t.history)
    assert [f.name for f in files] == ["ist_importance.png"] and files[0].stat().st_size > 0


def test_an_out_of_memory_retry_keeps_the_importance_forwards_exact(monkeypatch):
    """Every step's first attempt runs a forward (dropout draws its masks) and then runs out of memory:
    the retried steps, with the importance loop every step on the same examples, equal a run that split
    every batch in two from the start (losses, importance, weights)."""
    import dynatune.loop as loop

    real = loop._forward_backward

    def flaky(model, micro_batches, cfg, device, *rest):
        if len(micro_batches[0]["labels"]) > B // 2:
            model(**micro_batches[0])  # the failed attempt drew dropout masks from the global RNG
            raise torch.OutOfMemoryError("injected")
        return real(model, micro_batches, cfg, device, *rest)

    data = lm_examples(4 * B, seq=S)
    opts = dict(n_u=2, t_c=1, dropout=0.1, mu=100.0, seed=3)
    split, _ = fit(causal_lm("llama"), ist(**opts), data, collate, loop_cfg(max_steps=4, batch_size=B, grad_accum=2))
    monkeypatch.setattr(loop, "_forward_backward", flaky)
    retried, _ = fit(causal_lm("llama"), ist(**opts), data, collate, loop_cfg(max_steps=4, batch_size=B))
    assert all(h["oom_retries"] == 1 for h in retried.history)
    assert [h["loss"] for h in split.history] == [h["loss"] for h in retried.history]
    assert [h["method_log"] for h in split.history] == [h["method_log"] for h in retried.history]
    assert torch.equal(split.method.importance, retried.method.importance)
    for n, p in split.params.items():
        assert torch.equal(p, retried.params[n]), n
