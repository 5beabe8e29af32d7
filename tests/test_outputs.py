"""What a finished run saves loads back.

`dynatune eval` reproduces metrics.json's figures for every method; an adapter run saves a peft
adapter (and on request the merged model) that peft and transformers load; a method that updates
base weights refuses a model whose save would drop them; saved files are readable like any other.
"""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from dynatune.cli import main
from dynatune.errors import DynatuneError
from dynatune.integrations.hf import DynatuneCallback, prepare
from dynatune.methods import METHODS, build_method

from tiny import classifier, cls_examples

pytestmark = pytest.mark.usefixtures("one_thread")

# each method's quickest options; a method registered without an entry here fails the first test
OPTIONS = {"full": [], "topk": ["topk.k=1"], "bottomk": ["bottomk.k=1"], "lisa": ["lisa.k=1", "lisa.period=2"],
           "random": [], "lora": ["lora.r=4"], "dora": ["dora.r=4"], "vera": ["vera.r=8"], "trims": ["trims.tau=1"],
           "gradselect": [], "adagradselect": [], "dynalora": ["dynalora.r=4", "dynalora.period=2"],
           "dynavera": ["dynavera.r=8", "dynavera.period=2"], "ist": ["ist.r=4", "ist.t_c=2"],
           "spsft": ["spsft.r=4"]}
