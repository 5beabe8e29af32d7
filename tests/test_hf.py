"""The Trainer callback: a stock transformers.Trainer runs the engine's contract with no user call.

Each test compares against a run that does not go through the callback (the same Trainer without
it, or the plain loop), so a callback that changed numerics, the data order or the plan would fail.
"""
import json
import warnings

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from dynatune.errors import DynatuneError
from dynatune.integrations.hf import DynatuneCallback, DynatuneTrainer, prepare
from dynatune.loop import epoch_order, fit, linear_schedule
from dynatune.methods import Method, build_method
from dynatune.plan import Plan

from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                seed=0, data_seed=0, save_strategy="no", eval_strategy="no", disable_tqdm=True,
                dataloader_drop_last=True)
    base.update(kw)
    return TrainingArguments(**base)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class OrderedTrainer(Trainer):
    """Reads the dataset front to back, so it sees the plain loop's batches in the loop's order."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class OrderedDynatuneTrainer(DynatuneTrainer, OrderedTrainer):
    pass


def lisa():
    return build_method("lisa", build_method("lisa").Config(k=1, period=2), seed=0)


def loop_like_trainer(model, data, cfg, tmp_path, callback, trainer_cls=OrderedTrainer):
    """A Trainer set up as `fit` runs: same batches and order, AdamW, schedule and clipping."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = linear_schedule(opt, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    ordered = [data[i] for i in epoch_order(len(data), cfg.seed, 0)]
    args = hf_args(tmp_path, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                   max_grad_norm=cfg.grad_clip, learning_rate=cfg.lr)
    return trainer_cls(model=model, args=args, train_dataset=ordered, optimizers=(opt, sched), callbacks=[callback])


# -- 1. full through the callback is the stock Trainer, bit for bit --------------------------------------
@pytest.mark.parametrize("make_model,make_data", [(causal_lm, lm_examples),
                                                  (lambda: classifier(hidden_dropout_prob=0.1), cls_examples)],
                         ids=["llama-lm", "bert-cls-dropout"])
def test_full_callback_equals_stock_trainer(tmp_path, make_model, make_data):
    data = make_data()
    plain_model, our_model = make_model(), make_model()
    plain = Trainer(model=plain_model, args=hf_args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    callback = DynatuneCallback(build_method("full"))
    ours = Trainer(model=our_model, args=hf_args(tmp_path / "ours"), train_dataset=data, callbacks=[callback])
    ours.train()

    assert len(logged_losses(plain)) == STEPS
    assert logged_losses(ours) == logged_losses(plain)
    # the callback's loss is the Trainer's logged loss (one micro-batch per step: exactly)
    assert [h["loss"] for h in callback.tuner.history] == logged_losses(plain)
    for (n, a), (_, b) in zip(plain_model.named_parameters(), our_model.named_parameters()):
        assert torch.equal(a, b), n
    assert len(callback.tuner.history) == STEPS and callback.tuner.peak.counted > 0


# -- 2. lisa: the Trainer path and the plain loop agree on plans and losses -----------------------------
def test_lisa_trainer_matches_plain_loop(tmp_path):
    cfg = loop_cfg(max_steps=STEPS)
    data = lm_examples()
    loop_model, hf_model = causal_lm(), causal_lm()
    loop_tuner, _ = fit(loop_model, lisa(), data, collate, cfg)

    log = tmp_path / "log.jsonl"
    callback = DynatuneCallback(lisa(), log_path=log)
    trainer = loop_like_trainer(hf_model, data, cfg, tmp_path, callback)
    trainer.train()

    loop_plans = [h["update"] for h in loop_tuner.history]
    hf_plans = [h["update"] for h in callback.tuner.history]
    assert len(hf_plans) == STEPS
    assert len({tuple(p) for p in loop_plans}) > 1, "the blocks should be re-drawn within the run"
    assert hf_plans == loop_plans
    loop_losses = [h["loss"] for h in loop_tuner.history]
    assert [h["loss"] for h in callback.tuner.history] == loop_losses
    assert logged_losses(trainer) == loop_losses
    # the same bytes are counted at the same points of each step: live state after the optimizer
    # step, and activations saved between begin_step and after_backward (the Trainer's loss also
    # saves its token count, `num_items_in_batch`: a few bytes)
    for ours, theirs in zip(callback.tuner.history, loop_tuner.history):
        for term in ("weights", "gradients", "optimizer", "offloaded"):
            assert ours["memory"][term] == theirs["memory"][term], term
        assert theirs["memory"]["activations"] > 0
        assert abs(ours["memory"]["activations"] - theirs["memory"]["activations"]) <= 16
    for (n, a), (_, b) in zip(loop_model.named_parameters(), hf_model.named_parameters()):
        assert torch.equal(a, b), n

    # the log file holds the plain loop's records, one per step
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["update"] for r in records] == loop_plans
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["epoch"] == 0 for r in records)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * f for f in (5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0)])
    assert set(records[0]) >= {"loss", "exit_depth", "memory", "bytes_moved", "step_time_s"}


