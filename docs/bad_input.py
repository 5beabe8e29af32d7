"""Writes docs/bad-input.md: each bad input, run through `dynatune train` for real, with what it prints.

    python docs/bad_input.py          # needs the cached minilm-l6 and smollm2-135m (`dynatune fetch`)

The cases run in a scratch directory, so file names in the sentences are the relative ones a user
types; each refusal is also checked to exit with 2 and to leave no run directory behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

DOC = Path(__file__).with_name("bad-input.md")

# name -> bytes, written into the scratch directory before the cases run
FILES = {
    "broken.yaml": b"method: topk\ntopk:\n  k: [1\nlr: 1e-4\n",
    "latin1.yaml": b"method: topk\nnote: caf\xe9\n",
    "reviews.csv": b"sentence,label\ngreat,pos\nawful,neg\n",
    "latin1.csv": b"text,label\ngreat,pos\ncaf\xe9 au lait,pos\nawful,neg\n",
    "chat.jsonl": b"".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                   {"role": "assistant", "content": "hello"}]}).encode() + b"\n"
                           for i in range(4)),
    "no-answer.jsonl": b"".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}).encode() + b"\n"
                                for i in range(4)),
}

# (case, arguments of `dynatune train`); every one is refused before training
REFUSED = [
    ("unknown method", ["method=nope"]),
    ("unknown model", ["model=no-such-model"]),
    ("unknown architecture", ["model=arch:no-such-arch"]),
    ("unknown task", ["task=glue"]),
    ("unknown config key", ["epochz=3"]),
    ("unknown method option", ["topk.kk=3"]),
    ("not key=value", ["lr"]),
    ("batch not divisible", ["batch_size=10", "grad_accum=3"]),
    ("budget: percentage out of range", ["budget=200%"]),
    ("budget: space before the unit", ["budget=12 GB"]),
    ("budget: negative", ["budget=-1"]),
    ("budget: unknown unit", ["budget=12G"]),
    ("budget below the floor (encoder)", ["budget=50MB"]),
    ("budget below the floor (causal LM)", ["model=smollm2-135m", "task=trec-sft", "method=lora", "budget=200MB"]),
    ("fixed plans above the budget", ["method=topk", "topk.k=6", "budget=0.3"]),
    ("unknown metric_for_best", ["metric_for_best=bleu"]),
    ("fp16 on the CPU", ["precision=amp-fp16", "device=cpu"]),
    ("report_to unknown", ["report_to=mlflow"]),
    ("metric_for_best not the task's", ["metric_for_best=perplexity"]),
    ("missing config file", ["--config", "nope.yaml"]),
    ("malformed YAML", ["--config", "broken.yaml"]),
    ("config not UTF-8", ["--config", "latin1.yaml"]),
    ("missing data file", ["task=classification", "data.train=missing.csv"]),
    ("missing column", ["task=classification", "data.train=reviews.csv"]),
    ("data not UTF-8", ["task=classification", "data.train=latin1.csv"]),
    ("unknown data.encoding", ["task=classification", "data.train=latin1.csv", "data.encoding=latin-9000"]),
    ("chat-format JSONL under task=text", ["model=smollm2-135m", "task=text", "data.train=chat.jsonl",
                                           "data.text=messages"]),
    ("chat conversation without an assistant turn", ["model=smollm2-135m", "task=chat-sft",
                                                     "data.train=no-answer.jsonl"]),
]

# a warning, not a refusal: the run goes on
TRUNCATED = ("texts longer than max_length", ["max_length=8", "data.max_train=64", "data.max_eval=32",
                                              "method=full", "budget=none", "max_steps=1", "save_model=false"])

COMMON = ["progress=false", "device=cpu"]  # device: the budget sentences quote CPU predictions


def run(args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of `dynatune train ARGS`, warnings included as logging's last resort
    prints them when nothing is configured (a handler of our own: pytest configures logging)."""
    from dynatune.cli import main

    err = io.StringIO()
    shown, logger = logging.StreamHandler(err), logging.getLogger("dynatune")
    logger.addHandler(shown)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", *args, *COMMON])
    finally:
        logger.removeHandler(shown)
    return code, err.getvalue()


def code_spans(text: str) -> str:
    return "<br>".join("`` " + line.replace("|", "\\|") + " ``" for line in text.strip().splitlines())


def render() -> str:
    rows, here = [], os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for name, data in FILES.items():
                Path(name).write_bytes(data)
            for case, args in REFUSED:
                code, err = run(args)
                left = sorted(set(os.listdir()) - set(FILES))
                assert code == 2 and len(err.strip().splitlines()) == 1 and not left, (case, code, err, left)
                rows.append((case, args, code, err))
            case, args = TRUNCATED
            code, err = run(args)
            assert code == 0, err
            rows.append((case, args, code, err))
            [metrics] = Path("runs").glob("*/metrics.json")
            truncated = json.loads(metrics.read_text())["truncated"]
        finally:
            os.chdir(here)
    out = [
        "# Bad input: what `dynatune train` says",
        "",
        "Every mistake below is refused before training with one sentence on stderr and exit code 2, and",
        "leaves nothing on disk: the run directory and its config.json are created only once the model,",
        "data, task and budget are accepted (a directory that already existed is left as it was). Texts",
        "longer than max_length are not an error: each split with truncated examples gets one warning",
        "line, and metrics.json records `truncated` per split.",
        "",
        "Written by `python docs/bad_input.py`, which runs every case (default model MiniLM-L6, CPU).",
        "",
        "| case | `dynatune train ...` | exit | stderr |",
        "|---|---|---|---|",
    ]
    out += [f"| {case} | {code_spans(' '.join(args))} | {code} | {code_spans(err)} |" for case, args, code, err in rows]
    out += ["", "The last run's metrics.json says the same:", "", "```json",
            json.dumps({"truncated": truncated}, indent=2), "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    DOC.write_text(render())
    print(f"wrote {DOC}")