ADAPTER_METHODS = {"lora", "dora", "vera", "dynalora", "dynavera", "ist"}
# 40 examples in batches of 8 is 5 steps an epoch: 4 steps end mid-epoch, so every figure is the final model's
DATA = ["task=trec", "data.max_train=40", "data.max_eval=24", "batch_size=8", "max_length=32", "max_steps=4"]


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory):
    """run(method, *options): the directory of a finished CLI run of `method` on TREC, trained once."""
    done = {}

    def train(method, *options):
        key = (method, *options)
        if key not in done:
            out = tmp_path_factory.mktemp(method) / "run"
            assert main(["train", f"model={tiny_bert_dir}", *DATA, "progress=false", f"output_dir={out}",
                         f"method={method}", *OPTIONS[method], *options]) == 0
            done[key] = out
        return done[key]
    return train


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def evaluated(out, capsys, *overrides):
    capsys.readouterr()
    assert main(["eval", str(out), *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def refused(args, capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynatune: error:") and len(err.splitlines()) == 1
    return err


def test_every_method_has_options_here():
    assert sorted(OPTIONS) == sorted(METHODS)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_eval_reproduces_the_runs_figures_exactly(method, run, capsys):
    out = run(method)
    metrics = metrics_of(out)
    got = evaluated(out, capsys)
    assert got["test"] == metrics["test"]
    assert got["validation"] == metrics["validation"]
    saved = {p.name for p in (out / "model").iterdir()}
    if method in ADAPTER_METHODS:  # a peft adapter, no model of its own that would load with random base layers
        assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    else:
        assert {"config.json", "model.safetensors"} <= saved


@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_ist_bottleneck_adapters_save_with_safetensors_and_eval_to_the_same_figures(adapter, run, capsys):
    out = run("ist", f"ist.adapter={adapter}", "ist.bottleneck=8")
    metrics = metrics_of(out)
    got = evaluated(out, capsys)
    assert got["test"] == metrics["test"] and got["validation"] == metrics["validation"]
    saved = {p.name for p in (out / "model").iterdir()}
    assert {"bottleneck_config.json", "bottleneck_adapter.safetensors"} <= saved and "model.safetensors" not in saved
    config = json.loads((out / "model" / "bottleneck_config.json").read_text())
    assert config["kind"] == adapter and config["head"] == ["classifier"]
    # series on the MLP's up and down projections, parallel on its up projection (BERT has no gate)
    assert {m.split(".", 4)[-1] for m in config["modules"]} == (
        {"intermediate.dense", "output.dense"} if adapter == "series" else {"intermediate.dense"})
    assert all(".attention." not in m for m in config["modules"])


@pytest.mark.parametrize("method", ["full", "lora", "vera"])
def test_eval_reproduces_a_pure_bf16_run(method, run, capsys):
    # the run evaluated a bf16 model (adapters in bf16 too); an fp32 reload would not give its figures
    out = run(method, "precision=bf16")
    assert evaluated(out, capsys)["test"] == metrics_of(out)["test"]


def test_trims_run_that_ends_exited_evals_to_the_same_figures(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # from the paper's start a high rate moves TriMS's window each step: its last step runs 2 of the 3
    # blocks (state (1, 2, 2))
    assert main(["train", f"model={tiny_llama_dir}", "task=trec", "data.max_train=80", "data.max_eval=24",
                 "batch_size=8", "max_length=32", "max_steps=9", "lr=0.2", "method=trims", "trims.tau=1",
                 "trims.start=last", "trims.con=last", "progress=false", f"output_dir={out}"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    metrics = metrics_of(out)
    got = evaluated(out, capsys)
    assert got["test"] == metrics["test"] and got["validation"] == metrics["validation"]


def test_eval_uses_the_batch_size_the_budget_left(run, capsys):
    out = run("topk", "budget=0.25", "eval_batch_size=4096")
    metrics = metrics_of(out)
    # fewer than the 24 test examples: the batches differ from one batch of all of them
    assert 1 <= metrics["eval_batch_size"] < 24
    assert evaluated(out, capsys)["test"] == metrics["test"]


def trec_test_split():
    from dynatune.config import load_config
    from dynatune.data.tasks import load_task
    from dynatune.models import load_model

    cfg = load_config(None, DATA)
    _, tokenizer = load_model("minilm-l6", "classification", tokenizer_only=True)
    return load_task(cfg.task, tokenizer, cfg.data, cfg.max_length)


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_spsft_deltas_and_merged_model_reproduce_the_run(importance, run, tiny_bert_dir, capsys):
    """spsft.export=deltas saves rows + W_f + the head (small), loaded onto the base by `dynatune eval`;
    save_merged=true adds the merged model, a plain from_pretrained model: both give the run's figures."""
    from transformers import AutoModelForSequenceClassification

    from dynatune.data.metrics import evaluate
    from dynatune.models import load_model

    out = run("spsft", "spsft.export=deltas", "save_merged=true", f"spsft.importance={importance}",
              "spsft.calibration_examples=16")
    metrics, task = metrics_of(out), trec_test_split()
    saved = {p.name for p in (out / "model").iterdir()}
    assert {"spsft_deltas.safetensors", "spsft_config.json"} <= saved and "model.safetensors" not in saved
    deltas = (out / "model" / "spsft_deltas.safetensors").stat().st_size
    assert deltas < (out / "model" / "merged" / "model.safetensors").stat().st_size / 4
    got = evaluated(out, capsys)
    assert got["test"] == metrics["test"] and got["validation"] == metrics["validation"]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model" / "merged", num_labels=6)
    assert not any("spsft" in n for n in merged.state_dict())
    assert evaluate(merged, task, "test", metrics["eval_batch_size"]) == metrics["test"]
    model, _ = load_model(str(out / "model"), "classification", num_labels=6, saved=True)
    assert evaluate(model, task, "test", metrics["eval_batch_size"]) == metrics["test"]


def test_adapter_run_loads_with_peft_and_its_merged_model_with_from_pretrained(run, tiny_bert_dir):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    from dynatune.data.metrics import evaluate

    out = run("lora", "save_merged=true")
    metrics, task = metrics_of(out), trec_test_split()
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(tiny_bert_dir).resolve())
    assert adapter["modules_to_save"] == ["classifier"] and adapter["task_type"] == "SEQ_CLS"
    batch = metrics["eval_batch_size"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=6)
    by_peft = PeftModel.from_pretrained(base, out / "model")
    by_auto = AutoPeftModelForSequenceClassification.from_pretrained(out / "model", num_labels=6)
    assert evaluate(by_peft, task, "test", batch) == metrics["test"]
    assert evaluate(by_auto, task, "test", batch) == metrics["test"]
    merged, info = AutoModelForSequenceClassification.from_pretrained(out / "model" / "merged",
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert merged.config.id2label == dict(enumerate(task.label_names))
    got = evaluate(merged, task, "test", batch)
    assert got["accuracy"] == metrics["test"]["accuracy"]
    assert got["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)  # merged weights round differently


def test_saved_classifier_names_its_classes_and_files_are_world_readable(run):
    out = run("full", "checkpoint_every=2")
    umask = os.umask(0)
    os.umask(umask)
    for f in (out / "model" / "model.safetensors", out / "checkpoints" / "step-4" / "weights.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    names = metrics_of(out)["label_names"]
    assert names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)}


def test_eval_refuses_a_run_it_cannot_reproduce(run, tiny_bert_dir, tmp_path, capsys):
    from peft import LoraConfig, VeraConfig, get_peft_model, inject_adapter_in_model
    from transformers import AutoModelForSequenceClassification

    assert "is not a finished dynatune run" in refused(["eval", str(tmp_path / "nothing")], capsys)
    # what a lora run saved before adapters were exported: peft names in model.safetensors, which
    # from_pretrained does not match, so it loads freshly initialised base layers
    old = tmp_path / "old"
    shutil.copytree(run("full"), old)
    model = AutoModelForSequenceClassification.from_pretrained(old / "model")
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["query", "value"]), model).save_pretrained(old / "model")
    assert "freshly initialised" in refused(["eval", str(old)], capsys)
    # an adapter whose base model is gone
    orphan = tmp_path / "orphan"
    shutil.copytree(run("lora"), orphan)
    cfg_path = orphan / "model" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    cfg_path.write_text(json.dumps(cfg))
    assert "base model" in refused(["eval", str(orphan)], capsys)
    # an adapter without the task head (what a vera run saved before): peft would load a fresh head
    headless = tmp_path / "headless"
    shutil.copytree(run("lora"), headless)
    shutil.rmtree(headless / "model")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=6)
    get_peft_model(base, VeraConfig(r=8, target_modules=["query"])).save_pretrained(headless / "model")
    assert "without classifier." in refused(["eval", str(headless)], capsys)


def test_methods_that_update_base_weights_refuse_a_peft_model():
    from peft import LoraConfig, get_peft_model

    def peft_model():
        return get_peft_model(classifier("bert"), LoraConfig(r=2, target_modules=["query"]))

    refusing = set()
    for name in sorted(METHODS):
        try:
            prepare(peft_model(), build_method(name))
        except DynatuneError as err:
            assert "carries peft adapters" in str(err) and len(str(err).splitlines()) == 1
            refusing.add(name)
    assert refusing == set(METHODS) - ADAPTER_METHODS


def test_trainer_callback_refuses_full_on_a_peft_model_before_a_step(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(classifier("bert"), LoraConfig(r=2, target_modules=["query"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=cls_examples(8),
                      callbacks=[DynatuneCallback(build_method("full"))])
    with pytest.raises(DynatuneError, match="carries peft adapters"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cli_refuses_to_train_from_a_directory_holding_an_adapter(method, tiny_bert_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    # a base model with a peft adapter saved beside it: transformers loads both, and saving the result
    # writes the adapter alone, so what full trained in the base weights would be lost
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=6)
    get_peft_model(base, LoraConfig(r=2, target_modules=["query"])).save_pretrained(model)
    out = tmp_path / "run"
    err = refused(["train", f"model={model}", *DATA, f"method={method}", "progress=false", f"output_dir={out}"], capsys)
    assert "holds a peft adapter" in err
    assert not (out / "log.jsonl").exists()  # refused before training
