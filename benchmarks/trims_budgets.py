"""TriMS against the baselines that fit the same memory budget (MiniLM-L6, CPU).

    python benchmarks/trims_budgets.py                                   # 3 tasks x 4 budgets x 3 seeds
    python benchmarks/trims_budgets.py --tasks trec --budgets 0.8,0.6,0.4 --seeds 0,1,2

Budgets are fractions of full fine-tuning's predicted peak. For each budget the planner
(`dynatune estimate`) picks the largest top-k, the largest LoRA rank and the largest LISA k
that fit; TriMS runs with the budget itself. Every method sees the same seeded 1,000 training
examples (2 epochs, batch 16, max_length 48) and the same 300 test examples.
Writes benchmarks/results/trims_budgets<suffix>.json.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table, run_one, save, summarise  # noqa: E402

LR = {"full": 1e-4, "trims": 3e-4, "topk": 3e-4, "lisa": 1e-4, "lora": 1e-3}
NUM_LABELS = {"trec": 6, "sms-spam": 2, "movie-sentiment": 2}


def fitting_baselines(task: str, budget: float, batch: int, seq: int) -> dict:
    """The planner's largest fitting setting per family, priced for this CPU run."""
    from dynatune.planner import estimate

    rows = estimate({"model": "minilm-l6", "kind": "classification", "num_labels": NUM_LABELS[task],
                     "batch_size": batch, "seq_len": seq, "device_type": "cpu", "budget": budget,
                     "families": "top,lisa,lora"})
    return {r["family"]: r["config"] for r in rows if r.get("fits_best")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="trec,sms-spam,movie-sentiment")
    ap.add_argument("--budgets", default="1.0,0.8,0.6,0.4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", "epochs=2", "batch_size=16",
              "max_length=48"]
    rows, chosen = [], {}
    for task in args.tasks.split(","):
        for seed in seeds:
            r = run_one([*common, f"task={task}", "method=full", f"lr={LR['full']}", "budget=none", f"seed={seed}",
                         f"output_dir=runs/trims-bench/{task}-full-{seed}"])
            rows.append({**r, "label": "full", "budget": 1.0})
            print(task, "full", seed, r["test"]["accuracy"], flush=True)
        for b in [float(x) for x in args.budgets.split(",")]:
            best = fitting_baselines(task, b, 16, 48)
            chosen[f"{task}@{b}"] = best
            runs = {"trims": ["method=trims", f"budget={b}"]}
            for cfg in best.values():
                if cfg.startswith("top"):
                    runs[cfg] = ["method=topk", f"topk.k={int(cfg[3:])}", "budget=none"]
                elif cfg.startswith("lora_r"):
                    runs[cfg] = ["method=lora", f"lora.r={int(cfg[6:])}", "budget=none"]
                elif cfg.startswith("lisa"):
                    runs[cfg] = ["method=lisa", f"lisa.k={int(cfg[4:])}", "lisa.period=20", "budget=none"]
            for label, opts in runs.items():
                method = opts[0].split("=")[1]
                for seed in seeds:
                    r = run_one([*common, f"task={task}", *opts, f"lr={LR[method]}", f"seed={seed}",
                                 f"output_dir=runs/trims-bench/{task}-{label}-{b}-{seed}"])
                    rows.append({**r, "label": f"{label}@{b}", "budget": b})
                    print(task, label, b, seed, r["test"]["accuracy"], r["counted_peak_bytes"], flush=True)
    table = summarise(rows, "accuracy")
    print_table(table, "accuracy")
    print(save("trims_budgets" + args.name, {"rows": rows, "table": table, "planner_choice": chosen}))


if __name__ == "__main__":
    main()
