"""SPSFT against full fine-tuning, LoRA and SHiRA at equal trainable parameters, on real data (CPU).

    python benchmarks/spsft_table.py             # 3 tasks x 7-8 methods x 3 seeds + the lr sweep on seed 0
    python benchmarks/spsft_table.py --smoke     # 2 steps per run, tiny data, seed 0, one rate: checks the script

MiniLM-L6 (6 blocks, hidden 384, MLP 1536) on TREC, SMS spam and movie sentiment, the same seeded
1,000 training examples for every method, 2 epochs, batch 16, max_length 48, tested on 300
held-out examples. Trainable parameters are those of LoRA r=16 on every linear of the blocks:
16 x (d_in + d_out) per linear = 663,552; SPSFT trains r x d_in per linear, so r=32 rows gives
exactly as many (32 x 3,456 x 6); peft's SHiRA at r=16 trains r x (d_in + d_out) sparse entries
per linear, the same count. Rows: SPSFT with l2, Taylor (appendix A, 128 calibration examples)
and random rows (S2FT's selection), QM-Taylor on TREC (6 classes; the paper skips it for few
labels), full fine-tuning, LoRA r=16 and SHiRA r=16 (all linear; the classifier trains in every
row). Each method's learning rate is chosen on validation with seed 0 from its family's
candidates, then used for seeds 1 and 2. Dependency groups (appendix B, needs torch-pruning): l2
and Taylor with dependencies=true at r=16 (the paper halves the ratio; the trainable count is
recorded per row, since the columns a group brings vary with the selection).
Writes benchmarks/results/spsft_table[_smoke].json with its provenance.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table, save, summarise, sweep_then_seeds, table_arguments  # noqa: E402

TASKS = ("trec", "sms-spam", "movie-sentiment")
SPSFT_RATES = ("1e-4", "3e-4", "1e-3", "3e-3")
LORA_RATES = ("3e-4", "1e-3", "3e-3")
FULL_RATES = ("2e-5", "5e-5", "1e-4")


def register_shira():
    """peft's SHiRA as a benchmark-only method (the library does not register it): LoRA's injection
    and export with a ShiraConfig, r x (d_in + d_out) random sparse entries per linear."""
    from dynatune.methods import METHODS, register
    from dynatune.methods.adapters import Lora

    if "shira" in METHODS:
        return

    @register
    class Shira(Lora):
        name = "shira"
        summary = "peft SHiRA (sparse high-rank adapter, random mask) on every linear in the blocks"

        def peft_config(self, linears):
            from peft import ShiraConfig
            return ShiraConfig(r=self.config.r, target_modules=list(linears), random_seed=0)


def methods(task: str) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """label -> (overrides, candidate learning rates)."""
    sp = ["method=spsft", "spsft.r=32"]
    out = {"spsft_l2": ([*sp, "spsft.importance=l2"], SPSFT_RATES),
           "spsft_taylor": ([*sp, "spsft.importance=taylor"], SPSFT_RATES),
           "spsft_random": ([*sp, "spsft.importance=random"], SPSFT_RATES)}
    # dependency groups on (appendix B): the paper halves the ratio, since each selected row brings
    # its dependent columns (r=16 rows + their columns: about the same count as r=32 without)
    for imp in ("l2", "taylor"):
        out[f"spsft_{imp}_deps"] = (["method=spsft", "spsft.r=16", f"spsft.importance={imp}",
                                     "spsft.dependencies=true"], SPSFT_RATES)
    if task == "trec":
        out["spsft_qm_taylor"] = ([*sp, "spsft.importance=qm-taylor"], SPSFT_RATES)
    out["full"] = (["method=full"], FULL_RATES)
    out["lora_r16"] = (["method=lora", "lora.r=16", "lora.alpha=32"], LORA_RATES)
    out["shira_r16"] = (["method=shira", "shira.r=16"], LORA_RATES)
    return out


def main():
    ap = argparse.ArgumentParser()
    table_arguments(ap, TASKS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_shira()
    common = ["model=minilm-l6", "data.max_train=1000", "data.max_eval=300", "epochs=2", "batch_size=16",
              "max_length=48", "budget=none"]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        common += ["data.max_train=32", "data.max_eval=16", "max_steps=2", "eval_each_epoch=false",
                   "spsft.calibration_examples=16"]
        seeds = [0]
    rows, sweep, chosen = [], [], {}
    root = "runs/spsft-bench" + ("-smoke" if args.smoke else "")
    for task in args.tasks.split(","):
        table_methods = methods(task)
        if args.labels:
            table_methods = {k: v for k, v in table_methods.items() if k in args.labels.split(",")}
        for label, (opts, rates) in table_methods.items():
            rates = rates[1:2] if args.smoke else rates
            extra = [o for o in common if not o.startswith("spsft.") or label.startswith("spsft")]
            lr, mine = sweep_then_seeds([*extra, f"task={task}", *opts], rates, seeds, f"{root}/{task}-{label}",
                                        args.reuse, sweep, label)
            chosen[f"{task}/{label}"] = float(lr)
            rows += mine
    table = summarise(rows, "accuracy")
    for row in table:
        mine = [r for r in rows if r["task"] == row["task"] and r["label"] == row["label"]]
        row["lr"] = chosen[f"{row['task']}/{row['label']}"]
        row["predicted_peak_MiB"] = statistics.mean(r["predicted_peak_bytes"] for r in mine) / 2**20
    print_table(table, "accuracy")
    name = "spsft_table" + ("_smoke" if args.smoke else "")
    print(save(name, {"rows": rows, "sweep": sweep, "chosen_lr": chosen, "table": table}))


if __name__ == "__main__":
    main()
