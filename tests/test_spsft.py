"""SPSFT (shared/papers/002): importance against hand computations, the calibration phase, the
selection, resume, the budget's r, and what trains (only the selected rows)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynatune.calibration import draw
from dynatune.engine import Tuner
from dynatune.errors import DynatuneError
from dynatune.loop import fit, run_calibration
from dynatune.memory import MemoryModel, usable_budget
from dynatune.methods import build_method
from dynatune.modules import row_delta_modules

from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
S = 12


def targets(model):
    from dynatune.methods.adapters import target_linears
    return target_linears(model, "all-linear")


# -- importance --------------------------------------------------------------------------------------
def test_l2_selects_the_rows_of_largest_norm():
    model = causal_lm("llama")
    norms = {n: m.weight.detach().norm(dim=1).tolist() for n, m in targets(model).items()}
    method = build_method("spsft", r=3)
    Tuner(model, method)
    for n, rows in method.selection.items():
        by_hand = sorted(range(len(norms[n])), key=lambda i: (-norms[n][i], i))[:3]
        assert rows == sorted(by_hand), n


def _calibrated(importance, n=12, micro=4, **kw):
    """A tiny BERT classifier calibrated by the loop's phase; returns (method, model, the drawn examples)."""
    model = classifier("bert", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = cls_examples(40, seq=S)
    method = build_method("spsft", r=2, importance=importance, calibration_examples=n, **kw)
    cfg = loop_cfg(batch_size=micro, max_length=S)
    run_calibration(model, method, data, collate, cfg, torch.device("cpu"))
    return method, model, [data[i] for i in draw(len(data), n, cfg.seed)]


def _grads(model, examples):
    """Each target weight's gradient of the mean loss over `examples`, example by example."""
    lins = targets(model)
    total = {n: torch.zeros_like(m.weight) for n, m in lins.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lins.values():
        m.weight.requires_grad_(True)
    model.eval()
    for e in examples:
        loss = model(**collate([e])).loss
        gs = torch.autograd.grad(loss, [m.weight for m in lins.values()])
        for n, g in zip(lins, gs):
            total[n] += g / len(examples)
    return total


def _taylor_by_hand(model, examples):
    lins = targets(model)
    return {n: (g * lins[n].weight.detach()).abs().sum(1).double() for n, g in _grads(model, examples).items()}


def test_taylor_is_appendix_a_sum_over_the_row_of_abs_mean_gradient_times_weight():
    method, model, examples = _calibrated("taylor")
    want = _taylor_by_hand(model, examples)
    assert set(method.scores) == set(want)
    for n in want:
        torch.testing.assert_close(method.scores[n], want[n], rtol=1e-5, atol=1e-9)
    # layer by layer (one block's gradients at a time) gives the same scores
    layerwise, _, _ = _calibrated("taylor", layerwise=True)
    for n in want:
        torch.testing.assert_close(layerwise.scores[n], method.scores[n], rtol=1e-6, atol=1e-12)
    # and the rows trained are the top-2 of these scores
    Tuner(model, method)
    for n, rows in method.selection.items():
        s = want[n].tolist()
        assert rows == sorted(sorted(range(len(s)), key=lambda i: (-s[i], i))[:2])


def test_streaming_taylor_sums_each_micro_batch_by_its_share():
    method, model, examples = _calibrated("taylor", streaming=True)
    lins = targets(model)
    want = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in lins.items()}
    for i in range(0, len(examples), 4):
        part = examples[i:i + 4]
        for n, g in _grads(model, part).items():
            want[n] += (len(part) / len(examples)) * (g * lins[n].weight.detach()).abs().sum(1).double()
    for n in want:
        torch.testing.assert_close(method.scores[n], want[n], rtol=1e-5, atol=1e-9)
    plain, _, _ = _calibrated("taylor")
    assert any(not torch.allclose(plain.scores[n], want[n]) for n in want)  # |mean g w| != mean |g w|


def test_qm_taylor_is_the_mean_of_eleven_quantiles_of_class_wise_taylor():
    method, model, examples = _calibrated("qm-taylor", n=18)
    classes = sorted({int(e["labels"]) for e in examples})
    assert len(classes) == 3
    per_class = [_taylor_by_hand(model, [e for e in examples if int(e["labels"]) == t]) for t in classes]
    for n in per_class[0]:
        stack = np.stack([pc[n].numpy() for pc in per_class])
        want = np.quantile(stack, np.linspace(0, 1, 11), axis=0).mean(0)  # eq. 7
        np.testing.assert_allclose(method.scores[n].numpy(), want, rtol=1e-5, atol=1e-9)


def test_qm_taylor_needs_classes():
    model = causal_lm("llama")
    method = build_method("spsft", r=2, importance="qm-taylor", calibration_examples=4)
    with pytest.raises(DynatuneError, match="qm-taylor needs class labels"):
        run_calibration(model, method, lm_examples(8, seq=S), collate, loop_cfg(max_length=S), torch.device("cpu"))


# -- the calibration phase -----------------------------------------------------------------------------
def test_calibration_leaves_the_run_as_it_was():
    """Global RNG, weights, requires_grad, gradients and train mode are as before the phase."""
    model = classifier("bert", num_labels=3)  # dropout on: the phase must not draw from the run's RNG
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    method = build_method("spsft", r=2, importance="taylor", calibration_examples=8)
    run_calibration(model, method, cls_examples(20, seq=S), collate, loop_cfg(max_length=S), torch.device("cpu"))
    assert method.calibrated and method.scores
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n], n


