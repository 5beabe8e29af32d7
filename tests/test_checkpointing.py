"""Activation checkpointing (gradient_checkpointing=true): priced by the memory model, and exact.

Tiny Llama (4 blocks, hidden 32), CPU, fp32. The plan trains the top half (block.2, block.3, norm):
with torch's non-reentrant checkpoint and no enable_input_require_grads hook, the frozen bottom
half runs below the backward path and keeps nothing; each trained block keeps only its input
(B x S x H fp32 = 4 x 12 x 32 x 4 = 6144 bytes).
"""
import json

import pytest
import torch

from dynatune.cli import main
from dynatune.config import load_config
from dynatune.loop import fit
from dynatune.memory import MemoryModel
from dynatune.methods import build_method
from dynatune.plan_mechanics import enable_checkpointing, input_grad_hooks_on

from scripted import plan, step, tuner
from tiny import causal_lm, collate, config, lm_examples, loop_cfg

B, S, H = 4, 12, 32
TOP_HALF = plan("block.2", "block.3", "norm")


def counted_after_one_step(model):
    t = tuner(model, TOP_HALF)
    step(t, collate(lm_examples(B, seq=S)))
    t.close_hooks()
    return t.peak


def test_checkpointing_saves_what_the_memory_model_says(one_thread):
    plain = counted_after_one_step(causal_lm("llama"))
    model = causal_lm("llama")
    enable_checkpointing(model)
    assert not input_grad_hooks_on(model)       # transformers turned it on; enable_checkpointing turned it off
    ck = counted_after_one_step(model)

    mm = MemoryModel.from_config(config("llama"), device_type="cpu", batch_shape=(B, S), gradient_checkpointing=True)
    pred = mm.predict(TOP_HALF)
    assert pred.block_states == ["idle", "idle", "first_update", "update"]
    # the two checkpointed blocks keep exactly their inputs; the bottom half keeps nothing
    assert pred.activations == 2 * B * S * H * 4 == 12288
    # counted bytes: weights, gradients and optimizer state exact, saved activations within 2%
    assert (ck.weights, ck.gradients, ck.optimizer) == (pred.weights, pred.gradients, pred.optimizer)
    counted_acts = pred.activations + pred.activations_outside
    assert abs(ck.activations - counted_acts) <= 0.02 * ck.activations, (ck.activations, counted_acts)
    # checkpointing changes only the saved activations, and saves most of them
    assert (ck.weights, ck.gradients, ck.optimizer) == (plain.weights, plain.gradients, plain.optimizer)
    assert ck.activations < 0.25 * plain.activations
    # the recomputed block is priced as a phase of the peak (not counted: it lives inside checkpoint's own hooks)
    assert pred.phases["backward_recompute"] > pred.phases["forward"]


def test_a_users_input_require_grads_hook_is_turned_off(one_thread, caplog):
    """enable_input_require_grads would put the frozen bottom half on the backward path: the tuner removes it."""
    model = causal_lm("llama")
    enable_checkpointing(model)
    model.enable_input_require_grads()
    assert input_grad_hooks_on(model)
    with caplog.at_level("WARNING"):
        ck = counted_after_one_step(model)
    assert not input_grad_hooks_on(model)
    assert "enable_input_require_grads" in caplog.text
    clean = causal_lm("llama")
    enable_checkpointing(clean)
    assert ck.activations == counted_after_one_step(clean).activations


@pytest.mark.parametrize("method,options", [("topk", dict(k=2)), ("trims", {})])
def test_checkpointing_trains_like_no_checkpointing(one_thread, method, options):
    """The same run with and without checkpointing: same plans, losses and weights (float tolerance)."""
    runs = []
    for ck in (False, True):
        cfg = loop_cfg(max_steps=6, max_length=S, gradient_checkpointing=ck, budget=None, margin=0.03)
        t, _ = fit(causal_lm("llama"), build_method(method, seed=0, **options), lm_examples(24, seq=S), collate, cfg)
        t.close_hooks()
        runs.append(t)
    a, b = runs
    assert [h["update"] for h in a.history] == [h["update"] for h in b.history]
    la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    moved = 0
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    for n, p in a.model.named_parameters():
        moved += not torch.equal(p, causal_lm("llama").get_parameter(n))
    assert moved > 0
    assert b.peak.activations < a.peak.activations


def test_train_accepts_gradient_checkpointing(tiny_llama_dir, tmp_path):
    cfg = load_config(None, ["gradient_checkpointing=true"])
    assert cfg.gradient_checkpointing is True
    run = tmp_path / "run"
    main(["train", f"model={tiny_llama_dir}", "task=dialog-sft", "data.max_train=16", "data.max_eval=4",
          "batch_size=4", "max_length=32", "max_steps=2", "progress=false", "method=topk", "topk.k=1",
          "budget=none", "gradient_checkpointing=true", "save_model=false", f"output_dir={run}"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2
    assert m["memory"]["counted_peak_terms"]["activations"] > 0


def trainer_run(tmp_path, **kw):
    from transformers import Trainer, TrainingArguments
    from dynatune.integrations.hf import DynatuneCallback

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no", eval_strategy="no",
                             disable_tqdm=True, logging_steps=1, **kw)
    cb = DynatuneCallback(build_method("topk", seed=0, k=2))
    model = causal_lm("llama")
    trainer = Trainer(model=model, args=args, train_dataset=lm_examples(16, seq=S), callbacks=[cb])
    trainer.train()
    cb.tuner.close_hooks()
    return trainer, cb, model


def test_trainer_checkpointing_trains_like_without_and_keeps_the_bottom_off_the_path(one_thread, tmp_path):
    plain, cb_plain, _ = trainer_run(tmp_path / "plain")
    ck, cb_ck, model = trainer_run(tmp_path / "ck", gradient_checkpointing=True)
    assert not input_grad_hooks_on(model)   # the Trainer turned it on; the callback's tuner turned it off
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, ck)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert cb_ck.tuner.peak.activations < 0.5 * cb_plain.tuner.peak.activations


def test_trainer_reentrant_checkpointing_is_refused(one_thread, tmp_path):
    from dynatune.errors import DynatuneError
    with pytest.raises(DynatuneError, match="use_reentrant"):
        trainer_run(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
