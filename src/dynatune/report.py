"""Plots of a run, drawn from its log.jsonl: loss, counted memory by term, which units updated when."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DynatuneError
from .units import unit_sort_key


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise DynatuneError(f"no log.jsonl in '{run_dir}'; pass the output_dir of a dynatune run.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run appends: keep the last record of each step
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def read_evals(run_dir: Path) -> list[dict]:
    """The run's validation evaluations (evals.jsonl, written by eval_steps / eval_each_epoch), if any."""
    path = Path(run_dir) / "evals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def selection_metric(run_dir: Path, evals: list[dict]) -> str:
    """The metric the run selected on: metrics.json's best, else the config's metric_for_best, else the
    task's first (the first metric an evaluation records after its epoch and step)."""
    metrics, config = Path(run_dir) / "metrics.json", Path(run_dir) / "config.json"
    best = json.loads(metrics.read_text()).get("best") if metrics.is_file() else None
    chosen = json.loads(config.read_text()).get("metric_for_best") if config.is_file() else None
    return (best or {}).get("metric") or chosen or next(k for k in evals[0] if k not in ("epoch", "step"))


def plot_run(run_dir) -> list[Path]:
    """Write loss.png, memory.png and units.png into run_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = read_log(run_dir)
    if not log:
        raise DynatuneError(f"log.jsonl in '{run_dir}' has no records yet.")
    steps = [r["step"] + 1 for r in log]
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in log], lw=1, label="training loss")
    ax.set(xlabel="step", ylabel="loss", title=f"loss — {run_dir.name}")
    ax.grid(alpha=0.3)
    _integer_steps(ax)
    evals = read_evals(run_dir)
    if evals:
        eval_steps = [e["step"] for e in evals]
        ax.plot(eval_steps, [e["loss"] for e in evals], "o-", color="tab:orange", ms=4, lw=1, label="validation loss")
        metric = selection_metric(run_dir, evals)
        if metric != "loss":  # the chosen metric on its own scale
            ax2 = ax.twinx()
            ax2.plot(eval_steps, [e[metric] for e in evals], "s--", color="tab:green", ms=4, lw=1,
                     label=f"validation {metric}")
            ax2.set_ylabel(f"validation {metric}")
            fig.legend(loc="center right", bbox_to_anchor=(1, 0.5), bbox_transform=ax.transAxes, fontsize=8)
        else:
            ax.legend(loc="upper right", fontsize=8)
    out.append(_save(fig, run_dir / "loss.png"))

    out.append(_save(memory_figure(run_dir, log), run_dir / "memory.png"))
    out.append(_save(units_figure(run_dir, log), run_dir / "units.png"))
    out.extend(method_plots(run_dir, log))
    return out


def _integer_steps(ax) -> None:
    """Steps are whole numbers: no 2.5 on the step axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def memory_figure(run_dir: Path, log: list[dict]):
    """Counted bytes by term (stacked), predicted lines, the budget; the legend sits outside the axes
    so it never covers the budget line."""
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r["step"] + 1 for r in log]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    terms = ["weights", "gradients", "optimizer", "activations"]
    counted = all(r.get("memory") for r in log)  # count_memory=false logs no counted bytes
    if counted:
        ys = np.array([[r["memory"][t] / 2**20 for t in terms] for r in log]).T
        ax.stackplot(steps, ys, labels=terms, alpha=0.8)
    lines = (("predicted_bytes", "k--", "predicted counted"), ("predicted_peak_bytes", "b:", "predicted peak"))
    for key, style, label in lines:
        if any(r.get(key) for r in log):
            ax.plot(steps, [r.get(key, 0) / 2**20 for r in log], style, lw=1, label=label)
    if counted and any(r["memory"].get("measured") for r in log):
        ax.plot(steps, [r["memory"].get("measured", 0) / 2**20 for r in log], "m-", lw=1, label="measured (CUDA)")
    if any(r.get("budget_bytes") for r in log):
        ax.axhline(log[0]["budget_bytes"] / 2**20, color="red", lw=1, label="budget")
    ax.set(xlabel="step", ylabel="MiB", title="counted memory by term" if counted else "predicted memory (not counted)")
    _integer_steps(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    return fig


def run_units(run_dir: Path, log: list[dict]) -> list[str]:
    """Every unit of the run in model order: units.json (written when the run starts), else those
    that updated at some step (runs written before units.json existed)."""
    path = Path(run_dir) / "units.json"
    names = [u["name"] for u in json.loads(path.read_text())] if path.is_file() else []
    seen = {u for r in log for u in r["update"]}
    return sorted(set(names) | seen, key=unit_sort_key)


def units_grid(run_dir: Path, log: list[dict]):
    """(units, grid): grid[i, j] = 1 where unit i updated at the j-th logged step; frozen units are
    rows of zeros."""
    import numpy as np

    units = run_units(run_dir, log)
    grid = np.zeros((len(units), len(log)))
    index = {u: i for i, u in enumerate(units)}
    for j, r in enumerate(log):
        for u in r["update"]:
            grid[index[u], j] = 1
    return units, grid


def units_figure(run_dir: Path, log: list[dict]):
    """Which units updated at each step: every unit has a row, those that never updated in grey."""
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in log]
    units, grid = units_grid(run_dir, log)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.18 * len(units) + 1)))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greens", vmin=0, vmax=1,
              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(units) - 0.5, -0.5))
    ax.set_yticks(range(len(units)))
    frozen = grid.sum(axis=1) == 0
    ax.set_yticklabels([f"{u} (frozen)" if f else u for u, f in zip(units, frozen)],
                       fontsize=6 if len(units) > 30 else 8)
    for label, f in zip(ax.get_yticklabels(), frozen):
        if f:
            label.set_color("0.55")
    n_frozen = int(frozen.sum())
    ax.set(xlabel="step", title="units updated at each step"
           + (f" ({n_frozen} of {len(units)} never updated)" if n_frozen else ""))
    _integer_steps(ax)
    return fig


def method_plots(run_dir: Path, log: list[dict]) -> list[Path]:
    """The run's method draws its own figures (Method.plots: TriMS's state, AdaGradSelect's frequencies)."""
    from .methods import METHODS

    config = run_dir / "config.json"
    method = json.loads(config.read_text()).get("method") if config.is_file() else None
    return METHODS[method].plots(run_dir, log) if method in METHODS else []


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
