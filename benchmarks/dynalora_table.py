"""DynaLoRA / DynaVeRA at 2/3 of the modules active against LoRA / VeRA with every module active (CPU).

    python benchmarks/dynalora_table.py                 # the full table: 3 tasks x 8 methods x 3 seeds + a 4-rate lr sweep
    python benchmarks/dynalora_table.py --smoke         # 2 steps per run, tiny data, seed 0, one rate: checks the script
    python benchmarks/dynalora_table.py --memory        # counted vs predicted bytes per term, one full-length step

MiniLM-L6 on TREC, SMS spam and movie sentiment, the same seeded 1,000 training examples for every
method, 2 epochs, batch 16, max_length 48, tested on 300 held-out examples. Every method adapts the
same targets (query, value: table 1's rows) at the same rank (LoRA r=8, VeRA r=256). DynaLoRA and
DynaVeRA keep 8 of the 12 modules active, reallocated every 50 steps by the discounted stochastic
allocator, with forward (F), backward (B) or random (R) importance. Each method's learning rate is
chosen on validation with seed 0 from its family's candidates, then used for all seeds.
Writes benchmarks/results/dynalora_table[_smoke].json with its provenance: rows, sweep, chosen
rates and the table (accuracy, effective trainable parameters, counted and predicted peaks,
optimizer bytes on the device at the peak, median step time).

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
from harness import print_table, run_one, save, summarise  # noqa: E402

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
        for _ in range(2):  # the second step's draw differs: keep then holds the first draw's state too
            t.begin_step()
            t.model(**batch).loss.backward()
            t.after_backward()
            t.optimizer.step()
            t.after_optimizer_step()
            t.optimizer.zero_grad(set_to_none=True)
            t.end_step(None)
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
    ap.add_argument("--smoke", action="store_true", help="2 steps per run on 32 examples, seed 0, the middle rate")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--labels", default="", help="comma-separated subset of the methods")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--reuse", action="store_true", help="read back finished runs of the same config")
    ap.add_argument("--memory", action="store_true", help="counted vs predicted bytes of one full-length step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.memory:
        print(save("dynalora_memory", {"batch_shape": [16, 48], "rows": memory_rows()}))
        return
    common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", "epochs=2", "batch_size=16",
              "max_length=48", "budget=none"]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        common += ["data.max_train=32", "data.max_eval=16", "max_steps=2", "eval_each_epoch=false"]
        seeds = [0]
    table_methods = methods()
    if args.labels:
        table_methods = {k: v for k, v in table_methods.items() if k in args.labels.split(",")}
    rows, sweep, chosen = [], [], {}
    root = "runs/dynalora-bench" + ("-smoke" if args.smoke else "")
    for task in args.tasks.split(","):
        for label, (opts, rates) in table_methods.items():
            rates = rates[1:2] if args.smoke else rates
            runs = {}
            for lr in rates:  # seed 0 at every candidate; the best validation accuracy is kept
                r = run_one([*common, f"task={task}", *opts, f"lr={lr}", "seed=0",
                             f"output_dir={root}/{task}-{label}-lr{lr}-0"], reuse=args.reuse)
                runs[lr] = r
                sweep.append({**r, "label": label, "lr": float(lr)})
                print("sweep", task, label, lr, (r["validation"] or {}).get("accuracy"), flush=True)
            lr = max(rates, key=lambda x: (runs[x]["validation"] or {}).get("accuracy", 0))
            chosen[f"{task}/{label}"] = float(lr)
            for seed in seeds:
                r = runs[lr] if seed == 0 else run_one(
                    [*common, f"task={task}", *opts, f"lr={lr}", f"seed={seed}",
                     f"output_dir={root}/{task}-{label}-lr{lr}-{seed}"], reuse=args.reuse)
                rows.append({**r, "label": label, "lr": float(lr)})
                print(task, label, seed, r["test"].get("accuracy"), r["trainable_params"], r["counted_peak_bytes"],
                      r["optimizer_bytes_at_peak"], flush=True)
    table = summarise(rows, "accuracy")
    for row in table:
        mine = [r for r in rows if r["task"] == row["task"] and r["label"] == row["label"]]
        row["lr"] = chosen[f"{row['task']}/{row['label']}"]
        row["predicted_peak_MiB"] = statistics.mean(r["predicted_peak_bytes"] for r in mine) / 2**20
        row["optimizer_MiB_at_peak"] = statistics.mean(r["optimizer_bytes_at_peak"] for r in mine) / 2**20
    print_table(table, "accuracy")
    name = "dynalora_table" + ("_smoke" if args.smoke else "")
    print(save(name, {"rows": rows, "sweep": sweep, "chosen_lr": chosen, "table": table}))


if __name__ == "__main__":
    main()
