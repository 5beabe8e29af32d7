"""Baselines on the real models: full, topk, lisa, lora; three seeds each.

    python benchmarks/baselines_table.py            # everything (about 40 min on a 2-core CPU)
    python benchmarks/baselines_table.py --quick    # one seed, smaller subsets

MiniLM-L6 on TREC, SMS spam and movie sentiment (training sets subsampled to the same seeded
1,000 examples for every method, 2 epochs, max_length 48,
300 validation/test examples); SmolLM2-135M SFT on TREC as "Question: ... Type:"
with exact-match accuracy by greedy decoding, max_length 48, 24 steps.
Writes benchmarks/results/baselines_table.json.
"""
import argparse
import sys

import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table, run_one, save, summarise  # noqa: E402

# learning rates for a small encoder on ~1.5k examples (the methods' defaults are for larger runs)
MINILM_METHODS = {"full": ["method=full", "lr=1e-4"], "topk": ["method=topk", "topk.k=2", "lr=3e-4"],
                  "lisa": ["method=lisa", "lisa.k=2", "lisa.period=20", "lr=1e-4"],
                  "lora": ["method=lora", "lora.r=16", "lr=1e-3"]}
SMOL_METHODS = {"full": ["method=full", "lr=2e-5"], "topk": ["method=topk", "topk.k=4", "lr=1e-4"],
                "lisa": ["method=lisa", "lisa.k=4", "lisa.period=8", "lr=2e-5"],
                "lora": ["method=lora", "lora.r=16", "lr=5e-4"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["minilm", "smollm2"])
    ap.add_argument("--tasks", default="trec,sms-spam,movie-sentiment", help="MiniLM tasks (comma list)")
    ap.add_argument("--name", default="", help="suffix of the result file (to run parts in parallel)")
    ap.add_argument("--methods", default="full,topk,lisa,lora", help="methods to run (comma list)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two single-threaded runs side by side use 2 cores better than one
    seeds = [0] if args.quick else [0, 1, 2]
    n_train = 300 if args.quick else 1000
    rows = []
    name = "baselines_table" + ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "") + args.name
    if args.only in (None, "minilm"):
        for task in args.tasks.split(","):
            for label, opts in ((k, v) for k, v in MINILM_METHODS.items() if k in args.methods.split(",")):
                for seed in seeds:
                    r = run_one(["model=minilm-l6", f"task={task}", f"data.max_train={n_train}", "data.max_eval=300",
                                 "epochs=2", "batch_size=16", "max_length=48", f"seed={seed}",
                                 f"output_dir=runs/bench/{task}-{label}-{seed}", *opts])
                    rows.append({**r, "label": label})
                    print(task, label, seed, r["test"].get("accuracy"), r["median_step_s"], flush=True)
    if args.only in (None, "smollm2"):
        for label, opts in ((k, v) for k, v in SMOL_METHODS.items() if k in args.methods.split(",")):
            for seed in seeds:
                r = run_one(["model=smollm2-135m", "task=trec-sft", "data.max_train=400", "data.max_eval=100",
                             "max_steps=24" if not args.quick else "max_steps=6", "batch_size=8",
                             "max_length=48", "eval_each_epoch=false", f"seed={seed}",
                             f"output_dir=runs/bench/smol-{label}-{seed}", *opts])
                rows.append({**r, "label": label})
                print("trec-sft", label, seed, r["test"], r["median_step_s"], flush=True)
                save(name + "_partial", {"rows": rows})  # a long run keeps what it measured so far
    table = summarise([r for r in rows if r["model"] == "minilm-l6"], "accuracy") if any(
        r["model"] == "minilm-l6" for r in rows) else []
    smol = summarise([r for r in rows if r["model"] == "smollm2-135m"], "exact_match") if any(
        r["model"] == "smollm2-135m" for r in rows) else []
    if table:
        print_table(table, "accuracy")
    if smol:
        print_table(smol, "exact_match")
    print(save(name, {"rows": rows, "minilm_table": table, "smollm2_table": smol}))


if __name__ == "__main__":
    main()
