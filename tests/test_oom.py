"""Out of memory: a step that runs out of device memory is undone and retried on the same examples.

There is no GPU here, so the device's limit is simulated: `DeviceLimit` makes a forward over more
examples than fit raise torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class),
either after the real forward ran (dropout drew its masks) or in the middle of backward (blocks
above have accumulated gradients). Each test compares with a run that never ran out of memory
because it split the batch from the start, bit for bit: a retry that lost or doubled a batch, kept
a partial gradient, replayed other dropout masks or asked the method for a second plan would fail.
"""
import functools
import json

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import TrainingArguments

import dynatune.loop as loop
from dynatune.engine import Tuner
from dynatune.errors import DynatuneError
from dynatune.integrations.hf import DynatuneCallback, DynatuneTrainer, prepare
from dynatune.loop import epoch_order, fit
from dynatune.memory import MemoryModel
from dynatune.methods import build_method

from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg

STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


class DeviceLimit:
    """A simulated device. `fails(step, attempt, call, n)` says whether the forward number `call` of
    attempt `attempt` of optimizer step `step`, over `n` examples, runs out of memory.

    where='forward': the real forward runs, then OutOfMemoryError is raised.
    where='backward': the forward succeeds; backward raises at block 1's output, after the head and
    the blocks above it received their gradients.
    `seen` records (step, attempt, example rows) of every forward that did not fail.
    """

    def __init__(self, model, fails, where="forward"):
        self.model, self.fails, self.where = model, fails, where
        self.tuner = None  # the run's Tuner, or an object holding one (the Trainer's callback)
        self.seen, self.failures = [], []
        self.grads_at_failure = []
        self._block_out = None
        base = model.base_model
        (base.layers if hasattr(base, "layers") else base.encoder.layer)[1].register_forward_hook(self._keep)
        inner = model.forward

        @functools.wraps(inner)  # the Trainer reads the signature to keep the model's input columns
        def forward(*args, **kw):
            out = inner(*args, **kw)
            t = self.tuner if isinstance(self.tuner, Tuner) else self.tuner.tuner
            attempt = t.oom_retries
            call = sum(1 for s, a, _ in self.seen if (s, a) == (t.step, attempt))
            n = kw["input_ids"].shape[0]
            if self.fails(t.step, attempt, call, n):
                self.failures.append((t.step, attempt, call))
                if self.where == "forward":
                    raise torch.OutOfMemoryError("injected: forward")
                assert self._block_out.requires_grad
                self._block_out.register_hook(self._raise)
            self.seen.append((t.step, attempt, [tuple(r) for r in kw["input_ids"].tolist()]))
            return out

        model.forward = forward

    def _keep(self, mod, args, out):
        self._block_out = out if isinstance(out, torch.Tensor) else out[0]

    def _raise(self, grad):
        self.grads_at_failure.append(sum(p.grad is not None for p in self.model.parameters()))
        raise torch.OutOfMemoryError("injected: backward")

    def final_attempts(self, history) -> list[list[tuple]]:
        """Per step, the example rows of the attempt that completed the step (in order)."""
        out = []
        for entry in history:
            attempt = entry.get("oom_retries", 0)
            out.append([r for s, a, rows in self.seen if (s, a) == (entry["step"], attempt) for r in rows])
        return out


def lisa():
    return build_method("lisa", build_method("lisa").Config(k=1, period=2), seed=0)


def full():
    return build_method("full")


def gradselect():  # counts backward passes: a retry must re-rank over the new micro-batches
    return build_method("gradselect", build_method("gradselect").Config(k=0.5, state_policy="keep"), seed=0)


def run(make_model, make_method, data, cfg, fails=None, where="forward", out_dir=None):
    model, method = make_model(), make_method()
    tuner = Tuner(model, method, lr=cfg.lr, weight_decay=cfg.weight_decay)
    limit = DeviceLimit(model, fails or (lambda *a: False), where)
    limit.tuner = tuner
    torch.manual_seed(5)  # dropout's stream
    tuner, state = fit(model, method, data, collate, cfg, out_dir, tuner=tuner)
    return model, tuner, state, limit


