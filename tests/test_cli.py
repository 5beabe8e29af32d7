"""The command line end to end on real data with tiny local models, and its one-sentence errors."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dynatune.cli import main


def train(*args):
    return main(["train", *map(str, args)])


def fast(model_dir, out, *extra):
    return [f"model={model_dir}", "data.max_train=96", "data.max_eval=48", "batch_size=8", "max_length=32",
            f"output_dir={out}", "progress=false", *extra]


def test_train_eval_report_end_to_end(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*fast(tiny_bert_dir, out, "task=trec", "method=topk", "topk.k=1", "epochs=1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "mcc"}
    assert metrics["steps"] == 12  # 96 examples / 8
    # topk k=1 on a 3-block bert: block.2 + pooler + fresh classifier head
    emb = 30522 * 32 + 128 * 32 + 2 * 32 + 2 * 32
    assert 0 < metrics["trainable_params"] < emb
    assert metrics["memory"]["counted_peak_bytes"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(12))
    assert all(r["update"] == ["block.2", "head", "pooler"] for r in log)
    for png in ("loss.png", "memory.png", "units.png"):
        assert (out / png).stat().st_size > 1000
    # eval of the saved model reproduces the run's test figures
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    (out / "loss.png").unlink()
    assert main(["report", str(out)]) == 0 and (out / "loss.png").is_file()


def test_yaml_config_with_overrides(tiny_bert_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lisa\nlisa:\n  k: 1\n  period: 2\nmax_steps: 4\ntask: sms-spam\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), *fast(tiny_bert_dir, out, "lisa.period=3")]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "lisa" and saved["lisa"]["period"] == 3 and saved["lisa"]["k"] == 1
    assert "topk" not in saved  # only the chosen method's section is recorded


@pytest.mark.parametrize("preset, expected", [
    ("dynatune", {"start": "fit", "con": "last", "exits": "auto", "time": "model"}),
    ("paper", {"start": "last", "con": "last", "exits": "on", "time": "measured"})])
def test_config_json_records_the_options_a_preset_filled(preset, expected, tiny_bert_dir, tmp_path):
    """Two presets must never leave the same record: config.json holds what the run resolved."""
    out = tmp_path / "run"
    assert train(*fast(tiny_bert_dir, out, "task=trec", "method=trims", f"trims.preset={preset}",
                       "max_steps=2", "trims.tau=1")) == 0
    saved = json.loads((out / "config.json").read_text())["trims"]
    assert {k: saved[k] for k in expected} == expected
    # a resume starts from that record: the same options, now explicit
    from dynatune.config import load_config
    resumed = load_config(None, [f"resume={out}"]).trims
    assert {k: getattr(resumed, k) for k in expected} == expected


BAD = [
    (["model=no-such-model"], "unknown model"),
    (["model=arch:no-such-arch"], "no-such-arch"),
    (["method=nope"], "unknown method 'nope'"),
    (["epochz=3"], "unknown config key 'epochz'"),
    (["topk.kk=3"], "unknown config key 'topk.kk'"),
    (["task=classification", "data.train=/no/such/file.csv"], "/no/such/file.csv"),
    (["budget=200%"], "budget"),
    (["budget=12 GB"], "budget"),
    (["budget=-1"], "budget"),
    (["lr"], "key=value"),
    (["batch_size=10", "grad_accum=3"], "not divisible"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[b[1][:20] for b in BAD])
def test_bad_input_is_one_clear_sentence(args, needle, tmp_path, capsys):
    assert train(f"output_dir={tmp_path}/run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert err.startswith("dynatune: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained


def test_user_files_empty_and_missing_label_column(tiny_bert_dir, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert train(*fast(tiny_bert_dir, tmp_path / "r1", "task=classification", f"data.train={empty}")) == 2
    assert "empty" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"sentence": f"text {i}", "y": "ab"[i % 2]}) for i in range(20)))
    assert train(*fast(tiny_bert_dir, tmp_path / "r2", "task=classification", f"data.train={data}",
                       "data.text=sentence")) == 2
    err = capsys.readouterr().err
    assert "label" in err and "data.label=" in err
    # with the right mapping it trains, string labels and all
    assert train(*fast(tiny_bert_dir, tmp_path / "r3", "task=classification", f"data.train={data}",
                       "data.text=sentence", "data.label=y", "max_steps=2")) == 0


RESUME_CASES = {
    "full": ["method=full"],
    "lisa": ["method=lisa", "lisa.k=1", "lisa.period=2"],
    "lora": ["method=lora", "lora.r=4"],
}


@pytest.mark.parametrize("method", sorted(RESUME_CASES))
def test_resume_in_a_new_process_equals_a_straight_run(method, tiny_llama_dir, tmp_path):
    common = [f"model={tiny_llama_dir}", "task=trec-sft", "data.max_train=48", "data.max_eval=8",
              "batch_size=4", "max_length=32", "max_steps=6", "progress=false", "save_model=false",
              "lr=1e-3", *RESUME_CASES[method]]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(*common, f"output_dir={straight}", "checkpoint_every=6") == 0
    assert train(*common, f"output_dir={split}", "stop_after=3") == 0
    # the second half runs in a fresh interpreter: nothing carries over but the checkpoint
    code = "import sys; from dynatune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--resume", str(split), *common,
                           f"output_dir={split}", "checkpoint_every=6"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    a, b = log(straight), log(split)
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["update"] for r in a] == [r["update"] for r in b]
    wa = load_file(straight / "checkpoints" / "step-6" / "weights.safetensors")
    wb = load_file(split / "checkpoints" / "step-6" / "weights.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", ["trims", "adagradselect"])
def test_training_twice_in_one_process_leaves_nothing_of_the_first_run(tiny_bert_dir, tmp_path, method):
    # parameter hooks (gradselect's, the signals') are held from C++; train() must remove them, or
    # every run would keep its model, optimizer and method alive (benchmarks train many in a row)
    import gc

    def live_tensor_bytes():
        gc.collect()
        storages = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in gc.get_objects()
                    if torch.is_tensor(o)}
        return sum(storages.values())

    args = [f"method={method}", "budget=none", "epochs=1", "save_model=false"]
    assert train(*fast(tiny_bert_dir, tmp_path / "a", *args)) == 0
    after_one = live_tensor_bytes()
    for i in range(2):
        assert train(*fast(tiny_bert_dir, tmp_path / f"b{i}", *args)) == 0
    assert live_tensor_bytes() == after_one


def test_count_memory_false_trains_the_same_and_logs_no_counted_bytes(tiny_bert_dir, tmp_path):
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        # lisa: the plan changes mid-run, and the tiny BERT's dropout draws from the global RNG
        assert train(*fast(tiny_bert_dir, out, "task=trec", "method=lisa", "lisa.k=1", "lisa.period=3",
                           "max_steps=6", f"count_memory={flag}")) == 0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[flag] = (log, json.loads((out / "metrics.json").read_text()),
                      load_file(out / "model" / "model.safetensors"))
    (log_on, metrics_on, w_on), (log_off, metrics_off, w_off) = runs["true"], runs["false"]
    assert [r["loss"] for r in log_off] == [r["loss"] for r in log_on]
    assert [r["update"] for r in log_off] == [r["update"] for r in log_on]
    assert w_off.keys() == w_on.keys() and all(torch.equal(w_off[k], w_on[k]) for k in w_on)
    assert all(r["memory"]["activations"] > 0 for r in log_on) and metrics_on["memory"]["counted_peak_bytes"] > 0
    assert all(r["memory"] is None for r in log_off)
    assert metrics_off["memory"]["counted_peak_bytes"] is None and metrics_off["memory"]["counted_peak_terms"] is None
    assert (tmp_path / "false" / "memory.png").stat().st_size > 1000  # the plot still draws
