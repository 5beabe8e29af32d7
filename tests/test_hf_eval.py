"""Evaluation features under a Trainer with DynatuneCallback are the Trainer's own (eval_strategy,
EarlyStoppingCallback, load_best_model_at_end); these tests pin that they work with the callback.

The validation score is scripted by the step it follows (Trainer.evaluate is replaced), so the
best checkpoint and the stopping step are known by hand. The scripted method changes its plan
after the best step and ends under an early exit, so a Trainer that loaded only the blocks
running at the end, or kept the last step's plan, would be caught.
"""
import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from dynatune.integrations.hf import STATE_FILE, DynatuneCallback

from scripted import Scripted, plan
from tiny import causal_lm, lm_examples

pytestmark = pytest.mark.usefixtures("one_thread")

# steps 1-4 train the top block; step 5 block.3 alone; step 6 on: block.1 under an exit at depth 2
PLANS = [plan("block.3", "norm")] * 4 + [plan("block.3")] + [plan("block.1", exit_depth=2)]


class ScriptedEval(Trainer):
    """evaluate() returns eval_score = SCORES[global_step] and lets the callbacks see it, as the real one does."""

    scores: dict = {}

    def evaluate(self, *args, **kwargs):
        metrics = {"eval_score": self.scores.get(self.state.global_step, 0.0)}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def run(tmp_path, scores, max_steps, extra_callbacks=()):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                             load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                             save_total_limit=None, disable_tqdm=True, logging_steps=1)
    cb = DynatuneCallback(Scripted(PLANS))
    ScriptedEval.scores = scores
    model = causal_lm("llama")
    trainer = ScriptedEval(model=model, args=args, train_dataset=lm_examples(40, seq=12),
                           eval_dataset=lm_examples(4, seq=12), callbacks=[cb, *extra_callbacks])
    trainer.train()
    return trainer, cb, model


def test_load_best_model_at_end_loads_the_best_checkpoint_and_its_dynatune_state(tmp_path):
    trainer, cb, model = run(tmp_path, {2: 0.3, 4: 0.9, 6: 0.5, 8: 0.4}, max_steps=8)
    best = tmp_path / "checkpoint-4"
    assert trainer.state.best_model_checkpoint == str(best)
    t = cb.tuner
    saved = torch.load(best / STATE_FILE, weights_only=False)["tuner"]
    # the engine is back at step 4: the plan of that step (no exit), its method state and optimizer state
    assert t.step == saved["step"] == 4
    assert t.plan.to_dict() == saved["plan"] and t.plan.exit_depth is None
    assert len(t.model.model.layers) == 4                       # every block runs again
    assert t.state_dict()["optimizer"].keys() == saved["optimizer"].keys()
    assert len(t.history) == 8                                   # the record of every step run stays
    # every weight is the checkpoint's, block.3 included (it trained at step 5, after the best one,
    # and sat behind an exit at the end, where the Trainer's own load does not reach)
    weights = load_file(best / "model.safetensors")
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p.detach(), weights[name]), name
    final = load_file(tmp_path / "checkpoint-8" / "model.safetensors")
    assert not torch.equal(final["model.layers.3.mlp.up_proj.weight"], weights["model.layers.3.mlp.up_proj.weight"])


def test_early_stopping_callback_stops_where_the_patience_says(tmp_path):
    # best 0.9 at step 4; steps 6 and 8 do not improve: patience 2 stops at step 8 of 20
    trainer, cb, _ = run(tmp_path, {2: 0.3, 4: 0.9, 6: 0.5, 8: 0.4, 10: 0.95}, max_steps=20,
                         extra_callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    assert trainer.state.global_step == 8
    assert len(cb.tuner.history) == 8
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    assert cb.tuner.step == 4 and cb.tuner.plan.exit_depth is None
