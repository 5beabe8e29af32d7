"""DynaLoRA / DynaVeRA at 2/3 of the modules active against LoRA / VeRA with every module active (CPU).

    python benchmarks/dynalora_table.py                 # the full table: 3 tasks x 8 methods x 3 seeds + a 4-rate lr sweep
    python benchmarks/dynalora_table.py --smoke         # 2 steps per run, tiny data, seed 0, one rate: checks the script
    python benchmarks/dynalora_table.py --memory        # counted vs predicted bytes per term, one full-length step
    python benchmarks/dynalora_table.py --budget        # at 80% of LoRA's counted peak: DynaLoRA vs the best LoRA that fits
    python benchmarks/dynalora_table.py --epochs 6 --tasks trec --labels lora,dynalora_F,dynalora_B,dynalora_R
                                                        # a longer run: does the gap to LoRA close? (_e6 files)

MiniLM-L6 on TREC, SMS spam and movie sentiment, the same seeded 1,000 training examples for every
method, 2 epochs, batch 16, max_length 48, tested on 300 held-out examples. Every method adapts the
same targets (query, value: table 1's rows) at the same rank (LoRA r=8, VeRA r=256). DynaLoRA and
DynaVeRA keep 8 of the 12 modules active, reallocated every 50 steps by the discounted stochastic
allocator, with forward (F), backward (B) or random (R) importance. Each method's learning rate is
chosen on validation with seed 0, then used for all seeds: LoRA and VeRA from four rates each,
each dynamic variant from two: its all-active counterpart's chosen rate and the next higher.
Writes benchmarks/results/dynalora_table[_smoke].json with its provenance: rows, sweep, chosen
rates and the table (accuracy, effective trainable parameters, counted and predicted peaks,
optimizer bytes on the device at the peak, median step time).

--budget (after the table's runs, which it reads back): per task, the budget is 80% of the counted
peak of LoRA (query/value, r=8, every block; its chosen rate, seed 0) at a full-length batch of
max_length tokens: the memory model's prediction, which equals the counted bytes on the CPU (a
budget is held against that price; TREC's batches are shorter, so its run counted less). DynaLoRA (forward
importance, at DynaLoRA-F's chosen rate; both rates read back from the table's seed-0 runs) derives k and the lowest depth it may draw from from that
budget (`fraction=null`). Every LoRA that could compete is priced by dynatune itself (a fixed plan
over the budget is refused before training): rank 8 and 4 on every block or on the top N
blocks (saved activations, not adapter size, decide what fits on MiniLM). Those that fit and
adapt the most blocks are trained at LoRA's chosen rate on seed 0, the
best on validation is "the best LoRA that fits", and it and DynaLoRA run three seeds. Writes
benchmarks/results/dynalora_budget.json.

--memory: MiniLM-L6 (6 classes) in training mode, two steps on a batch of 16 x 48 tokens with no
padding, so what is counted is what the memory model prices: LoRA with all 12 query/value modules,
and DynaLoRA with 8 of 12 drawn anew each step by five seeds (random importance, stochastic
allocator), keep and offload. Writes benchmarks/results/dynalora_memory.json: the second step's
counted and predicted weights, gradients, optimizer state (keep: the first draw's too) and saved
activations per run.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (counted_steps, print_table, run_one, save, summarise, sweep_then_seeds,  # noqa: E402
                     table_arguments)

TASKS = ("trec", "sms-spam", "movie-sentiment")
TARGETS = "query,value"
LORA_RATES = ("1e-3", "3e-3", "1e-2", "3e-2")
VERA_RATES = ("3e-3", "1e-2", "3e-2", "1e-1")


def methods() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """label -> (overrides, candidate learning rates)."""
    out = {"lora": (["method=lora", f"lora.targets={TARGETS}", "lora.r=8"], LORA_RATES),
           "vera": (["method=vera", f"vera.targets={TARGETS}", "vera.r=256"], VERA_RATES)}
    for name, r, rates in (("dynalora", 8, LORA_RATES), ("dynavera", 256, VERA_RATES)):
        for tag, importance in (("F", "forward"), ("B", "backward"), ("R", "random")):
            out[f"{name}_{tag}"] = ([f"method={name}", f"{name}.targets={TARGETS}", f"{name}.r={r}",
                                     f"{name}.importance={importance}"], rates)
    return out


def memory_rows() -> list[dict]:
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model

    batch_shape = (16, 48)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, batch_shape, generator=g),
             "attention_mask": torch.ones(batch_shape, dtype=torch.long),
             "labels": torch.randint(0, 6, (batch_shape[0],), generator=g)}
    runs = [("lora", 0, "keep", {"targets": TARGETS})]
    runs += [("dynalora", seed, policy, {"targets": TARGETS, "importance": "random", "allocator": "stochastic",
                                         "period": 1})
             for policy in ("keep", "offload") for seed in range(5)]
    rows = []
    for name, seed, policy, opts in runs:
        model, _ = load_model("minilm-l6", "classification", num_labels=6, seed=0)
        model.train()  # dropout on, as in training: it decides what attention saves
        t = Tuner(model, build_method(name, seed=seed, state_policy=policy, **opts), lr=1e-3)
        t.set_budget(MemoryModel.from_tuner(t, batch_shape=batch_shape, device_type="cpu"), None)  # prices, no budget
        counted_steps(t, batch, 2)  # the second step's draw differs: keep then holds the first draw's state too
        pred = t.predict(t.plan)  # kept optimizer state included
        rec = t.record
        rows.append({"method": name, "seed": seed, "state_policy": policy,
                     "active": sorted(u for u in t.plan.update if u != "head"),
                     "counted": {"weights": rec.weights, "gradients": rec.gradients, "optimizer": rec.optimizer,
                                 "activations": rec.activations},
                     "predicted": {"weights": pred.weights, "gradients": pred.gradients, "optimizer": pred.optimizer,
                                   "activations": pred.activations + pred.activations_outside},
                     "block_states": pred.block_states})
        print(name, seed, policy, rows[-1]["counted"], rows[-1]["predicted"], flush=True)
        t.close_hooks()
    return rows


def main():
    ap = argparse.ArgumentParser()
    table_arguments(ap, TASKS)
    ap.add_argument("--memory", action="store_true", help="counted vs predicted bytes of one full-length step")
    ap.add_argument("--budget", action="store_true", help="at 80%% of LoRA's counted peak, vs the best LoRA that fits")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; other than 2, runs and JSON get an _e<N> suffix")
    args = ap.parse_args()
    longer = "" if args.epochs == 2 else f"_e{args.epochs}"
    torch.set_num_threads(1)
    if args.memory:
        print(save("dynalora_memory", {"batch_shape": [16, 48], "rows": memory_rows()}))
        return
    common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", f"epochs={args.epochs}", "batch_size=16",
              "max_length=48", "budget=none"]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        common += ["data.max_train=32", "data.max_eval=16", "max_steps=2", "eval_each_epoch=false"]
        seeds = [0]
    if args.budget:
        budget_table(common, args.tasks.split(","), seeds, args.smoke)
        return
    table_methods = methods()
    if args.labels:
        table_methods = {k: v for k, v in table_methods.items() if k in args.labels.split(",")}
    rows, sweep, chosen = [], [], {}
    root = "runs/dynalora-bench" + longer.replace("_", "-") + ("-smoke" if args.smoke else "")
    for task in args.tasks.split(","):
        for label, (opts, rates) in table_methods.items():
            base = "lora" if label.startswith("dynalora") else "vera" if label.startswith("dynavera") else None
            if base and f"{task}/{base}" in chosen:
                # the dynamic variants search around their all-active counterpart's rate: it and the next
                # higher (a module trains on ~2/3 of the steps), which keeps the sweep to 2 runs
                i = next(j for j, x in enumerate(rates) if float(x) == chosen[f"{task}/{base}"])
                rates = rates[i:i + 2]
            rates = rates[1:2] if args.smoke else rates
            lr, mine = sweep_then_seeds([*common, f"task={task}", *opts], rates, seeds, f"{root}/{task}-{label}",
                                        args.reuse, sweep, label)
            chosen[f"{task}/{label}"] = float(lr)
            rows += mine
    table = summarise(rows, "accuracy")
    for row in table:
        mine = [r for r in rows if r["task"] == row["task"] and r["label"] == row["label"]]
        row["lr"] = chosen[f"{row['task']}/{row['label']}"]
        row["predicted_peak_MiB"] = statistics.mean(r["predicted_peak_bytes"] for r in mine) / 2**20
        row["optimizer_MiB_at_peak"] = statistics.mean(r["optimizer_bytes_at_peak"] for r in mine) / 2**20
        base = "lora" if row["label"].startswith("dynalora") else "vera" if row["label"].startswith("dynavera") else None
        if base:  # same seed, same data order: the paired difference removes the split's luck
            row[f"paired_vs_{base}"], row[f"paired_vs_{base}_std"] = paired(rows, row["task"], row["label"], base)
    print_table(table, "accuracy")
    name = "dynalora_table" + longer + ("_smoke" if args.smoke else "")
    print(save(name, {"rows": rows, "sweep": sweep, "chosen_lr": chosen, "table": table}))


def paired(rows, task, label, base):
    """Mean and spread over seeds of accuracy(label) - accuracy(base), seed by seed."""
    acc = {(r["label"], r["seed"]): r["test"]["accuracy"] for r in rows if r["task"] == task}
    diffs = [acc[(label, s)] - acc[(base, s)] for (lab, s) in acc if lab == label and (base, s) in acc]
    return (statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0) if diffs else (None, None)


def budget_table(common, tasks, seeds, smoke):
    """DynaLoRA at 80% of LoRA's counted peak against the best LoRA that fits that budget."""
    from dynatune.errors import BudgetError

    root = "runs/dynalora-bench" + ("-smoke" if smoke else "")
    rows, tried = [], []

    def chosen(task, label, rates):
        """The table's choice, read back from its seed-0 runs: the best validation accuracy."""
        opts, _ = methods()[label]
        val = {lr: (run_one([*common, f"task={task}", *opts, f"lr={lr}", "seed=0",
                             f"output_dir={root}/{task}-{label}-lr{lr}-0"], reuse=True)["validation"] or {})
               .get("accuracy", 0) for lr in rates}
        return max(rates, key=lambda x: val[x])

    for task in tasks:
        lr_lora = chosen(task, "lora", LORA_RATES[1:2] if smoke else LORA_RATES)
        i = LORA_RATES.index(lr_lora)
        lr_dyn = chosen(task, "dynalora_F", LORA_RATES[1:2] if smoke else LORA_RATES[i:i + 2])
        opts, _ = methods()["lora"]
        ref = run_one([*common, f"task={task}", *opts, f"lr={lr_lora}", "seed=0",
                       f"output_dir={root}/{task}-lora-lr{lr_lora}-0"], reuse=True)
        # LoRA's counted peak at a full-length batch (max_length tokens), which the memory model predicts
        # exactly on the CPU: every run is priced at that length, whatever its batches' padding
        budget = int(0.8 * ref["predicted_peak_bytes"])
        on_budget = [x for x in common if not x.startswith("budget=")] + [f"task={task}", f"budget={budget}B"]
        fits = {}
        for r in (8, 4):  # every block, then the top N: backward stops below the lowest adapter
            for blocks in ("all", *(f"top:{n}" for n in range(5, 0, -1))):
                label = f"lora_r{r}_{blocks.replace(':', '')}"
                over = [*on_budget, "method=lora", f"lora.targets={TARGETS}", f"lora.r={r}", f"lora.blocks={blocks}",
                        f"lr={lr_lora}", "seed=0", f"output_dir={root}/budget-{task}-{label}-0"]
                try:
                    fits[label] = (over, run_one(over, reuse=True), blocks)
                    tried.append({"task": task, "label": label, "fits": True})
                    print("fits", task, label, flush=True)
                    break  # fewer blocks at this rank fit too, and adapt less
                except BudgetError as e:
                    tried.append({"task": task, "label": label, "fits": False, "why": str(e)})
                    print("over", task, label, flush=True)
        most = max(len_blocks(b) for _, _, b in fits.values())
        best = max((k for k, v in fits.items() if len_blocks(v[2]) == most),
                   key=lambda k: (fits[k][1]["validation"] or {}).get("accuracy", 0))
        dyn = [*on_budget, "method=dynalora", f"dynalora.targets={TARGETS}", "dynalora.r=8", "dynalora.fraction=null",
               f"lr={lr_dyn}"]
        for seed in seeds:
            for label, over in ((best, fits[best][0]), ("dynalora_F", dyn + [f"output_dir={root}/budget-{task}-dynalora_F-0"])):
                over = [x for x in over if not x.startswith(("seed=", "output_dir="))]
                over += [f"seed={seed}", f"output_dir={root}/budget-{task}-{label}-{seed}"]
                r = run_one(over, reuse=True)
                rows.append({**r, "label": label if label == "dynalora_F" else "best_fitting_lora", "config": label,
                             "budget_bytes": budget, "lora_counted_peak_bytes": ref["counted_peak_bytes"],
                             "lora_predicted_peak_bytes": ref["predicted_peak_bytes"]})
                print(task, label, seed, r["test"].get("accuracy"), r["counted_peak_bytes"], budget, flush=True)
    table = summarise(rows, "accuracy")
    for row in table:
        mine = [r for r in rows if r["task"] == row["task"] and r["label"] == row["label"]]
        row["config"] = mine[0]["config"]
        row["budget_MiB"] = mine[0]["budget_bytes"] / 2**20
        row["final_plan"] = mine[0]["final_plan"]
        if row["label"] == "dynalora_F":
            row["paired_vs_best_lora"], row["paired_vs_best_lora_std"] = paired(rows, row["task"], row["label"],
                                                                                "best_fitting_lora")
    print_table(table, "accuracy")
    print(save("dynalora_budget" + ("_smoke" if smoke else ""), {"rows": rows, "priced": tried, "table": table}))


def len_blocks(blocks: str) -> int:
    return 6 if blocks == "all" else int(blocks[4:])  # MiniLM-L6


if __name__ == "__main__":
    main()
