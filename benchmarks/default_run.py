"""The README's first table: `dynatune train` as it ships, and `dynatune train method=full`, timed.

    python benchmarks/default_run.py                 # both (about 3-6 min on the 2-core CPU)
    python benchmarks/default_run.py --methods trims

Each run is a fresh `python -m dynatune.cli train ...` process on this checkout's src/ (the default:
TriMS at budget 0.6 on MiniLM-L6, TREC, 2 epochs), timed from start to exit. Writes
benchmarks/results/default_run_{trims,full}.json with their provenance, test accuracy, counted and
predicted peak, budget, final TriMS state, the wall time, and the load average before and after
the run (another process on the 2 cores slows it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import ROOT, load_average, save  # noqa: E402

RUNS = {"trims": [], "full": ["method=full"]}  # trims: no option at all, it is the default


def states_and_actions(log: list[dict]) -> tuple[list, dict]:
    """TriMS's [step, l, r, e, action] at the end of each period, and how often each action was taken."""
    states, actions = [], {}
    for r in log:
        m = r.get("method_log") or {}
        if "action" in m:
            states.append([r["step"], m["l"], m["r"], m["e"], m["action"]])
            actions[m["action"]] = actions.get(m["action"], 0) + 1
    return states, actions


def run(method: str) -> dict:
    out_dir = ROOT / "runs" / f"default-{method}"
    args = [*RUNS[method], f"output_dir={out_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    before = load_average()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dynatune.cli", "train", *args], env=env, check=True)
    wall = time.perf_counter() - t0
    after = load_average()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    mem = metrics["memory"]
    out = {"run_command": " ".join(["dynatune train", *RUNS[method]]) + f"   (output_dir={out_dir.relative_to(ROOT)})",
           "load_average_before_after": [before, after], "wall_seconds": round(wall, 1),
           "train_seconds": metrics["train_seconds"], "test": metrics["test"], "validation": metrics["validation"],
           "steps": metrics["steps"], "trainable_params": metrics["trainable_params"],
           "final_state": metrics["final_state"], "final_plan": metrics["final_plan"], "memory": mem}
    predicted = [r["method_log"]["predicted_peak_bytes"] for r in log
                 if (r.get("method_log") or {}).get("predicted_peak_bytes") is not None]
    if predicted and mem.get("budget_bytes"):
        usable = log[-1]["method_log"]["usable_budget_bytes"]
        out.update(largest_predicted_peak_over_run=max(predicted), usable_budget_bytes=usable,
                   budget_use=max(predicted) / mem["budget_bytes"])
    states, actions = states_and_actions(log)
    if states:
        out.update(actions=actions, states=states)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="trims,full")
    args = ap.parse_args(argv)
    for method in args.methods.split(","):
        r = run(method)
        print(method, "test accuracy", r["test"]["accuracy"], "counted peak MiB",
              r["memory"]["counted_peak_bytes"] / 2**20, "wall s", r["wall_seconds"], flush=True)
        print(save(f"default_run_{method}", r))


if __name__ == "__main__":
    main()