def test_taylor_without_calibration_is_refused():
    with pytest.raises(DynatuneError, match="calibration"):
        Tuner(causal_lm("llama"), build_method("spsft", r=2, importance="taylor"))


def test_a_budget_lowers_the_calibration_micro_batch():
    """Under a budget the phase runs with the largest micro-batch whose price (backward through every
    block, every target's gradient, no optimizer state) fits; the run's own batch does not."""
    model = causal_lm("llama")
    data = lm_examples(32, seq=S)
    seen = {}
    method = build_method("spsft", r=4, importance="taylor", calibration_examples=16)
    real = method.calibrate

    def spy(m, calibration):
        seen["c"] = calibration
        real(m, calibration)
    method.calibrate = spy
    probe_cfg = loop_cfg(batch_size=16, max_length=S, budget="1000GB", margin=0.03)
    run_calibration(model, method, data, collate, probe_cfg, torch.device("cpu"))
    c = seen["c"]
    names = method.calibration_gradients(model)[0]
    p16, p4 = c.price(names, 16), c.price(names, 4)
    assert p4 < p16
    budget = math.ceil((p4 + (p16 - p4) // 8) / 0.97)  # room for 4 (or a bit more), not for 16 or 8
    cfg = loop_cfg(batch_size=16, max_length=S, budget=f"{budget}B", margin=0.03)
    run_calibration(causal_lm("llama"), method, data, collate, cfg, torch.device("cpu"))
    c = seen["c"]
    assert c.micro_batch == 4 and c.price(names, 4) <= c.usable < c.price(names, 8)
    from dynatune.errors import BudgetError
    with pytest.raises(BudgetError, match="calibration phase is predicted at .* even with micro-batches of one"):
        run_calibration(causal_lm("llama"), method, data, collate,
                        loop_cfg(batch_size=16, max_length=S, budget="1000B", margin=0.03), torch.device("cpu"))


# -- selection ----------------------------------------------------------------------------------------
def test_random_selection_is_a_function_of_the_seed():
    def rows(seed):
        method = build_method("spsft", r=5, importance="random", seed=seed)
        Tuner(causal_lm("llama"), method)
        return method.selection
    assert rows(3) == rows(3)
    assert rows(3) != rows(4)
    # the memory model's probe builds its own small model through prepare_model: the run's rows stay
    method = build_method("spsft", r=5, importance="random", seed=3)
    t = Tuner(causal_lm("llama"), method)
    MemoryModel.from_tuner(t, batch_shape=(2, S), device_type="cpu").predict(t.plan or method.plan(0))
    assert {n: m.spsft_rows.tolist() for n, m in row_delta_modules(t.model).items()} == rows(3)


def test_fa_mode_trains_mlp_rows_only():
    method = build_method("spsft", r=4, freeze_attention=True)
    t = Tuner(causal_lm("llama"), method)
    kinds = {u.name.split(".", 2)[2] for u in t.units.of_kind("adapter")}
    assert kinds == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


# -- training ----------------------------------------------------------------------------------------
def test_only_the_selected_rows_move():
    model = causal_lm("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("spsft", r=3, importance="random", seed=1)
    t, _ = fit(model, method, lm_examples(12, seq=S), collate, loop_cfg(max_length=S, max_steps=3, lr=1e-2))
    t.close_hooks()
    for n, p in t.params.items():
        if "spsft_delta" in n:
            assert p.abs().sum() > 0 and p.grad is None, n
        else:
            assert torch.equal(p, w0[n]), n  # W, norms, embeddings: untouched
    from dynatune.modules import unwrap_all
    merged = dict(unwrap_all(t.model).named_parameters())
    for n, rows in method.selection.items():
        w = merged[f"{n}.weight"]
        other = [i for i in range(w.shape[0]) if i not in rows]
        assert torch.equal(w[other], w0[f"{n}.weight"][other])
        assert not torch.equal(w[rows], w0[f"{n}.weight"][rows])


def test_saved_activations_and_trainable_bytes_priced_as_counted():
    """predicted weights, gradients and optimizer state equal the counted bytes; activations within 2%."""
    method = build_method("spsft", r=5)
    cfg = loop_cfg(max_length=S, max_steps=2, batch_size=4)
    t, _ = fit(causal_lm("llama"), method, lm_examples(8, seq=S), collate, cfg)
    pred = MemoryModel.from_tuner(t, batch_shape=(4, S), device_type="cpu").predict(t.plan)
    rec = t.record
    assert (pred.weights, pred.gradients, pred.optimizer) == (rec.weights, rec.gradients, rec.optimizer)
    n_delta = sum(p.numel() for n, p in t.params.items() if "spsft_delta" in n)
    assert rec.gradients == 4 * n_delta and pred.trainable_params == n_delta
    acts = pred.activations + pred.activations_outside
    assert abs(acts - rec.activations) <= 0.02 * rec.activations
    t.close_hooks()


@pytest.mark.parametrize("importance", ["taylor", "random"])
def test_train_n_equals_half_save_resume_half(importance, tmp_path):
    steps, B = 6, 3
    cfg = loop_cfg(max_steps=steps, batch_size=B, max_length=S, checkpoint_every=steps // 2, keep_checkpoints=5)
    data = cls_examples(steps * B, seq=S)
    opts = dict(r=3, importance=importance, calibration_examples=6)
    (tmp_path / "b").mkdir()
    a, _ = fit(classifier("bert"), build_method("spsft", seed=4, **opts), data, collate, cfg, out_dir=tmp_path)
    cfg_b = loop_cfg(**{**vars(cfg), "resume": str(tmp_path / "checkpoints" / f"step-{steps // 2}")})
    # a resumed run from another draw of the base (its own importance would pick other rows): the
    # checkpoint's rows and W_f win
    b, _ = fit(classifier("bert", seed=7), build_method("spsft", seed=99, **opts), data, collate, cfg_b,
               out_dir=tmp_path / "b")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.method.selection == b.method.selection
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
    for n, m in row_delta_modules(a.model).items():
        assert torch.equal(m.spsft_rows, row_delta_modules(b.model)[n].spsft_rows)


# -- the budget's r --------------------------------------------------------------------------------------
def _peak(r, shape):
    method = build_method("spsft", r=r)
    t = Tuner(causal_lm("llama"), method)
    mm = MemoryModel.from_tuner(t, batch_shape=shape, device_type="cpu", grad_accum=1)
    p = mm.predict(method.plan(0)).predicted_peak_bytes
    t.close_hooks()
    return p


def test_r_from_a_budget_is_the_largest_that_fits():
    shape = (4, S)
    lo, hi = _peak(5, shape), _peak(6, shape)
    assert lo < hi
    budget = math.ceil((lo + (hi - lo) // 2) / 0.97)
    method = build_method("spsft", r=None)
    cfg = loop_cfg(batch_size=4, max_length=S, max_steps=1, budget=f"{budget}B", margin=0.03)
    t, _ = fit(causal_lm("llama"), method, lm_examples(8, seq=S), collate, cfg)
    assert method.r == 5
    assert t.predict_peak(t.plan) <= usable_budget(budget, 0.03) < hi
    assert max(m.r for m in row_delta_modules(t.model).values()) == 5
    t.close_hooks()


def test_bad_options_are_one_sentence():
    for kw, what in ((dict(importance="hessian"), "importance"), (dict(ratio=1.5), "ratio"),
                     (dict(export="zip"), "export"), (dict(r=0), "r=0")):
        with pytest.raises(DynatuneError, match=what):
            build_method("spsft", **kw)
    with pytest.raises(DynatuneError, match="r and ratio are both null"):
        Tuner(causal_lm("llama"), build_method("spsft", r=None))


def test_trainer_callback_with_calibration_matches_the_plain_loop(tmp_path):
    """integrations.hf.prepare runs the same calibration phase: same rows, same losses as loop.fit."""
    from dynatune.integrations.hf import DynatuneCallback, prepare
    from test_hf import loop_like_trainer

    cfg = loop_cfg(max_steps=4, max_length=S)
    data = lm_examples(16, seq=S)
    opts = dict(r=3, importance="taylor", calibration_examples=8, seed=1)
    loop_tuner, _ = fit(causal_lm(), build_method("spsft", **opts), data, collate, cfg)
    method = build_method("spsft", **opts)
    with pytest.raises(DynatuneError, match="train_dataset and data_collator"):
        prepare(causal_lm(), build_method("spsft", **opts))
    model = prepare(causal_lm(), method, data, collate, batch_size=cfg.batch_size, seed=cfg.seed)
    callback = DynatuneCallback(method)
    loop_like_trainer(model, data, cfg, tmp_path, callback).train()
    assert method.selection == loop_tuner.method.selection
    assert [h["loss"] for h in callback.tuner.history] == [h["loss"] for h in loop_tuner.history]


# -- dependency groups (appendix B) ----------------------------------------------------------------------
def test_dependencies_train_the_columns_a_selected_row_feeds():
    """BERT's groups by hand: a block's intermediate rows feed that block's output.dense columns (the MLP
    dimension); the rows of every attention.output.dense and output.dense (the residual stream) feed
    the hidden columns of every query/key/value/intermediate. Only x is still saved, and the columns
    are priced and counted alike."""
    pytest.importorskip("torch_pruning")
    method = build_method("spsft", r=3, importance="random", seed=2, dependencies=True)
    t = Tuner(classifier("bert"), method)
    mods = {n.split("encoder.layer.")[1]: m for n, m in row_delta_modules(t.model).items()}
    residual = set()
    for k, m in mods.items():
        if k.endswith("attention.output.dense") or (k.endswith("output.dense") and "attention" not in k):
            residual |= set(m.spsft_rows.tolist())
    for i in range(4):
        assert mods[f"{i}.output.dense"].cols.tolist() == mods[f"{i}.intermediate.dense"].spsft_rows.tolist()
        for k in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            assert set(mods[f"{i}.{k}"].cols.tolist()) == residual, (i, k)
    cfg = loop_cfg(max_length=S, max_steps=2, batch_size=4)
    t.close_hooks()
    method = build_method("spsft", r=3, importance="random", seed=2, dependencies=True)
    t, _ = fit(classifier("bert"), method, cls_examples(8, seq=S), collate, cfg)
    pred = MemoryModel.from_tuner(t, batch_shape=(4, S), device_type="cpu").predict(t.plan)
    rec = t.record
    assert (pred.weights, pred.gradients, pred.optimizer) == (rec.weights, rec.gradients, rec.optimizer)
    assert abs(pred.activations + pred.activations_outside - rec.activations) <= 0.02 * rec.activations
    assert all(t.params[n].abs().sum() > 0 for n in t.params if "spsft_col_delta" in n)
    t.close_hooks()


def test_dependencies_without_torch_pruning_is_one_sentence(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tp(name, *a, **k):
        if name == "torch_pruning":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tp)
    with pytest.raises(DynatuneError, match=r"torch-pruning, which is not installed; install it with pip install"):
        Tuner(causal_lm("llama"), build_method("spsft", r=2, dependencies=True))


def test_every_row_selected_trains_as_full_finetuning_of_the_linears():
    """r >= every d_out: spsft through the loop equals a plain PyTorch loop that trains exactly the
    blocks' linear weights (same AdamW, schedule, clipping, data order): losses and the merged weights
    agree to 1e-5 (float rounding of W0 + summed updates against updates applied to W)."""
    from dynatune.loop import epoch_order, linear_schedule
    from dynatune.modules import unwrap_all

    cfg = loop_cfg(max_length=S, max_steps=4, batch_size=4, lr=1e-2)
    data = lm_examples(16, seq=S)
    t, _ = fit(causal_lm("llama"), build_method("spsft", r=10_000), data, collate, cfg)
    t.close_hooks()
    merged = dict(unwrap_all(t.model).named_parameters())

    model = causal_lm("llama")
    lin = [m.weight for m in targets(model).values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in lin:
        w.requires_grad_(True)
    opt = torch.optim.AdamW(lin, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = linear_schedule(opt, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    order = epoch_order(len(data), cfg.seed, 0)
    torch.manual_seed(cfg.seed)
    model.train()
    losses = []
    for step in range(cfg.max_steps):
        batch = collate([data[i] for i in order[step * 4:(step + 1) * 4]])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lin, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert [h["loss"] for h in t.history] == pytest.approx(losses, abs=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(merged[n], p.detach(), rtol=0, atol=1e-5)
