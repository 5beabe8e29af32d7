"""Bad input: one sentence on stderr, exit code 2, before any training, and nothing left on disk."""
import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest

from dynatune.cli import main
from dynatune.data import DataConfig, load_task
from dynatune.data.tasks import column


def one_sentence(err: str) -> str:
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("dynatune: error: ") and err.endswith("."), err
    msg = err[len("dynatune: error: "):]
    assert msg.replace("e.g. ", "").count(". ") == 0, msg
    return msg


@pytest.fixture
def stderr(capsys, caplog):
    """What a run printed on stderr, with the warnings logging prints there outside pytest."""
    def read() -> str:
        logged = "".join(f"{r.getMessage()}\n" for r in caplog.records)
        caplog.clear()
        return capsys.readouterr().err + logged
    return read


def refused(stderr, out, *args, config=None) -> str:
    """Runs `dynatune train` expecting a refusal: exit 2, one sentence, no run directory."""
    argv = ["train", *(["--config", str(config)] if config else []), f"output_dir={out}", "progress=false", *args]
    assert main(argv) == 2
    msg = one_sentence(stderr())
    assert not out.exists()
    return msg


def fast(model_dir, *extra):
    return [f"model={model_dir}", "data.max_train=16", "data.max_eval=8", "batch_size=4", "max_length=32",
            "max_steps=1", "save_model=false", *extra]


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


YAML = [
    (b"method: topk\ntopk:\n  k: [1\nlr: 1e-4\n",  # the message also says where the open list starts
     "is not valid YAML at line 4, column 3: expected ',' or ']', but got ':' (while parsing a flow sequence from "
     "line 3, column 6)"),
    (b"method: topk\n\tlr: 1e-4\n", "is not valid YAML at line 2, column 1: found character '\\t'"),
    (b"method: topk\nlr: \x07\n", "is not valid YAML at line 2: unacceptable character #x0007"),
    (b"method: topk\nnote: caf\xe9\n", "is not utf-8 text: line 2 holds the byte 0xe9"),
]


@pytest.mark.parametrize("text,needle", YAML, ids=["parser", "tab", "control-character", "latin-1"])
def test_malformed_yaml_names_the_file_line_and_column(text, needle, tmp_path, stderr):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text)
    assert f"config file '{bad}' {needle}" in refused(stderr, tmp_path / "run", config=bad)


def test_non_utf8_data_names_the_file_and_line_and_data_encoding_reads_it(tiny_bert_dir, tmp_path, stderr, one_thread):
    data = tmp_path / "d.csv"
    rows = [f"example {i},{'ab'[i % 2]}".encode() for i in range(12)]
    rows[2] = "café au lait,a".encode("latin-1")
    data.write_bytes(b"text,label\n" + b"\n".join(rows) + b"\n")
    args = fast(tiny_bert_dir, "method=topk", "task=classification", f"data.train={data}")
    msg = refused(stderr, tmp_path / "run", *args)
    assert f"data file {data}" in msg and "line 4" in msg and "data.encoding=latin-1" in msg
    assert "unknown encoding 'latin-9000'" in refused(stderr, tmp_path / "run", *args, "data.encoding=latin-9000")
    assert main(["train", f"output_dir={tmp_path / 'ok'}", "progress=false", *args, "data.encoding=latin-1"]) == 0
    td = load_task("classification", _tokenizer(tiny_bert_dir), DataConfig(train=str(data), encoding="latin-1"), 32)
    assert "café au lait" in column(td.train, "text") + column(td.validation, "text")


def test_truncation_is_counted_per_split_warned_once_and_in_metrics(tiny_bert_dir, tmp_path, caplog, one_thread):
    tok = _tokenizer(tiny_bert_dir)
    splits = {"train": [3, 40, 4, 50, 5, 6] * 2, "validation": [30, 2, 3], "test": [60, 1]}  # words per example
    for split, words in splits.items():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": "word " * n, "label": "ab"[i % 2]})
                                                          for i, n in enumerate(words)))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dynatune"):
        assert main(["train", f"output_dir={out}", "progress=false",
                     *fast(tiny_bert_dir, "method=topk", "task=classification", "max_length=16",
                           *(f"data.{split}={tmp_path / split}.jsonl" for split in splits))]) == 0
    tokens = {n: len(tok("word " * n)["input_ids"]) for n in (30, 50, 60)}  # n words and [CLS] [SEP]
    assert json.loads((out / "metrics.json").read_text())["truncated"] == {
        "train": {"examples": 4, "of": 12, "longest_tokens": tokens[50]},
        "validation": {"examples": 1, "of": 3, "longest_tokens": tokens[30]},
        "test": {"examples": 1, "of": 2, "longest_tokens": tokens[60]}}
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warned == [f"4 of 12 train examples were truncated to max_length=16 tokens (the longest has {tokens[50]} "
                      "tokens).", f"1 of 3 validation examples were truncated to max_length=16 tokens (the longest "
                      f"has {tokens[30]} tokens).", f"1 of 2 test examples were truncated to max_length=16 tokens "
                      f"(the longest has {tokens[60]} tokens)."]


