"""CPU estimate (dynatune estimate) vs the peaks an H100 measured (shared/anchors).

    PYTHONPATH=src python benchmarks/estimate_vs_anchors.py [--anchors FILE] [--out FILE]

For each anchor architecture (qwen2-0.5b, llama-3.2-1b) this runs the planner at the anchors'
settings (batch 16 x 256, fp32 weights, bf16 autocast, AdamW, sdpa; target device cuda) on this
machine's CPU and compares each row's predicted_peak_bytes with torch.cuda.max_memory_allocated
as printed by shared/anchors/anchors_gpu.py on an H100. Row mapping, and where the settings are
matched to what anchors_gpu.py did:

  full                 -> full
  lora_r{r}_all_linear -> lora_r{r} (lora_cap=false: peft with r on every linear, as the anchors)
  top{k}_blocks        -> top{k}         (k blocks + final norm)
  lisa2_plus_embed     -> lisa2          (dynatune's LISA also trains the final norm: 896/2048 params)
  bottom{k}_blocks     -> bottom{k}
  exit{e}_train{k}     -> exit{e}_top{k} with loss=sliced: anchors_gpu.py's exit rows compute the loss
                          by hand, keep fp32 logits alive and copy the shifted slice (4 bytes/logit
                          more than HF's loss); the row priced with dynatune's own (HF) loss is
                          reported beside it.

Writes benchmarks/results/estimate_vs_anchors.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import machine as this_machine, provenance  # noqa: E402

GiB = 2**30
DEFAULT_ANCHORS = Path("/work/shared/anchors/anchors_h100_2026-11-22.jsonl")


def machine() -> dict:
    """This machine (harness.machine) plus where the estimate ran and where the anchors were measured."""
    import transformers
    m = this_machine()
    return {**m, "estimated_on": f"CPU: {m.get('cpu', platform.machine())}, {m['cpus']} cores, no GPU",
            "transformers": transformers.__version__,
            "measured_on": "NVIDIA H100 (shared/anchors/anchors_h100_2026-11-22.jsonl, torch.cuda.max_memory_allocated)"}


def anchor_to_row(name: str) -> tuple[str, str]:
    """anchor config -> (planner config, planner run: 'hf' or 'sliced')."""
    if name == "full":
        return "full", "hf"
    if name.startswith("lora_r"):
        return name.split("_all")[0], "hf"
    if name.startswith("top") and name.endswith("_blocks"):
        return name[:-len("_blocks")], "hf"
    if name.startswith("bottom") and name.endswith("_blocks"):
        return name[:-len("_blocks")], "hf"
    if name == "lisa2_plus_embed":
        return "lisa2", "hf"
    if name.startswith("exit"):
        e, k = name[len("exit"):].split("_train")
        return f"exit{e}_top{k}", "sliced"
    raise KeyError(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", default=str(DEFAULT_ANCHORS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimate_vs_anchors.json"))
    ap.add_argument("--goal", type=float, default=0.05)
    args = ap.parse_args(argv)
    from dynatune.planner import estimate

    anchors = [json.loads(l) for l in Path(args.anchors).read_text().splitlines() if l.strip()]
    anchors = [a for a in anchors if "peak_GiB" in a and a.get("batch") == 16]
    out_rows = []
    timings = {}
    for arch in sorted({a["arch"] for a in anchors}, key=lambda a: ["qwen2-0.5b", "llama-3.2-1b"].index(a)
                       if a in ("qwen2-0.5b", "llama-3.2-1b") else 9):
        mine = [a for a in anchors if a["arch"] == arch]
        B, S = mine[0]["batch"], mine[0]["seq"]
        common = [f"model=arch:{arch}", f"batch_size={B}", f"seq_len={S}", "precision=amp-bf16", "optimizer=adamw",
                  "device_type=cuda"]
        ranks = sorted({int(anchor_to_row(a["config"])[0][len("lora_r"):]) for a in mine
                        if a["config"].startswith("lora")})
        t0 = time.perf_counter()
        hf = {r["config"]: r for r in estimate(common + ["families=full,top,bottom,lisa,lora", "lora_cap=false",
                                                         "lora_ranks=" + ",".join(map(str, ranks))])}
        sliced = {r["config"]: r for r in estimate(common + ["families=exit", "loss=sliced"])}
        hf_exit = {r["config"]: r for r in estimate(common + ["families=exit"])}
        timings[arch] = round(time.perf_counter() - t0, 1)
        for a in mine:
            name, run = anchor_to_row(a["config"])
            row = (sliced if run == "sliced" else hf)[name]
            measured = a["peak_GiB"] * GiB
            pred = row["predicted_peak_bytes"]
            rec = {"arch": arch, "anchor_config": a["config"], "config": name, "loss": row["loss"],
                   "measured_peak_GiB": a["peak_GiB"], "predicted_peak_GiB": round(pred / GiB, 3),
                   "predicted_peak_bytes": pred, "predicted_counted_bytes": row["predicted_counted_bytes"],
                   "error": round(pred / measured - 1, 5), "within_goal": abs(pred / measured - 1) <= args.goal,
                   "peak_phase": row["peak_phase"], "terms_GiB": {k: round(v / GiB, 3) for k, v in row["terms"].items()},
                   "trainable_M_predicted": round(row["trainable_params"] / 1e6, 2),
                   "trainable_M_anchor": a.get("trainable_M"), "attention_kernel": row["attention_kernel"]}
            if run == "sliced":
                rec["predicted_peak_GiB_with_hf_loss"] = round(hf_exit[name]["predicted_peak_bytes"] / GiB, 3)
            out_rows.append(rec)

    errs = [abs(r["error"]) for r in out_rows]
    result = {**provenance(), "machine": machine(), "settings": "batch 16 x 256, fp32 weights, bf16 autocast (amp-bf16), AdamW "
              "(torch defaults: foreach on CUDA), sdpa attention, random-init weights; target device_type=cuda",
              "goal": f"|error| <= {args.goal:.0%} per row", "rows": out_rows,
              "summary": {"rows": len(out_rows), "within_goal": sum(r["within_goal"] for r in out_rows),
                          "max_abs_error": round(max(errs), 5), "mean_abs_error": round(sum(errs) / len(errs), 5)},
              "estimate_seconds": timings}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"estimated on {result['machine']['estimated_on']}; measured on an H100")
    print(f"{'arch':<14}{'anchor config':<24}{'planner row':<16}{'H100 GiB':>9}{'CPU est GiB':>12}{'error':>8}  phase")
    for r in out_rows:
        extra = f"  (HF loss: {r['predicted_peak_GiB_with_hf_loss']:.2f})" if "predicted_peak_GiB_with_hf_loss" in r else ""
        print(f"{r['arch']:<14}{r['anchor_config']:<24}{r['config']:<16}{r['measured_peak_GiB']:>9.3f}"
              f"{r['predicted_peak_GiB']:>12.3f}{r['error']:>+8.2%}  {r['peak_phase']}{extra}"
              f"{'' if r['within_goal'] else '  MISSES GOAL'}")
    s = result["summary"]
    print(f"{s['within_goal']}/{s['rows']} rows within {args.goal:.0%}; max |error| {s['max_abs_error']:.2%}, "
          f"mean {s['mean_abs_error']:.2%}; estimate time {timings} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
