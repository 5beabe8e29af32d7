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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import collect, print_table, run_one, save, summarise  # noqa: E402

LR = {"full": 1e-4, "trims": 3e-4, "topk": 3e-4, "lisa": 1e-4, "lora": 1e-3}
NUM_LABELS = {"trec": 6, "sms-spam": 2, "movie-sentiment": 2}


def fitting_baselines(task: str, budget: float, batch: int, seq: int) -> dict:
    """The planner's largest fitting setting per family, priced for this CPU run."""
    from dynatune.planner import estimate

    rows = estimate({"model": "minilm-l6", "kind": "classification", "num_labels": NUM_LABELS[task],
                     "batch_size": batch, "seq_len": seq, "device_type": "cpu", "budget": budget,
                     "families": "top,lisa,lora"})
    return {r["family"]: r["config"] for r in rows if r.get("fits_best")}


def planned_runs(task: str, budgets: list[float], seeds: list[int]):
    """(label, budget, overrides) of every run, in the order they train; the planner's choices."""
    common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", "epochs=2", "batch_size=16",
              "max_length=48", f"task={task}"]
    runs, chosen = [], {}
    for seed in seeds:
        runs.append(("full", 1.0, [*common, "method=full", f"lr={LR['full']}", "budget=none", f"seed={seed}",
                                   f"output_dir=runs/trims-bench/{task}-full-{seed}"]))
    for b in budgets:
        best = fitting_baselines(task, b, 16, 48)
        chosen[f"{task}@{b}"] = best
        methods = {"trims": ["method=trims", f"budget={b}"]}
        for cfg in best.values():
            if cfg.startswith("top"):
                methods[cfg] = ["method=topk", f"topk.k={int(cfg[3:])}", "budget=none"]
            elif cfg.startswith("lora_r"):
                methods[cfg] = ["method=lora", f"lora.r={int(cfg[6:])}", "budget=none"]
            elif cfg.startswith("lisa"):
                methods[cfg] = ["method=lisa", f"lisa.k={int(cfg[4:])}", "lisa.period=20", "budget=none"]
        for label, opts in methods.items():
            method = opts[0].split("=")[1]
            for seed in seeds:
                runs.append((f"{label}@{b}", b, [*common, *opts, f"lr={LR[method]}", f"seed={seed}",
                                                 f"output_dir=runs/trims-bench/{task}-{label}-{b}-{seed}"]))
    return runs, chosen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="trec,sms-spam,movie-sentiment")
    ap.add_argument("--budgets", default="1.0,0.8,0.6,0.4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--name", default="")
    ap.add_argument("--collect", action="store_true",
                    help="do not train: read the figures back from the run directories of an earlier invocation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    rows, chosen = [], {}
    for task in args.tasks.split(","):
        runs, picked = planned_runs(task, budgets, seeds)
        chosen.update(picked)
        for label, b, overrides in runs:
            r = collect(overrides) if args.collect else run_one(overrides)
            rows.append({**r, "label": label, "budget": b})
            print(task, label, r["seed"], r["test"]["accuracy"], r["counted_peak_bytes"], flush=True)
    table = summarise(rows, "accuracy")
    print_table(table, "accuracy")
    print(save("trims_budgets" + args.name, {"rows": rows, "table": table, "planner_choice": chosen}))


if __name__ == "__main__":
    main()
