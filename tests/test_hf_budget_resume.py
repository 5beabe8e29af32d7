"""The Trainer callback keeps the CLI's promises: budgets, exact resume, no silent full fine-tuning.

Each resume test runs the same Trainer twice: straight through, and stopped after a checkpoint,
then resumed by a new model, method, callback and Trainer. Losses, plans and final weights must be
equal, bit for bit.
"""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import dynatune
from dynatune.errors import DynatuneError
from dynatune.integrations.hf import STATE_FILE, DynatuneCallback, prepare
from dynatune.memory import BudgetError
from dynatune.methods import Method, build_method
from dynatune.plan import Plan

from tiny import causal_lm, lm_examples

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SAVE_AT = 8, 4


def args_for(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
                warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                seed=0, data_seed=0, save_strategy="steps", save_steps=SAVE_AT, eval_strategy="no",
                disable_tqdm=True, dataloader_drop_last=True)
    base.update(kw)
    return TrainingArguments(**base)


class StopAt(TrainerCallback):
    """Ends training after step `step` (its checkpoint is written first): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class ExitOnEvenSteps(Method):
    """Trains block 1 and the final norm; on even steps the forward exits after block 2 (of 4)."""

    name = "test-exit"

    def plan(self, step):
        return Plan.of({"block.1", "norm"}, exit_depth=2 if step % 2 == 0 else None)


METHODS = {
    # tau=2 puts a decision on the checkpoint's step; at 90% the window can grow on this tiny model
    "trims": lambda: build_method("trims", budget=0.9, tau=2, exits="on", seed=0),
    "adagradselect": lambda: build_method("adagradselect", k=0.5, seed=0),  # state offloaded to host
    "lisa": lambda: build_method("lisa", k=1, period=3, seed=0),
    "exit": lambda: ExitOnEvenSteps(seed=0),
}


def train(out, make_method, stop_at=None, resume=None):
    model = causal_lm()
    method = make_method()
    model = prepare(model, method)
    callback = DynatuneCallback(method)
    extra = [StopAt(stop_at)] if stop_at else []
    trainer = Trainer(model=model, args=args_for(out), train_dataset=lm_examples(), callbacks=[callback, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return model, callback


def plans(callback):
    return [(tuple(h["update"]), h["exit_depth"]) for h in callback.tuner.history]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainer_resume_equals_straight_run(tmp_path, name):
    straight_model, straight = train(tmp_path / "straight", METHODS[name])
    train(tmp_path / "cut", METHODS[name], stop_at=SAVE_AT)
    ckpt = tmp_path / "cut" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / STATE_FILE).is_file()
    resumed_model, resumed = train(tmp_path / "cut", METHODS[name], resume=str(ckpt))

    assert len(resumed.tuner.history) == STEPS
    assert [h["loss"] for h in resumed.tuner.history] == [h["loss"] for h in straight.tuner.history]
    assert plans(resumed) == plans(straight)
    if name == "trims":  # a decision was taken on the checkpoint's step, and more after it
        actions = [h["method_log"].get("action") for h in straight.tuner.history]
        assert actions[SAVE_AT - 1] is not None and sum(a is not None for a in actions) == STEPS // 2
        assert len(set(plans(straight))) > 1
    if name == "exit":
        assert plans(straight)[SAVE_AT - 1][1] is None and plans(straight)[SAVE_AT][1] == 2
    straight.tuner.close()
    resumed.tuner.close()
    for (n, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n


def test_checkpoint_during_an_exit_holds_the_whole_model(tmp_path):
    # step 4 (index 3) is odd: no exit; save at step 3 instead, whose plan (index 2) exits after block 2
    method = ExitOnEvenSteps(seed=0)
    model = prepare(causal_lm(), method)
    callback = DynatuneCallback(method)
    trainer = Trainer(model=model, args=args_for(tmp_path, max_steps=3, save_steps=3), train_dataset=lm_examples(),
                      callbacks=[callback])
    trainer.train()
    assert callback.tuner.plan.exit_depth == 2  # the last step ran with an exit
    ckpt = tmp_path / "checkpoint-3"
    saved = load_file(ckpt / "model.safetensors")
    assert {f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)} <= set(saved)
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == 4
    # after the save, training state is as it was: the exit is still in place
    assert len(model.model.layers) == 2


# -- budgets --------------------------------------------------------------------------------------------
def test_callback_budget_refuses_an_over_budget_plan_before_the_first_step(tmp_path):
    model = causal_lm()
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    callback = DynatuneCallback(build_method("topk", k=4), budget="45%")
    trainer = Trainer(model=model, args=args_for(tmp_path, save_strategy="no"), train_dataset=lm_examples(),
                      callbacks=[callback, Watch()])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BudgetError, match="predicted to peak"):
        trainer.train()
    assert seen == [] and callback.tuner.history == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing moved
    # the same plan under a budget it fits trains, and its note says how the budget was priced
    ok = DynatuneCallback(build_method("topk", k=1), budget="45%")
    Trainer(model=causal_lm(), args=args_for(tmp_path / "ok", save_strategy="no", max_steps=2),
            train_dataset=lm_examples(), callbacks=[ok]).train()
    assert len(ok.tuner.history) == 2
    assert "batch 4 x 12 tokens (the longest of the 40 training examples" in ok.budget_note
    assert all(h["predicted_peak_bytes"] <= ok.tuner.usable_budget for h in ok.tuner.history)


def test_callback_budget_forms_agree_and_the_method_default_applies(tmp_path):
    def budget_bytes(**kw):
        cb = DynatuneCallback(kw.pop("method", None) or build_method("topk", k=1), **kw)
        Trainer(model=causal_lm(), args=args_for(tmp_path, save_strategy="no", max_steps=1),
                train_dataset=lm_examples(), callbacks=[cb]).train()
        return cb.tuner.budget_bytes, cb

    frac, _ = budget_bytes(budget=0.6)
    pct, _ = budget_bytes(budget="60%")
    assert frac == pct > 0
    n, _ = budget_bytes(budget=frac)  # a byte count (int)
    assert n == frac
    trims_default, cb = budget_bytes(method=build_method("trims"))  # TriMS's own 60%
    assert trims_default == frac and cb.budget == "0.6"
    long, _ = budget_bytes(budget=0.6, max_length=48)  # priced at another length: a larger full peak
    assert long > frac


def test_bad_callback_budgets_get_one_sentence(tmp_path):
    with pytest.raises(DynatuneError, match="both to build_method"):
        DynatuneCallback(build_method("topk", budget="1GiB"), budget="2GiB")


def test_trainer_fp16_is_priced_as_amp_bf16(tmp_path):
    """fp16=True is priced (amp-fp16: the bytes of amp-bf16). The flags are set after the Trainer is
    built, so its accelerator (and the run on this CPU) stays fp32: only the pricing is under test."""
    def priced(flag):
        cb = DynatuneCallback(build_method("topk", k=1), budget="60%")
        trainer = Trainer(model=causal_lm(), args=args_for(tmp_path / flag, save_strategy="no", max_steps=1),
                          train_dataset=lm_examples(), callbacks=[cb])
        setattr(trainer.args, flag, True)
        trainer.train()
        return cb
    fp16, bf16 = priced("fp16"), priced("bf16")
    assert "amp-fp16" in fp16.budget_note and "amp-bf16" in bf16.budget_note
    assert fp16.tuner.budget_bytes == bf16.tuner.budget_bytes > 0


# -- prepare() without the callback ---------------------------------------------------------------------
def test_prepare_without_the_callback_refuses_to_train(tmp_path):
    model = prepare(causal_lm(), build_method("topk", k=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args_for(tmp_path, save_strategy="no"), train_dataset=lm_examples())
    with pytest.raises(DynatuneError, match="without it, which would be full fine-tuning"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():  # evaluation is left alone
        model.eval()
        assert model(**{k: v[None] for k, v in lm_examples()[0].items()}).loss is not None


# -- the public API ------------------------------------------------------------------------------------
def test_import_dynatune_gives_the_public_names():
    assert dynatune.__version__ and dynatune.__version__ != "0+unknown"
    m = dynatune.build_method("trims", budget=0.6, tau=20)
    assert m.config.tau == 20 and m.budget == 0.6
    for name in ("build_method", "DynatuneCallback", "DynatuneTrainer", "prepare", "Tuner", "estimate"):
        assert callable(getattr(dynatune, name)), name
    with pytest.raises(DynatuneError, match="has no option taux; its options are: .*tau"):
        dynatune.build_method("trims", taux=3)


# -- evaluation under the budget ----------------------------------------------------------------------
def test_evaluation_batches_shrink_to_fit_the_budget(tmp_path):
    """A causal LM's evaluation holds batch x seq x vocab logits: at a large eval batch it would
    peak above a budget that training fits; the callback lowers the eval batch to one that fits."""
    args = args_for(tmp_path, save_strategy="no", max_steps=1, per_device_eval_batch_size=512)
    cb = DynatuneCallback(build_method("topk", k=1), budget="60%", max_length=64)
    Trainer(model=causal_lm(), args=args, train_dataset=lm_examples(), callbacks=[cb]).train()
    t, mm = cb.tuner, cb.tuner.memory_model
    resident = Plan.of(t.plan.update)
    fitted = args.per_device_eval_batch_size
    assert 1 <= fitted < 512
    assert mm.predict_eval(fitted, 64, resident)["predicted_peak_bytes"] <= t.usable_budget
    assert mm.predict_eval(fitted + 1, 64, resident)["predicted_peak_bytes"] > t.usable_budget  # the largest
    assert mm.predict_eval(512, 64, resident)["predicted_peak_bytes"] > t.usable_budget
