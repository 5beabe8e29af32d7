"""Shared benchmark harness: run dynatune configs in-process, collect figures, print and save tables.

Every result file records its provenance (`provenance()`): the git commit and whether the tree had
uncommitted changes, the exact command, the machine, and the load average when the script started
and when it wrote the file (other processes on the cores slow every timing). Tables quote the mean
and spread over seeds of figures measured in the same invocation.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def release_cuda() -> int:
    """Before a GPU measurement: collect what earlier runs in this process left (a tuner and its
    model sit in reference cycles until collected, and would count in the next run's peak), empty
    the cache, and return the bytes still allocated (0 when nothing is left; rows record it).
    cuBLAS's workspaces go too: the next run allocates its own, which its peak must include."""
    import gc

    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: on this 2-core machine, above ~1 means others shared the cores."""
    return [round(x, 2) for x in os.getloadavg()]


# read when a benchmark script imports this module, before it measures anything: the code it runs is
# this commit's (plus uncommitted changes if dirty), whatever is edited while it runs
_LOAD_AT_START = load_average()
_STATUS_AT_START = git("status", "--porcelain", "--untracked-files=no")
# A copy of the tree sent to a lent GPU machine names its commit in DYNATUNE_COMMIT: the .git that
# travels with such a copy may hold an older HEAD than the files that run.
_COMMIT_AT_START = os.environ.get("DYNATUNE_COMMIT") or git("rev-parse", "HEAD")
if os.environ.get("DYNATUNE_COMMIT"):
    _STATUS_AT_START = None


def random_token_batches(n: int, batch: int, seq: int, vocab: int, device) -> list[dict]:
    """n seeded causal-LM batches of random tokens (labels = inputs), the same for every runner: the
    GPU benchmarks' data, where memory and time do not depend on the values."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.clone().to(device)})
    return out


def device_sync(device) -> None:
    """Wait for the device (CUDA) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def provenance() -> dict:
    """What every result file records: commit (+ dirty: tracked files changed), both as the script
    started, the exact command, the dynatune source that ran (an editable install elsewhere would
    not be this commit), the machine, and the load average at the script's start and now."""
    import dynatune

    status = _STATUS_AT_START
    return {"commit": _COMMIT_AT_START, "dirty": None if status is None else bool(status),
            "command": shlex.join(["python", *sys.argv]), "dynatune_path": str(Path(dynatune.__file__).parent),
            "machine": machine(), "load_average": {"at_start": _LOAD_AT_START, "at_end": load_average()}}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    return info


def run_one(overrides: list[str], reuse: bool = False, train_missing: bool = True) -> dict:
    """Train one config; return the figures a table needs. With reuse, a run directory that already
    holds a finished run of the same config (output_dir aside) is read back instead of retrained;
    without train_missing, a run that has not finished raises instead of training."""
    from dynatune.config import load_config
    from dynatune.loop import train

    if reuse and (done := read_back(overrides)) is not None:
        return done
    cfg = load_config(None, overrides + ["progress=false", "save_model=false"])
    if not train_missing:
        raise RuntimeError("not finished, and --finished-only trains nothing")
    t0 = time.perf_counter()
    train(cfg)
    return {**collect(overrides), "wall_s": round(time.perf_counter() - t0, 1)}


def read_back(overrides: list[str]) -> dict | None:
    """The figures of a finished run of this config (output_dir aside), or None."""
    from dynatune.config import load_config

    cfg = load_config(None, overrides + ["progress=false", "save_model=false"])
    return collect(overrides) if finished_same_run(cfg) else None


def spawned_map(fn, items: list, jobs: int, finished=lambda item: None) -> list:
    """fn over items, `jobs` spawned processes at a time (one per item; spawned: a forked CUDA context
    is unusable; fresh: nothing an earlier item left counts in a GPU peak), results in order. An item
    `finished` reads back (not None) is not run: a spawned process costs seconds of imports."""
    done = [finished(item) for item in items]
    todo = [item for item, d in zip(items, done) if d is None]
    if jobs <= 1:
        ran = iter([fn(item) for item in todo])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            ran = iter(list(pool.map(fn, todo)))
    return [d if d is not None else next(ran) for d in done]


def _run_one_job(args):
    overrides, reuse, threads, train_missing = args
    torch.set_num_threads(threads)
    try:
        return run_one(overrides, reuse=reuse, train_missing=train_missing)
    except Exception as err:  # one failed run must not take the others down: reported, not raised
        return {"overrides": overrides, "error": f"{type(err).__name__}: {err}"}


def run_many(runs: list[list[str]], jobs: int = 1, reuse: bool = False, threads: int = 1,
             train: bool = True) -> list[dict]:
    """run_one over every override list, `jobs` at a time, each run in a fresh process (spawned_map),
    each with `threads` torch threads; with reuse, finished runs are read back without a process."""
    def finished(job):
        try:
            return read_back(job[0]) if reuse else None
        except Exception:  # noqa: BLE001 - unreadable: the job itself says why
            return None
    return spawned_map(_run_one_job, [(o, reuse, threads, train) for o in runs], jobs, finished)


def sweep_then_seeds(base: list[str], rates, seeds, out: str, reuse: bool, sweep: list, label: str,
                     metric: str = "accuracy") -> tuple[str, list[dict]]:
    """Seed 0 at every candidate rate (recorded in `sweep`), the best validation `metric` chosen, then
    the other seeds at that rate. Run directories are `{out}-lr{rate}-{seed}`. Returns the chosen
    rate (as given) and one row per seed."""
    runs = {}
    for lr in rates:
        runs[lr] = run_one([*base, f"lr={lr}", "seed=0", f"output_dir={out}-lr{lr}-0"], reuse=reuse)
        sweep.append({**runs[lr], "label": label, "lr": float(lr)})
        print("sweep", label, lr, (runs[lr]["validation"] or {}).get(metric), flush=True)
    lr = max(rates, key=lambda x: (runs[x]["validation"] or {}).get(metric, 0))
    rows = []
    for seed in seeds:
        r = runs[lr] if seed == 0 else run_one([*base, f"lr={lr}", f"seed={seed}", f"output_dir={out}-lr{lr}-{seed}"],
                                               reuse=reuse)
        rows.append({**r, "label": label, "lr": float(lr)})
        print(label, seed, r["test"].get(metric), r["trainable_params"], r["counted_peak_bytes"], flush=True)
    return lr, rows


def counted_steps(tuner, batch: dict, steps: int) -> None:
    """`steps` training steps of the engine's per-step contract on one batch (memory benchmarks)."""
    for _ in range(steps):
        tuner.begin_step()
        tuner.model(**batch).loss.backward()
        tuner.after_backward()
        tuner.optimizer.step()
        tuner.after_optimizer_step()
        tuner.optimizer.zero_grad(set_to_none=True)
        tuner.end_step(None)


def finished_same_run(cfg) -> bool:
    from dataclasses import replace

    from dynatune.config import method_config, run_budget, run_dir, to_dict
    from dynatune.methods import METHODS, build_method

    out_dir = run_dir(cfg)
    if not (out_dir / "metrics.json").exists():
        return False
    from dynatune.config import load_config

    ignore = {"output_dir", "progress", "save_model", "budget"}
    done = json.loads((out_dir / "config.json").read_text())
    want = to_dict(cfg)
    # a run records its options as its method resolved them (loop.train); a run made before that
    # recorded a preset-filled option as null, and is compared with the options as given
    resolved = to_dict(replace(cfg, **{cfg.method: build_method(cfg.method, method_config(cfg), cfg.seed).config}))
    # an option added since the run was made, at its default, is what that run did
    defaults = to_dict(load_config(None, [f"method={cfg.method}"]))

    def same(old, new, default) -> bool:
        if isinstance(new, dict) and isinstance(old, dict):
            return all(same(old[k], v, (default or {}).get(k)) if k in old else v == (default or {}).get(k)
                       for k, v in new.items())
        return old == new

    same_budget = done.get("budget") == run_budget(cfg.budget, METHODS[cfg.method])
    return same_budget and all(
        (same(done[k], v, defaults.get(k)) or same(done[k], resolved[k], defaults.get(k))) if k in done
        else v == defaults.get(k) for k, v in want.items() if k not in ignore)


def collect(overrides: list[str]) -> dict:
    """The figures of a finished run, read back from its directory (metrics.json, log.jsonl)."""
    from dynatune.config import load_config, run_dir

    cfg = load_config(None, overrides)
    out_dir = run_dir(cfg)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    step_times = [r["step_time_s"] for r in log[2:]] or [r["step_time_s"] for r in log]
    test = metrics["test"] or metrics["validation"]
    predicted = [r["method_log"]["predicted_peak_bytes"] for r in log
                 if (r.get("method_log") or {}).get("predicted_peak_bytes") is not None]
    return {"overrides": overrides, "method": cfg.method, "task": cfg.task, "model": cfg.model, "seed": cfg.seed,
            "test": test, "validation": metrics.get("validation"), "trainable_params": metrics["trainable_params"],
            "counted_peak_bytes": metrics["memory"]["counted_peak_bytes"],
            "predicted_peak_bytes": metrics["memory"].get("predicted_peak_bytes"),
            "optimizer_bytes_at_peak": (metrics["memory"]["counted_peak_terms"] or {}).get("optimizer"),
            "counted_peak_terms": metrics["memory"]["counted_peak_terms"],
            "median_step_s": statistics.median(step_times), "final_plan": metrics.get("final_plan"),
            "final_state": metrics.get("final_state"), "budget_bytes": metrics["memory"].get("budget_bytes"),
            # methods that log each step's predicted peak (TriMS): the largest, against the budget
            "largest_step_predicted_peak_bytes": max(predicted) if predicted else None}


def table_arguments(ap, tasks, labels: str = "", smoke: str = "2 steps per run on 32 examples, seed 0, the middle rate"):
    """The options every accuracy-table script shares: --smoke, --tasks, --labels, --seeds, --reuse."""
    ap.add_argument("--smoke", action="store_true", help=smoke)
    ap.add_argument("--tasks", default=",".join(tasks), help="comma-separated tasks")
    ap.add_argument("--labels", default=labels, help="comma-separated subset of the methods")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--reuse", action="store_true", help="read back finished runs of the same config")


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], metric: str, group=("task", "label")) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    table = []
    for key, rs in groups.items():
        m, s = mean_spread([r["test"].get(metric) for r in rs])
        table.append({**dict(zip(group, key)), "seeds": len(rs), metric: m, f"{metric}_std": s,
                      "trainable_params": rs[0]["trainable_params"],
                      "counted_peak_MiB": statistics.mean(r["counted_peak_bytes"] for r in rs) / 2**20,
                      "median_step_s": statistics.median(r["median_step_s"] for r in rs)})
    return table


def print_table(table: list[dict], metric: str) -> None:
    cols = [c for c in table[0] if not c.endswith("_std")]
    print(" | ".join(cols))
    for row in table:
        cells = []
        for c in cols:
            v = row[c]
            if c == metric and v is not None:
                cells.append(f"{v:.4f} ± {row[metric + '_std']:.4f}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}")
            else:
                cells.append(str(v))
        print(" | ".join(cells))
    sys.stdout.flush()


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**provenance(), **payload}, indent=2))
    return path