def assert_same_run(a, b):
    (model_a, tuner_a, state_a, limit_a), (model_b, tuner_b, state_b, limit_b) = a, b
    for (n, x), (_, y) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(x, y), n
    assert [h["loss"] for h in tuner_a.history] == [h["loss"] for h in tuner_b.history]
    assert [h["update"] for h in tuner_a.history] == [h["update"] for h in tuner_b.history]
    # live bytes after the step are the split run's (saved activations are left out: the counter tells
    # storages apart by address, and the failed attempt changed which addresses the allocator reuses)
    terms = ("weights", "gradients", "optimizer", "offloaded")
    assert [[h["memory"][k] for k in terms] for h in tuner_a.history] == \
        [[h["memory"][k] for k in terms] for h in tuner_b.history]
    # the method planned once per step: its generator and state advanced exactly as in the reference
    sa, sb = tuner_a.method.state_dict(), tuner_b.method.state_dict()
    assert torch.equal(sa.pop("generator"), sb.pop("generator")) and sa == sb
    # the data position advanced once per batch, and each step trained on its batch exactly once
    assert (state_a.step, state_a.epoch, state_a.batch_in_epoch) == (state_b.step, state_b.epoch, state_b.batch_in_epoch)
    assert tuner_a.step == tuner_b.step == len(tuner_a.history) == STEPS
    assert limit_a.final_attempts(tuner_a.history) == limit_b.final_attempts(tuner_b.history)


def batches_in_order(data, cfg):
    order = epoch_order(len(data), cfg.seed, 0)
    return [[tuple(data[i]["input_ids"].tolist()) for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            for s in range(STEPS)]


CASES = {"bert-cls-dropout-full": (lambda: classifier(hidden_dropout_prob=0.1), cls_examples, full),
         "llama-lm-lisa": (causal_lm, lm_examples, lisa),
         "llama-lm-gradselect": (causal_lm, lm_examples, gradselect)}


# -- 1. every batch runs out of memory once: the run equals one with micro-batches of half the size -----------------
@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_oom_on_every_step_equals_split_from_the_start(tmp_path, case, where):
    make_model, make_data, make_method = CASES[case]
    data = make_data()
    # the device fits 2 examples per forward; the reference never asks for more (grad_accum=2)
    ours = run(make_model, make_method, data, loop_cfg(max_steps=STEPS), lambda s, a, c, n: n > 2, where,
               out_dir=tmp_path)
    ref = run(make_model, make_method, data, loop_cfg(max_steps=STEPS, grad_accum=2))

    assert len(ours[3].failures) == STEPS and not ref[3].failures  # one failure per step, then success
    if where == "backward":  # it failed mid-backward: some gradients had already been accumulated
        assert all(n > 0 for n in ours[3].grads_at_failure)
    assert_same_run(ours, ref)
    assert ours[3].final_attempts(ours[1].history) == batches_in_order(data, loop_cfg())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["oom_retries"], r["micro_batches"]) for r in records] == [(s, 1, 2) for s in range(STEPS)]


# -- 2. one failure in the middle of gradient accumulation, at one step --------------------------------------------
def test_oom_mid_accumulation_retries_that_batch_only(tmp_path, monkeypatch):
    make_model, make_data, make_method = CASES["llama-lm-lisa"]
    data = make_data()
    cfg = loop_cfg(max_steps=STEPS, grad_accum=2)
    # step 2's second micro-batch fails in backward, with the first one's gradient already accumulated
    ours = run(make_model, make_method, data, cfg, lambda s, a, c, n: (s, a, c) == (2, 0, 1), "backward",
               out_dir=tmp_path)

    real = loop.train_step

    def split_step_2(tuner, model, micro_batches, cfg, device, rebatch=None, **kw):
        if tuner.step == 2:  # the reference: that batch as micro-batches of one example from the start
            micro_batches = rebatch(1)
        return real(tuner, model, micro_batches, cfg, device, rebatch=rebatch, **kw)

    monkeypatch.setattr(loop, "train_step", split_step_2)
    ref = run(make_model, make_method, data, cfg)

    assert ours[3].failures == [(2, 0, 1)]
    assert_same_run(ours, ref)
    assert ours[3].final_attempts(ours[1].history) == batches_in_order(data, cfg)
    # the failed attempt ran both forwards (the second failed in backward); the retry ran the four examples once each
    assert [a for s, a, _ in ours[3].seen if s == 2] == [0, 0, 1, 1, 1, 1]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert [(r.get("oom_retries"), r.get("micro_batches")) for r in records] == \
        [(None, None)] * 2 + [(1, 4)] + [(None, None)] * 2


