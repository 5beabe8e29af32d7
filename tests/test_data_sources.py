"""User data read through `datasets` (save_to_disk directories, Parquet, Hub names) and chat-format
data as SFT with the loss on assistant turns only.

Tokenizer: SmolLM2-135M-Instruct's (the asset cache), whose ChatML template adds a default system
message; the token positions below were read off its tokenisation by hand.
"""
import json

import pytest
import torch

from dynatune.cli import main
from dynatune.data import DataConfig, load_task
from dynatune.errors import DynatuneError

CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"}, {"role": "assistant", "content": "Berlin."}]
# <|im_start|>system\n...<|im_end|>\n (0-20) <|im_start|>user\nCapital of France?<|im_end|>\n (21-29)
# <|im_start|>assistant\n (30-33) Paris . <|im_end|> \n (34-37) <|im_start|>user\nAnd Germany?<|im_end|>\n (38-45)
# <|im_start|>assistant\n (46-49) Ber lin . <|im_end|> \n (50-54)
ASSISTANT_POSITIONS = [34, 35, 36, 37, 50, 51, 52, 53, 54]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from dynatune.assets import smollm2_hf_dir
    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_labels_only_on_assistant_tokens(tok, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    task = load_task("chat-sft", tok, DataConfig(train=f, validation=f), max_length=128)
    assert task.kind == "causal-lm" and len(task.train) == 3
    ex = task.train[0]
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == 55
    assert torch.nonzero(labels != -100).flatten().tolist() == ASSISTANT_POSITIONS
    assert torch.equal(labels[ASSISTANT_POSITIONS], ids[ASSISTANT_POSITIONS])   # targets are the tokens themselves
    assert tok.decode(ids[34:38]) == "Paris.<|im_end|>\n" and tok.decode(ids[50:55]) == "Berlin.<|im_end|>\n"
    assert tok.decode(ids[30:34]) == "<|im_start|>assistant\n"                   # the generation prompt: no loss
    batch = task.collate([task.train[0], task.train[1]])
    assert (batch["labels"] != -100).sum().item() == 2 * len(ASSISTANT_POSITIONS)


def test_chat_truncation_keeps_the_first_turn_and_drops_conversations_with_nothing_left(tok, tmp_path):
    late = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": late}])
    task = load_task("chat-sft", tok, DataConfig(train=f, validation=f), max_length=40)
    assert len(task.train) == 1                       # the long question leaves its answer past 40 tokens
    labels = task.train[0]["labels"]
    assert torch.nonzero(labels != -100).flatten().tolist() == [34, 35, 36, 37]
    assert task.truncated["train"] == {"examples": 1, "of": 1, "longest_tokens": 55}


@pytest.mark.parametrize("turns,needle", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ("hello", "not a list of messages"),
])
def test_bad_conversations_are_one_sentence(tok, tmp_path, turns, needle):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    with pytest.raises(DynatuneError, match=needle):
        load_task("chat-sft", tok, DataConfig(train=f, validation=f))


def test_chat_file_under_the_text_task_points_to_chat_sft(tok, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    with pytest.raises(DynatuneError, match="task=chat-sft"):
        load_task("text", tok, DataConfig(train=f, text="messages"))


ROWS = [{"text": f"question number {i}", "label": "yes" if i % 3 else "no"} for i in range(30)]


def tokenized(task, split):
    return [(r["input_ids"].tolist(), int(r["labels"])) for r in getattr(task, split)]


def test_save_to_disk_directory_and_parquet_read_like_jsonl(tok, tmp_path):
    from datasets import Dataset, DatasetDict
    j = write_jsonl(tmp_path / "train.jsonl", ROWS[:20])
    v = write_jsonl(tmp_path / "val.jsonl", ROWS[20:25])
    t = write_jsonl(tmp_path / "test.jsonl", ROWS[25:])
    ref = load_task("classification", tok, DataConfig(train=j, validation=v, test=t), max_length=16)

    dd = DatasetDict({"train": Dataset.from_list(ROWS[:20]), "validation": Dataset.from_list(ROWS[20:25]),
                      "test": Dataset.from_list(ROWS[25:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    # a DatasetDict given as data.train supplies its own validation and test splits
    from_dir = load_task("classification", tok, DataConfig(train=str(tmp_path / "dd")), max_length=16)
    for pq_split, rows in (("train", ROWS[:20]), ("val", ROWS[20:25]), ("test", ROWS[25:])):
        Dataset.from_list(rows).to_parquet(str(tmp_path / f"{pq_split}.parquet"))
    from_pq = load_task("classification", tok, DataConfig(train=str(tmp_path / "train.parquet"),
                                                          validation=str(tmp_path / "val.parquet"),
                                                          test=str(tmp_path / "test.parquet")), max_length=16)
    for split, n in (("train", 20), ("validation", 5), ("test", 5)):
        assert len(getattr(ref, split)) == n
        assert tokenized(from_dir, split) == tokenized(ref, split) == tokenized(from_pq, split)
    assert from_dir.label_names == ref.label_names == ["no", "yes"]


def test_a_single_saved_dataset_holds_out_validation(tok, tmp_path):
    from datasets import Dataset
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    task = load_task("classification", tok, DataConfig(train=str(tmp_path / "ds")), max_length=16)
    assert (len(task.train), len(task.validation), task.test) == (27, 3, None)


def test_a_hub_name_without_a_network_is_one_sentence(tok, monkeypatch):
    from dynatune.data import sources
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DynatuneError) as err:
        load_task("classification", tok, DataConfig(train="stanfordnlp/imdb"))
    msg = str(err.value)
    assert msg.startswith("data.train=stanfordnlp/imdb is not a local file or directory, and the Hugging Face Hub "
                          "cannot be reached") and msg.count(". ") == 0
    # a missing file with a file name is still a missing file, not a Hub name
    with pytest.raises(DynatuneError, match="does not exist"):
        load_task("classification", tok, DataConfig(train="nosuch.csv"))


def test_chat_sft_trains_end_to_end(tiny_llama_dir, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 8)
    run = tmp_path / "run"
    assert main(["train", f"model={tiny_llama_dir}", "task=chat-sft", f"data.train={f}", "batch_size=4",
                 "max_length=64", "max_steps=2", "progress=false", "method=full", "budget=none", "save_model=false",
                 f"output_dir={run}"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2 and m["validation"]["perplexity"] > 1
