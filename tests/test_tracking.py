"""report_to: each step's record (loss, lr, plan, counted and predicted bytes) and each evaluation
reach TensorBoard (read back from the event file) and wandb (offline); under a Trainer, the
callback's records reach the Trainer's own report_to loggers."""
import json

import pytest

from dynatune.config import load_config
from dynatune.errors import DynatuneError
from dynatune.loop import fit
from dynatune.methods import build_method
from dynatune.tracking import parse_report_to, step_scalars

from tiny import causal_lm, collate, lm_examples, loop_cfg

STEPS = 4


def read_scalars(folder):
    """tag -> {step: value}: float32 scalar events and float64 tensor summaries (dynatune's) alike."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        if events and events[0].tensor_proto.dtype != 7:  # not the plan's text (DT_STRING)
            out[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in events}
    return out, acc


def test_tensorboard_event_file_holds_every_step_record(one_thread, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = loop_cfg(max_steps=STEPS, max_length=12, report_to="tensorboard", budget="0.8", margin=0.03)
    evals = iter([{"accuracy": 0.25, "loss": 2.0}, {"accuracy": 0.5, "loss": 1.5}])
    cfg.eval_steps = 2
    t, _ = fit(causal_lm("llama"), build_method("lisa", seed=3, k=1, period=2), lm_examples(16, seq=12), collate, cfg,
               out_dir=tmp_path, evaluate=lambda m, epoch: next(evals))
    t.close_hooks()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    scalars, acc = read_scalars(tmp_path / "tensorboard")
    assert len(log) == STEPS
    for rec in log:
        s = rec["step"] + 1
        assert scalars["train/loss"][s] == pytest.approx(rec["loss"], rel=1e-6)
        assert scalars["train/lr"][s] == pytest.approx(rec["lr"], rel=1e-6)
        assert scalars["plan/units_updated"][s] == len(rec["update"])
        for term in ("weights", "gradients", "optimizer", "activations"):
            assert scalars[f"memory/{term}"][s] == rec["memory"][term]
        assert scalars["memory/counted_bytes"][s] == rec["memory"]["counted"]
        assert scalars["memory/predicted_bytes"][s] == rec["predicted_bytes"]
        assert scalars["memory/budget_bytes"][s] == rec["budget_bytes"]
    assert scalars["eval/accuracy"] == {2: 0.25, 4: 0.5}
    assert scalars["memory/counted_bytes"][1] == log[0]["memory"]["counted"]   # exact: float64, not float32
    # LISA (seed 3) draws a new block every 2 steps: the plan's text is written at each change
    texts = acc.Tags()["tensors"]
    assert "plan/update/text_summary" in texts
    changes = [e.step for e in acc.Tensors("plan/update/text_summary")]
    expected = [rec["step"] + 1 for i, rec in enumerate(log) if i == 0 or rec["update"] != log[i - 1]["update"]]
    assert changes == expected and len(changes) >= 2


def test_wandb_offline_run_is_written(one_thread, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = loop_cfg(max_steps=2, max_length=12, report_to="wandb")
    t, _ = fit(causal_lm("llama"), build_method("full"), lm_examples(8, seq=12), collate, cfg, out_dir=tmp_path)
    t.close_hooks()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_report_to_values(monkeypatch):
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(DynatuneError, match="use tensorboard, wandb"):
        parse_report_to("mlflow")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(DynatuneError, match=r"pip install 'dynatune\[wandb\]'"):
        load_config(None, ["report_to=wandb"])


def test_step_scalars_flatten_a_record():
    rec = {"step": 3, "loss": 1.5, "lr": 1e-3, "update": ["block.1", "norm"], "exit_depth": 2,
           "memory": {"weights": 10, "gradients": 4, "optimizer": 8, "activations": 6, "offloaded": 0, "counted": 28},
           "predicted_bytes": 27, "budget_bytes": 40, "method_log": {"alpha": 0.5, "name": "x"}}
    s = step_scalars(rec)
    assert s == {"train/loss": 1.5, "train/lr": 1e-3, "plan/units_updated": 2.0, "plan/exit_depth": 2.0,
                 "memory/weights": 10.0, "memory/gradients": 4.0, "memory/optimizer": 8.0, "memory/activations": 6.0,
                 "memory/offloaded": 0.0, "memory/counted_bytes": 28.0, "memory/predicted_bytes": 27.0,
                 "memory/budget_bytes": 40.0, "method/alpha": 0.5}


def test_trainer_report_to_tensorboard_gets_the_callbacks_records(one_thread, tmp_path):
    pytest.importorskip("tensorboard")
    from transformers import Trainer, TrainingArguments
    from dynatune.integrations.hf import DynatuneCallback

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=["tensorboard"],
                             logging_steps=1, use_cpu=True, seed=0, save_strategy="no", eval_strategy="no",
                             disable_tqdm=True)
    cb = DynatuneCallback(build_method("topk", seed=0, k=1))
    Trainer(model=causal_lm("llama"), args=args, train_dataset=lm_examples(16, seq=12), callbacks=[cb]).train()
    cb.tuner.close_hooks()
    scalars, _ = read_scalars(next(tmp_path.rglob("events.out.tfevents.*")).parent)
    hist = cb.tuner.history
    assert len(hist) == STEPS
    for rec in hist:
        s = rec["step"] + 1
        assert scalars["train/dynatune/memory/counted_bytes"][s] == rec["memory"]["counted"]
        assert scalars["train/dynatune/memory/activations"][s] == rec["memory"]["activations"]
        assert scalars["train/dynatune/plan/units_updated"][s] == len(rec["update"])


def test_large_byte_counts_stay_exact(tmp_path):
    """433,334,984 bytes is not a float32 (it rounds to 433,334,976): the event file keeps float64."""
    pytest.importorskip("tensorboard")
    from dynatune.tracking import Trackers
    tr = Trackers(["tensorboard"], tmp_path, "run")
    tr.log_step({"step": 0, "loss": 1.0, "update": ["block.0"],
                 "memory": {"weights": 1, "gradients": 2, "optimizer": 3, "activations": 4, "counted": 433334984},
                 "predicted_bytes": 433334984})
    tr.close()
    scalars, _ = read_scalars(tmp_path / "tensorboard")
    assert scalars["memory/counted_bytes"] == {1: 433334984} == scalars["memory/predicted_bytes"]
