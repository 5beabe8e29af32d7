"""IST against LoRA on every layer and against 25% of the layers drawn at random (CPU).

    python benchmarks/ist_table.py --only minilm      # MiniLM-L6: TREC, SMS spam, movie sentiment
    python benchmarks/ist_table.py --only smollm2     # SmolLM2-135M SFT on trec-sft, 200 steps
    python benchmarks/ist_table.py --smoke            # 2 steps per run, tiny data, seed 0: checks the script

Three methods on the same adapters (LoRA r=32, alpha=64, dropout 0.05, table 8; on MiniLM's
query/key/value, on SmolLM2's q, k, v, up, down): `lora` (every layer trains every step),
`ist` (ceil(25%) of the layers per step, importance loop every 10 steps, N_c=3, N_v=50%,
beta=0.25) and `random` (`ist.selection=random`: the same number of layers drawn uniformly, the
paper's ablation). Learning rates are chosen on validation with seed 0 from the candidates; for IST
mu is then chosen on validation with seed 0 at that rate from {1, 10, 100} (the paper: mu depends on
the run's length; too small behaves like random). Seeds 0, 1, 2 at the chosen settings.

MiniLM: the same seeded 1,000 training examples, 2 epochs, batch 16, max_length 48, 300 held-out
test examples. SmolLM2: trec-sft, 400 examples, 200 steps, batch 8, max_length 48, exact match.
Writes benchmarks/results/ist_table_<only>[_smoke].json with provenance: rows, sweep, the chosen
rates and mu, and the table (test metric mean ± std, trainable parameters, counted peak).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table, run_one, save, summarise, table_arguments  # noqa: E402

TASKS = ("trec", "sms-spam", "movie-sentiment")
RATES = ("1e-3", "3e-3", "1e-2")  # 125 steps: LoRA r=8 at 3e-4 stays near chance on TREC (dynalora_table)
MUS = ("1", "10", "100")
ADAPTER = ["r=32", "alpha=64", "dropout=0.05"]


def methods(targets: str) -> dict[str, list[str]]:
    lora = [f"lora.{o}" for o in ADAPTER] + [f"lora.targets={targets}"]
    ist = [f"ist.{o}" for o in ADAPTER] + [f"ist.targets={targets}"]
    return {"lora": ["method=lora", *lora], "ist": ["method=ist", *ist],
            "random": ["method=ist", *ist, "ist.selection=random"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["minilm", "smollm2"], default="minilm")
    # --labels splits a long run over processes; a last --reuse pass over all assembles the JSON
    table_arguments(ap, TASKS, labels="lora,ist,random", smoke="2 steps per run on 32 examples, seed 0, one rate and mu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.only == "minilm":
        common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", "epochs=2", "batch_size=16",
                  "max_length=48", "budget=none"]
        tasks, targets, metric = args.tasks.split(","), "query,key,value", "accuracy"
    else:
        common = ["model=smollm2-135m", "data.max_train=400", "data.max_eval=100", "max_steps=200",
                  "batch_size=8", "max_length=48", "eval_each_epoch=false", "budget=none"]
        tasks, targets, metric = ["trec-sft"], "q_proj,k_proj,v_proj,up_proj,down_proj", "exact_match"
    seeds = [int(s) for s in args.seeds.split(",")]
    rates, mus = RATES, MUS
    if args.smoke:
        common += ["data.max_train=32", "data.max_eval=16", "max_steps=2", "eval_each_epoch=false", "ist.t_c=1"]
        seeds, rates, mus = [0], RATES[1:2], MUS[1:2]
    rows, sweep, chosen = [], [], {}
    root = f"runs/ist-bench-{args.only}" + ("-smoke" if args.smoke else "")

    def run(task, label, opts, lr, seed, tag=""):
        return run_one([*common, f"task={task}", *opts, f"lr={lr}", f"seed={seed}",
                        f"output_dir={root}/{task}-{label}{tag}-lr{lr}-{seed}"], reuse=args.reuse)

    def val(r):
        return (r["validation"] or {}).get(metric, 0) or 0

    for task in tasks:
        for label, opts in methods(targets).items():
            if label not in args.labels.split(","):
                continue
            runs = {}
            for lr in rates:  # seed 0 at every candidate rate; the best validation score is kept
                runs[lr] = run(task, label, opts + (["ist.mu=10"] if label == "ist" else []), lr, 0)
                sweep.append({**runs[lr], "label": label, "lr": float(lr), "mu": 10.0 if label == "ist" else None})
                print("sweep", task, label, lr, val(runs[lr]), flush=True)
            lr = max(rates, key=lambda x: val(runs[x]))
            best, mu = runs[lr], None
            if label == "ist":  # then mu at that rate
                by_mu = {"10": best}
                for m in mus:
                    if m not in by_mu:
                        by_mu[m] = run(task, label, opts + [f"ist.mu={m}"], lr, 0, f"-mu{m}")
                        sweep.append({**by_mu[m], "label": label, "lr": float(lr), "mu": float(m)})
                        print("sweep mu", task, m, val(by_mu[m]), flush=True)
                mu = max(by_mu, key=lambda m: (val(by_mu[m]), m == "10"))
                best, opts = by_mu[mu], opts + [f"ist.mu={mu}"]
            chosen[f"{task}/{label}"] = {"lr": float(lr), "mu": float(mu) if mu else None}
            for seed in seeds:
                tag = f"-mu{mu}" if mu and mu != "10" else ""
                r = best if seed == 0 else run(task, label, opts, lr, seed, tag)
                rows.append({**r, "label": label, "lr": float(lr), "mu": float(mu) if mu else None})
                print(task, label, seed, r["test"].get(metric), r["trainable_params"], r["counted_peak_bytes"],
                      flush=True)
    table = summarise(rows, metric)
    for row in table:
        mine = [r for r in rows if r["task"] == row["task"] and r["label"] == row["label"]]
        row.update(chosen[f"{row['task']}/{row['label']}"])
        row["optimizer_MiB_at_peak"] = statistics.mean(r["optimizer_bytes_at_peak"] or 0 for r in mine) / 2**20
    print_table(table, metric)
    name = f"ist_table_{args.only}" + ("_smoke" if args.smoke else "")
    print(save(name, {"rows": rows, "sweep": sweep, "chosen": chosen, "table": table}))


if __name__ == "__main__":
    main()