# -- 3. retries are bounded: one example that does not fit is a clear error -----------------------------------------
def test_oom_with_one_example_raises_a_clear_error():
    make_model, make_data, make_method = CASES["llama-lm-lisa"]
    with pytest.raises(DynatuneError, match="max_length") as err:
        run(make_model, make_method, make_data(), loop_cfg(max_steps=STEPS), lambda *a: True, "backward")
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert "one example" in str(err.value) and "2 retries" in str(err.value)  # 4 -> 2 -> 1 examples


def test_failed_step_leaves_nothing_behind():
    model = causal_lm()
    tuner = Tuner(model, lisa())
    limit = DeviceLimit(model, lambda *a: True, "backward")
    limit.tuner = tuner
    batches = loop.batcher(lm_examples(), list(range(4)), collate)
    with pytest.raises(DynatuneError):
        loop.train_step(tuner, model, batches(4), loop_cfg(), torch.device("cpu"), rebatch=batches)
    assert limit.failures == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]
    assert all(p.grad is None for p in model.parameters())
    assert tuner._count_ctx is None  # the saved-tensor counting context is closed
    x = torch.ones(2, requires_grad=True)
    (x * x).sum().backward()  # autograd runs without the counter's hooks


# -- 4. the memory model is recalibrated after a retry (the CUDA path: measured peaks) -----------------------------
def test_retry_recalibrates_the_memory_model_with_the_measured_peak():
    """There is no GPU here: the measured peak is set by hand where after_optimizer_step reads
    torch.cuda.max_memory_allocated; the rest is the engine's own path."""
    model = causal_lm()
    tuner = Tuner(model, full())
    mm = MemoryModel.from_tuner(tuner, batch_shape=(4, 12))
    tuner.set_budget(mm, None)
    plan = tuner.begin_step()
    tuner.retry_step(2, (2, 12))
    for b in loop.batcher(lm_examples(), list(range(4)), collate)(2):
        (model(**b).loss / 2).backward()
    tuner.after_backward()
    tuner.optimizer.step()
    tuner.after_optimizer_step()
    measured = mm.predict(plan, (2, 12)).predicted_peak_bytes + 12345
    tuner.record.measured = measured
    tuner._recalibrate()
    entry = tuner.end_step(1.0)
    assert mm.predict(plan, (2, 12)).predicted_peak_bytes == measured  # the retried shape is now exact
    assert mm.calibrations[-1]["measured"] == measured
    assert entry["oom_retries"] == 1 and entry["micro_batches"] == 2
    assert entry["recalibrated"]["measured"] == measured and entry["recalibrated"]["batch_shape"] == [2, 12]