def test_truncation_counts_sft_prompts_and_answers(tiny_llama_dir):
    tok = _tokenizer(tiny_llama_dir)
    td = load_task("trec-sft", tok, DataConfig(max_train=40, max_eval=10), 12)
    rows = td.train.with_format(None)
    # SmolLM2's tokenizer adds no BOS: prompt + answer + eos, before the prompt's start and the answer's end are cut
    whole = [sum(len(tok(r[k], add_special_tokens=False)["input_ids"]) for k in ("prompt", "answer")) + 1
             for r in rows]
    n = sum(w > len(r["input_ids"]) for w, r in zip(whole, rows))
    assert n > 0 and td.truncated["train"] == {"examples": n, "of": 40, "longest_tokens": max(whole)}
    assert load_task("trec-sft", tok, DataConfig(max_train=40, max_eval=10), 256).truncated == {}


@pytest.mark.parametrize("text_column", [[], ["data.text=messages"]], ids=["default-text-column", "messages-column"])
def test_chat_jsonl_for_the_text_task_is_refused_pointing_to_chat_sft(tiny_llama_dir, tmp_path, stderr, text_column):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": "hello"}]})
                              for i in range(10)))
    msg = refused(stderr, tmp_path / "run", *fast(tiny_llama_dir, "method=full", "task=text", f"data.train={chat}",
                                                        *text_column))
    assert msg == (f"data file {chat} is chat-format data (column 'messages' holds lists of role/content messages), "
                   "which this task would train on as the Python text of each list; use task=chat-sft, which renders "
                   "each conversation with the tokenizer's chat template and trains on the assistant turns.")


def test_budget_floor_advises_only_what_applies_to_the_model(tiny_bert_dir, tiny_llama_dir, tmp_path, stderr):
    encoder = refused(stderr, tmp_path / "run", *fast(tiny_bert_dir, "method=lora", "budget=100KB"))
    assert "lower batch_size or max_length" in encoder and "lower lora.r" in encoder
    assert "chunked" not in encoder
    causal = refused(stderr, tmp_path / "run", *fast(tiny_llama_dir, "task=trec-sft", "method=topk", "budget=100KB"))
    assert "lower batch_size or max_length" in causal and "chunked_loss=1024" in causal
    assert "topk.k" not in causal  # its smallest plan (k=1) is refused: a smaller k cannot help


def test_fixed_plans_above_the_budget_advise_a_smaller_setting(tiny_bert_dir, tmp_path, stderr):
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.methods.baselines import TopKConfig
    from dynatune.models import load_model

    model, _ = load_model(str(tiny_bert_dir), "classification", num_labels=6)  # TREC's 6 classes
    method = build_method("topk", TopKConfig(k=3))
    mm = MemoryModel.from_tuner(Tuner(model, method, lr=1e-4), batch_shape=(4, 32), device_type="cpu")
    top1, top3 = (mm.predict(method.smallest_plan(mm.units)).predicted_peak_bytes,
                  mm.predict(method.largest_plan(mm.units)).predicted_peak_bytes)
    assert top1 < top3
    budget = f"{math.ceil((top1 + top3) / 2 / 0.97)}B"  # with the 3% margin, top-1 fits and top-3 does not
    msg = refused(stderr, tmp_path / "run", *fast(tiny_bert_dir, "method=topk", "topk.k=3", f"budget={budget}"))
    assert "topk's largest plan" in msg and "lower topk.k" in msg and "chunked" not in msg


@pytest.mark.parametrize("case", ["model", "data", "budget", "first_plan"])
def test_a_refused_run_leaves_no_directory_and_a_users_directory_as_it_was(case, tiny_bert_dir, tmp_path, stderr):
    args = {"model": ["model=no-such-model"],
            "data": [f"model={tiny_bert_dir}", "task=classification", f"data.train={tmp_path / 'none.csv'}"],
            "budget": [f"model={tiny_bert_dir}", "budget=10KB"],
            # passes the floor (the fresh head alone fits) but not gradselect's first plan: every block at once
            "first_plan": [f"model={tiny_bert_dir}", "method=gradselect", "gradselect.k=1.0", "budget=0.3"]}[case]
    refused(stderr, tmp_path / "run", *args)
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    assert main(["train", f"output_dir={own}", "progress=false", *args]) == 2
    one_sentence(stderr())
    assert [p.name for p in own.iterdir()] == ["notes.txt"] and (own / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_names_the_real_default(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: TriMS under a budget of 60% of full fine-tuning's predicted peak, on MiniLM-L6 and TREC)" in out


@pytest.mark.slow
def test_the_bad_input_doc_is_what_dynatune_prints():
    docs = Path(__file__).parents[1] / "docs"
    spec = importlib.util.spec_from_file_location("bad_input_doc", docs / "bad_input.py")
    doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc)
    assert doc.render() == (docs / "bad-input.md").read_text()  # regenerate: python docs/bad_input.py
    assert "`docs/bad-input.md`" in (docs.parent / "README.md").read_text()


def test_output_dir_with_an_unknown_brace_is_one_sentence(tmp_path, stderr):
    """Today a KeyError traceback; the braces output_dir may use are {method} and {task}."""
    msg = refused(stderr, tmp_path / "runs", f"output_dir={tmp_path / 'runs' / '{foo}'}")
    assert "can name only {method} and {task}" in msg and "foo" in msg
