"""Evaluation during training: eval_steps, early stopping on metric_for_best, load_best, and resume.

The validation metric is scripted (a fake evaluate keyed by the optimizer step it follows), so the
step a run stops at and the step it keeps are known by hand.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from dynatune.cli import main
from dynatune.data.metrics import improves
from dynatune.errors import DynatuneError


def common(model_dir, run, *extra):
    # 48 examples / 4 per step: 12 steps an epoch
    return ["train", f"model={model_dir}", "task=trec", "data.max_train=48", "data.max_eval=16", "batch_size=4",
            "max_length=32", "progress=false", "lr=3e-3", "budget=none", "method=full", "eval_each_epoch=false",
            "eval_steps=2", f"output_dir={run}", *map(str, extra)]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("dynatune.loop.plot_run", lambda run_dir: [])


@pytest.fixture
def scripted(monkeypatch):
    """`script(values)`: the validation metric after step s is values[s] (accuracy, or loss for
    metric_for_best=loss); the step is read off the engine, so a resumed process follows it too."""
    import dynatune.loop as loop

    now = {"step": 0}
    real_step = loop.train_step

    def counted(tuner, *args, **kwargs):
        now["step"] = tuner.step + 1  # tuner.step: steps completed before this one
        return real_step(tuner, *args, **kwargs)

    def script(values: dict):
        def fake(model, task, split, batch_size, device):
            v = values.get(now["step"], 0.0)
            return {"accuracy": v, "loss": v}
        monkeypatch.setattr(loop, "train_step", counted)
        monkeypatch.setattr(loop, "evaluate", fake)
    return script


def metrics(run):
    return json.loads((run / "metrics.json").read_text())


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_direction_of_each_metric():
    assert improves("accuracy", 0.8, 0.7) and not improves("accuracy", 0.7, 0.8)
    assert improves("loss", 0.7, 0.8) and not improves("loss", 0.8, 0.7)
    assert improves("perplexity", 5.0, 6.0) and improves("mse", 0.1, 0.2) and improves("exact_match", 0.2, 0.1)
    assert not improves("accuracy", 0.7, 0.7)  # a tie is no improvement
    assert not improves("accuracy", 0.75, 0.7, threshold=0.1) and improves("accuracy", 0.85, 0.7, threshold=0.1)
    assert not improves("loss", float("nan"), 1.0)
    with pytest.raises(DynatuneError, match="unknown metric 'bleu' for metric_for_best; choose one of: accuracy, "
                                            "exact_match, loss, macro_f1, mcc, mse, pearson, perplexity."):
        improves("bleu", 1.0, 0.0)


def test_unknown_or_foreign_metric_is_refused(tiny_bert_dir, tmp_path, capsys):
    assert main(common(tiny_bert_dir, tmp_path / "a", "metric_for_best=bleu")) == 2
    assert "unknown metric 'bleu' for metric_for_best; choose one of: accuracy," in capsys.readouterr().err
    assert main(common(tiny_bert_dir, tmp_path / "b", "metric_for_best=perplexity")) == 2
    assert ("metric_for_best=perplexity is not among task trec's validation metrics (accuracy, macro_f1, mcc, loss)"
            in capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


def test_early_stopping_stops_where_counted(tiny_bert_dir, tmp_path, scripted, one_thread, caplog):
    # evaluations at 2, 4, 6, 8: 0.5, 0.7 (best), 0.6 (1 without improvement), 0.7 (a tie: 2) -> stop at 8
    scripted({2: 0.5, 4: 0.7, 6: 0.6, 8: 0.7, 10: 0.9, 12: 0.9})
    run = tmp_path / "run"
    assert main(common(tiny_bert_dir, run, "max_steps=12", "early_stopping_patience=2", "save_model=false")) == 0
    m = metrics(run)
    assert m["steps"] == 8 and m["stopped_early_at_step"] == 8
    assert logged_steps(run) == list(range(8))
    assert [e["step"] for e in m["evals"]] == [2, 4, 6, 8]
    assert m["best"] == {"step": 4, "metric": "accuracy", "value": 0.7}
    # a warning: on stderr in the CLI
    assert "stopping early at step 8: accuracy has not improved on 0.7 (step 4) in 2 evaluations." in caplog.messages
    assert [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()] == m["evals"]


def test_lower_is_better_with_threshold(tiny_bert_dir, tmp_path, scripted, one_thread):
    # loss must fall by more than 0.05: 1.0 (best), 0.97 (1), 0.9 (best), 0.88 (1), 0.86 (2) -> stop at 10
    scripted({2: 1.0, 4: 0.97, 6: 0.9, 8: 0.88, 10: 0.86, 12: 0.1})
    run = tmp_path / "run"
    assert main(common(tiny_bert_dir, run, "max_steps=12", "early_stopping_patience=2", "metric_for_best=loss",
                       "early_stopping_threshold=0.05", "save_model=false")) == 0
    m = metrics(run)
    assert m["stopped_early_at_step"] == 10 and m["steps"] == 10
    assert m["best"] == {"step": 6, "metric": "loss", "value": 0.9}


def test_best_checkpoint_is_the_one_loaded(tiny_bert_dir, tmp_path, scripted, one_thread):
    scripted({2: 0.5, 4: 0.9, 6: 0.6, 8: 0.7})
    run = tmp_path / "run"
    assert main(common(tiny_bert_dir, run, "max_steps=8", "load_best=true", "checkpoint_every=1",
                       "keep_checkpoints=20")) == 0
    m = metrics(run)
    assert m["best"] == {"step": 4, "metric": "accuracy", "value": 0.9} and m["stopped_early_at_step"] is None
    assert m["validation"]["step"] == 4 and m["validation"]["accuracy"] == 0.9
    best = load_file(run / "checkpoints" / "best" / "weights.safetensors")
    at4 = load_file(run / "checkpoints" / "step-4" / "weights.safetensors")
    at8 = load_file(run / "checkpoints" / "step-8" / "weights.safetensors")
    saved = load_file(run / "model" / "model.safetensors")
    assert best.keys() == at4.keys() and all(torch.equal(best[k], at4[k]) for k in at4)
    assert saved.keys() == at4.keys()
    assert all(torch.equal(saved[k], at4[k]) for k in at4)
    assert not all(torch.equal(saved[k], at8[k]) for k in at8)
    assert json.loads((run / "checkpoints" / "best" / "best.json").read_text()) == m["best"]


def test_resume_keeps_best_and_patience(tiny_bert_dir, tmp_path, scripted, one_thread):
    # interrupted at 6, one evaluation without improvement counted: the resumed run must stop at 8, not 10
    scripted({2: 0.5, 4: 0.7, 6: 0.6, 8: 0.7, 10: 0.9, 12: 0.9})
    args = ["max_steps=12", "early_stopping_patience=2", "load_best=true", "checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(common(tiny_bert_dir, straight, *args)) == 0
    assert main(common(tiny_bert_dir, resumed, *args, "stop_after=6", "save_model=false")) == 0
    assert metrics(resumed)["stopped_early_at_step"] is None and metrics(resumed)["steps"] == 6
    assert main(["train", "--resume", str(resumed), "save_model=true"]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert b["resumed_from_step"] == 6
    assert (b["steps"], b["stopped_early_at_step"], b["best"]) == (8, 8, {"step": 4, "metric": "accuracy",
                                                                          "value": 0.7})
    assert b["evals"] == a["evals"] and [e["step"] for e in b["evals"]] == [2, 4, 6, 8]
    assert logged_steps(resumed) == list(range(8))
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a run that stopped early stays stopped when resumed again
    assert main(["train", "--resume", str(resumed), "save_model=false"]) == 0
    assert metrics(resumed)["steps"] == 8 and logged_steps(resumed) == list(range(8))


def test_loss_plot_shows_validation_points_at_their_steps(tmp_path, monkeypatch):
    import dynatune.report as report

    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 - s / 10, "update": ["L0"]}) + "\n"
                                                for s in range(6)))
    evals = [{"epoch": 0, "step": 2, "accuracy": 0.4, "loss": 1.5},
             {"epoch": 0, "step": 6, "accuracy": 0.6, "loss": 1.2}]
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    report.plot_run(tmp_path)
    lines = {ln.get_label(): ln for ax in figures["loss.png"].axes for ln in ax.get_lines()}
    assert list(lines["validation loss"].get_xdata()) == [2, 6]
    assert list(lines["validation loss"].get_ydata()) == [1.5, 1.2]
    assert list(lines["validation accuracy"].get_ydata()) == [0.4, 0.6]
    assert list(lines["training loss"].get_xdata()) == [1, 2, 3, 4, 5, 6]


def test_eval_steps_with_epoch_ends_evaluates_each_step_once(tiny_bert_dir, tmp_path, scripted, one_thread):
    scripted({4: 0.3, 8: 0.5, 12: 0.6, 16: 0.2, 20: 0.1, 24: 0.1})
    run = tmp_path / "run"
    # 12 steps an epoch: every 4 steps and at the end of each epoch, which step 12 and 24 are anyway
    assert main(common(tiny_bert_dir, run, "epochs=2", "eval_steps=4", "eval_each_epoch=true",
                       "save_model=false")) == 0
    m = metrics(run)
    assert [(e["epoch"], e["step"]) for e in m["evals"]] == [(0, 4), (0, 8), (0, 12), (1, 16), (1, 20), (1, 24)]
    assert m["best"] == {"step": 12, "metric": "accuracy", "value": 0.6} and m["stopped_early_at_step"] is None
    assert m["validation"] == m["evals"][-1]  # without load_best: the final weights' evaluation