# -- 3. units outside the plan do not move ------------------------------------------------------------------
def test_topk_leaves_lower_units_unchanged(tmp_path):
    model = causal_lm()
    before = params(model)
    callback = DynatuneCallback(build_method("topk", build_method("topk").Config(k=1)))
    # weight decay would move any frozen parameter that got a zero gradient or kept AdamW state
    trainer = Trainer(model=model, args=hf_args(tmp_path, weight_decay=0.1), train_dataset=lm_examples(),
                      callbacks=[callback])
    trainer.train()

    assert all(h["update"] == ["block.3", "norm"] for h in callback.tuner.history)
    for n, p in model.named_parameters():
        assert p.grad is None, n
        if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.", "model.layers.2.")):
            assert torch.equal(p, before[n]), n
        else:  # block 3 and the final norm (the head is tied to the frozen embedding)
            assert not torch.equal(p, before[n]), n


# -- adapters: prepare() puts them in before the Trainer builds its optimizer ----------------------------
def test_lora_prepare_then_trainer(tmp_path):
    method = build_method("lora", build_method("lora").Config(r=4))
    model = prepare(classifier(), method)
    before = params(model)
    callback = DynatuneCallback(method)
    trainer = Trainer(model=model, args=hf_args(tmp_path, learning_rate=1e-2), train_dataset=cls_examples(),
                      callbacks=[callback])
    trainer.train()

    # the Trainer's optimizer already held the adapters and the head: the engine added no group
    assert len(trainer.optimizer.param_groups) == 2  # the Trainer's decay and no-decay groups
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed)
    assert "classifier.weight" in changed  # a fresh task head trains
    assert all("lora_" in n or n.startswith("classifier.") for n in changed), sorted(changed)


def test_adapters_injected_after_the_optimizer_are_refused(tmp_path):
    callback = DynatuneCallback(build_method("lora"))
    trainer = Trainer(model=classifier(), args=hf_args(tmp_path), train_dataset=cls_examples(), callbacks=[callback])
    with pytest.raises(DynatuneError, match="prepare"):
        trainer.train()


