"""AdaGradSelect against full fine-tuning and LoRA r=128 (CPU).

    python benchmarks/adagradselect_table.py --only minilm      # MiniLM-L6 on TREC, k = 15/30/45% of 8 blocks
    python benchmarks/adagradselect_table.py --only smollm2     # SmolLM2-135M SFT, k = 10/20/30% of 32 blocks

MiniLM: the same seeded 1,000 TREC questions for every method, 2 epochs, batch 16, max_length 48.
SmolLM2: trec-sft ("Question: ... Type:" -> label), 400 examples, 24 steps, batch 8, max_length 48.
Reports accuracy (exact match for SFT), counted peak, device-resident optimizer bytes at the peak,
median step time. Writes benchmarks/results/adagradselect_table_<part>.json.

With --lr-sweep LR1,LR2,...: each method first trains seed 0 at every listed learning rate; the one
with the best validation score is kept for all seeds (test figures are never used to choose).
The part's file then ends in _lr_sweep and records every sweep run.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table, run_one, save, summarise  # noqa: E402


def with_lr(opts: list[str], lr) -> list[str]:
    """A method's overrides with its learning rate replaced."""
    return [o for o in opts if not o.startswith("lr=")] + [f"lr={lr}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["minilm", "smollm2"], required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labels", default="", help="comma-separated subset of the methods (to split a run over processes)")
    ap.add_argument("--name", default="", help="suffix of the results file")
    ap.add_argument("--reuse", action="store_true", help="read back finished runs of the same config instead of "
                                                        "training them again")
    ap.add_argument("--lr-sweep", default="", help="comma-separated learning rates to choose from on validation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.only == "minilm":
        common = ["model=minilm-l6", "task=trec", "data.max_train=1000", "data.max_eval=300", "epochs=2",
                  "batch_size=16", "max_length=48"]
        methods = {"full": ["method=full", "lr=1e-4"], "lora_r128": ["method=lora", "lora.r=128", "lr=1e-3"],
                   **{f"adagradselect_{k}": ["method=adagradselect", f"adagradselect.k={k}", "lr=1e-4"]
                      for k in (0.15, 0.3, 0.45)}}
        metric = "accuracy"
    else:
        common = ["model=smollm2-135m", "task=trec-sft", "data.max_train=400", "data.max_eval=100", "max_steps=24",
                  "batch_size=8", "max_length=48", "eval_each_epoch=false"]
        methods = {"full": ["method=full", "lr=2e-5"], "lora_r128": ["method=lora", "lora.r=128", "lr=5e-4"],
                   **{f"adagradselect_{k}": ["method=adagradselect", f"adagradselect.k={k}",
                                             "adagradselect.steps_per_epoch=24", "lr=2e-5"] for k in (0.1, 0.2, 0.3)}}
        metric = "exact_match"
    if args.labels:
        methods = {k: v for k, v in methods.items() if k in args.labels.split(",")}
    rows, sweep, chosen_lr = [], [], {}
    for label, opts in methods.items():
        done = {}
        if args.lr_sweep:  # choose the learning rate on validation with seed 0, then run every seed
            for lr in args.lr_sweep.split(","):
                r = run_one([*common, *with_lr(opts, lr), "seed=0", "budget=none",
                             f"output_dir=runs/ags-bench/{args.only}-{label}-lr{lr}-0"], reuse=args.reuse)
                sweep.append({**r, "label": label, "lr": float(lr)})
                print("sweep", label, lr, (r["validation"] or {}).get(metric), flush=True)
            best = max((r for r in sweep if r["label"] == label), key=lambda r: (r["validation"] or {}).get(metric, 0))
            chosen_lr[label] = best["lr"]
            opts = with_lr(opts, best["lr"])
            done[0] = best
        for seed in seeds:
            r = done.get(seed) or run_one([*common, *opts, f"seed={seed}", "budget=none",
                                           f"output_dir=runs/ags-bench/{args.only}-{label}-{seed}"], reuse=args.reuse)
            rows.append({**r, "label": label})
            print(label, seed, r["test"].get(metric), r["counted_peak_bytes"], r["optimizer_bytes_at_peak"],
                  r["median_step_s"], flush=True)
    table = summarise(rows, metric)
    for row in table:
        row["optimizer_MiB_at_peak"] = sum(r["optimizer_bytes_at_peak"] for r in rows
                                           if r["label"] == row["label"]) / row["seeds"] / 2**20
    print_table(table, metric)
    name = f"adagradselect_table_{args.only}" + ("_lr_sweep" if args.lr_sweep else "") + args.name
    extra = {"chosen_lr": chosen_lr, "sweep": sweep} if args.lr_sweep else {}
    print(save(name, {"rows": rows, "table": table, **extra}))


if __name__ == "__main__":
    main()