# -- 5. the Trainer path: DynatuneTrainer retries in training_step -------------------------------------------------
class OrderedDynatuneTrainer(DynatuneTrainer):
    """Reads the dataset front to back: a batch of 4 is the two batches of 2 of a run with half the batch."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def run_trainer(tmp_path, make_model, make_method, data, batch, accum, fails=None, mean_loss=False):
    model, method = make_model(), make_method()
    model = prepare(model, method)
    limit = DeviceLimit(model, fails or (lambda *a: False))
    callback = DynatuneCallback(method, log_path=tmp_path / "log.jsonl")
    limit.tuner = callback
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, learning_rate=1e-3, warmup_steps=1, weight_decay=0.0,
                             max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_drop_last=True)
    trainer = OrderedDynatuneTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    if mean_loss:  # the Trainer divides a mean loss by the accumulation steps (no num_items_in_batch)
        trainer.model_accepts_loss_kwargs = False
    torch.manual_seed(5)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return model, trainer, callback.tuner, limit, records


@pytest.mark.parametrize("case,mean_loss", [("bert-cls-dropout-full", False), ("llama-lm-lisa", False),
                                            ("llama-lm-lisa", True)],
                         ids=["bert-cls-dropout-full", "llama-lm-lisa", "llama-lm-lisa-mean-loss"])
def test_trainer_oom_equals_accumulation_from_the_start(tmp_path, case, mean_loss):
    make_model, make_data, make_method = CASES[case]
    data = make_data()
    # batches of 4 on a device that fits 2: each step fails once, then runs as two pieces of 2
    ours = run_trainer(tmp_path / "ours", make_model, make_method, data, 4, 1, lambda s, a, c, n: n > 2,
                       mean_loss=mean_loss)
    ref = run_trainer(tmp_path / "ref", make_model, make_method, data, 2, 2, mean_loss=mean_loss)
    (model, trainer, tuner, limit, records), (ref_model, ref_trainer, ref_tuner, ref_limit, ref_records) = ours, ref

    assert len(limit.failures) == STEPS and not ref_limit.failures
    for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in tuner.history] == [h["loss"] for h in ref_tuner.history]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in ref_trainer.state.log_history if "loss" in h] and len(losses) == STEPS
    assert [h["update"] for h in tuner.history] == [h["update"] for h in ref_tuner.history]
    sa, sb = tuner.method.state_dict(), ref_tuner.method.state_dict()
    assert torch.equal(sa.pop("generator"), sb.pop("generator")) and sa == sb
    assert trainer.state.global_step == ref_trainer.state.global_step == STEPS
    assert limit.final_attempts(tuner.history) == ref_limit.final_attempts(ref_tuner.history)
    assert limit.final_attempts(tuner.history) == [[tuple(e["input_ids"].tolist()) for e in data[4 * s:4 * s + 4]]
                                                   for s in range(STEPS)]
    assert [(r["oom_retries"], r["micro_batches"]) for r in records] == [(1, 2)] * STEPS
    assert all("oom_retries" not in r for r in ref_records)


def test_trainer_oom_replays_the_earlier_micro_batches(tmp_path):
    """With accumulation, the second micro-batch's failure replays the first one (its gradient was lost)."""
    make_model, make_data, make_method = CASES["bert-cls-dropout-full"]
    data = make_data()
    # micro-batches of 2 on a device that fits 1: both fail once; the second's retry replays the first's pieces
    ours = run_trainer(tmp_path / "ours", make_model, make_method, data, 2, 2, lambda s, a, c, n: n > 1)
    ref = run_trainer(tmp_path / "ref", make_model, make_method, data, 1, 4)
    (model, trainer, tuner, limit, records), (ref_model, ref_trainer, ref_tuner, ref_limit, _) = ours, ref

    assert [f[:2] for f in limit.failures] == [(s, a) for s in range(STEPS) for a in (0, 1)]
    for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in tuner.history] == [h["loss"] for h in ref_tuner.history]
    # the Trainer adds each micro-batch's loss once (pieces summed first: equal up to rounding)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in ref_trainer.state.log_history if "loss" in h], rel=1e-6)
    assert limit.final_attempts(tuner.history) == ref_limit.final_attempts(ref_tuner.history)
    assert [(r["oom_retries"], r["micro_batches"]) for r in records] == [(2, 4)] * STEPS


def test_trainer_oom_with_one_example_raises_a_clear_error(tmp_path):
    make_model, make_data, make_method = CASES["llama-lm-lisa"]
    with pytest.raises(DynatuneError, match="one example"):
        run_trainer(tmp_path, make_model, make_method, make_data(), 4, 1, lambda *a: True)