def test_unit_frozen_before_the_trainer_still_trains_on_schedule(tmp_path):
    """The user froze the embedding, so the Trainer's optimizer lacks it; lisa trains it anyway."""
    model = causal_lm()
    model.get_input_embeddings().weight.requires_grad_(False)
    before = params(model)
    callback = DynatuneCallback(lisa())
    lrs = []

    class RecordLr(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            lrs.append([g["lr"] for g in optimizer.param_groups])

    trainer = Trainer(model=model, args=hf_args(tmp_path), train_dataset=lm_examples(),
                      callbacks=[callback, RecordLr()])
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 3  # decay, no-decay, and the group dynatune added
    assert all(len(set(step)) == 1 for step in lrs) and len({s[0] for s in lrs}) > 1
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


# -- gradient accumulation: one plan per optimizer step, the Trainer's loss -------------------------------
class LisaAskingTheLoop(type(lisa())):
    """A method that, like gradselect/adagradselect, learns accumulation and epoch length from the loop."""

    micro_batches = 1
    steps_per_epoch = 0

    def configure_loop(self, micro_batches, steps_per_epoch):
        self.micro_batches, self.steps_per_epoch = micro_batches, steps_per_epoch


def test_grad_accum_one_record_per_step_and_trainer_loss(tmp_path):
    method = LisaAskingTheLoop(lisa().config, seed=0)
    callback = DynatuneCallback(method)
    trainer = Trainer(model=causal_lm(), args=hf_args(tmp_path, per_device_train_batch_size=2,
                                                      gradient_accumulation_steps=2),
                      train_dataset=lm_examples(), callbacks=[callback])
    trainer.train()
    assert [h["step"] for h in callback.tuner.history] == list(range(STEPS))
    ours = [h["loss"] for h in callback.tuner.history]
    assert ours == pytest.approx(logged_losses(trainer), rel=1e-6)
    assert method.micro_batches == 2 and method.steps_per_epoch == 10  # 40 examples, 2 per batch, 2 per step


# -- probed gradients are freed before clipping with DynatuneTrainer --------------------------------------
class UpdateTopProbeBelow(Method):
    """Updates block 3 and the final norm; block 2's weights get a gradient that is read, then freed."""

    name = "test-probe"

    def plan(self, step):
        return Plan.of({"block.3", "norm"}, probe_params={"block.2"})


def test_probe_gradients_do_not_count_in_the_clip_norm(tmp_path):
    cfg = loop_cfg(max_steps=4, grad_clip=0.05)  # small enough that every step clips
    data = lm_examples()
    loop_model = causal_lm()
    loop_tuner, _ = fit(loop_model, UpdateTopProbeBelow(), data, collate, cfg)

    ours = causal_lm()
    callback = DynatuneCallback(UpdateTopProbeBelow())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # DynatuneTrainer never needs the clip warning
        loop_like_trainer(ours, data, cfg, tmp_path / "ours", callback, OrderedDynatuneTrainer).train()
    assert [h["loss"] for h in callback.tuner.history] == [h["loss"] for h in loop_tuner.history]
    for (n, a), (_, b) in zip(loop_model.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), n
        assert b.grad is None, n

    # a stock Trainer clips before the callback can free them: warned, and the weights differ
    stock = causal_lm()
    probed_before = params(stock.model.layers[2])
    with pytest.warns(UserWarning, match="DynatuneTrainer"):
        loop_like_trainer(stock, data, cfg, tmp_path / "stock", DynatuneCallback(UpdateTopProbeBelow())).train()
    assert not torch.equal(stock.model.layers[3].mlp.down_proj.weight, ours.model.layers[3].mlp.down_proj.weight)
    for n, p in stock.model.layers[2].named_parameters():  # probed, never updated
        assert torch.equal(p, probed_before[n]), n


def test_dynatune_trainer_strategy_is_checked_and_fsdp_in_one_process_is_the_plain_run(tmp_path):
    """strategy names how several processes share the model; a single process has nothing to shard and
    trains exactly as without it. An unknown strategy is one sentence before anything runs."""
    data = cls_examples(24)
    with pytest.raises(DynatuneError, match=r"DynatuneTrainer\(strategy='zero'\): use 'ddp' or 'fsdp'"):
        DynatuneTrainer(model=classifier("bert"), args=hf_args(tmp_path / "x"), train_dataset=data,
                        data_collator=collate, callbacks=[DynatuneCallback(lisa())], strategy="zero")
    runs = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        cb = DynatuneCallback(lisa())
        trainer = OrderedDynatuneTrainer(model=classifier("bert"), args=hf_args(tmp_path / strategy), train_dataset=data,
                                         data_collator=collate, callbacks=[cb], strategy=strategy)
        trainer.train()
        assert not cb.tuner.shards_gradients
        runs[strategy] = (logged_losses(trainer), params(trainer.model))
    assert runs["ddp"][0] == runs["fsdp"][0]
    assert all(torch.equal(w, runs["fsdp"][1][n]) for n, w in runs["ddp"][1].items())
