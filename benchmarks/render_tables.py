"""Print the README's benchmark tables (markdown) from benchmarks/results/*.json.

    python benchmarks/render_tables.py [baselines|adagradselect|trims|dynalora|ist|spsft|peers]

`trims` also draws benchmarks/results/trims_budgets_<part>.png (the test metric against budget per task);
`peers` prints docs/results.md's tables and draws peers_gpu.png, peers_lisa_memory.png, and from the CPU table
peers_table_<model>.png (test metric against counted peak) and peers_table_<model>_memory_time.png (predicted against
counted peak, step time).
"""
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rows_of(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob(pattern)):
        rows.extend(json.loads(path.read_text())["rows"])
    return rows


def table(rows, metric, keys=("task", "label")):
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = [f"| {' | '.join(keys)} | seeds | {metric} (mean ± sd) | trainable params | counted peak MiB | optimizer MiB | median step s |",
           "|" + "---|" * (len(keys) + 6)]
    for key, rs in groups.items():
        out.append(f"| {' | '.join(map(str, key))} | {len(rs)} | {spread(r['test'][metric] for r in rs)} | "
                   f"{rs[0]['trainable_params'] / 1e6:.2f}M | "
                   f"{statistics.mean(r['counted_peak_bytes'] for r in rs) / 2**20:.0f} | "
                   f"{statistics.mean(r['optimizer_bytes_at_peak'] for r in rs) / 2**20:.0f} | "
                   f"{statistics.median(r['median_step_s'] for r in rs):.2f} |")
    return "\n".join(out)


def mean_sd(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values, digits: int = 3, signed: bool = False, unit: str = "") -> str:
    """"mean ± sd" over seeds; one seed has no spread, so its value alone (a "± 0" would claim one)."""
    values = list(values)
    m, sd = mean_sd(values)
    mean = f"{m:{'+' if signed else ''}.{digits}f}"
    return f"{mean} ± {sd:.{digits}f}{unit}" if len(values) > 1 else f"{mean}{unit}"


STATIC = ("top", "lora", "lisa")  # the static plans the planner fits to a budget


def saved(fig, path, dpi: int) -> Path:
    """Lay out, write and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def trims_groups(rows):
    """{(task, budget): {family: [rows]}}; full fine-tuning's rows stand at every budget."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["task"], r["budget"]), {}).setdefault(r["family"], []).append(r)
    return out


def trims_table(rows, metric="accuracy"):
    """Per task and budget: each method's test metric (mean ± sd over seeds, mean counted peak),
    TriMS's paired per-seed differences to full fine-tuning, to the best fitting static plan (the
    best mean) and to TriMS from the paper's start, the paper preset's seed 0 when it ran (--paper),
    and TriMS's largest predicted plan over the budget."""
    with_paper = any(r["family"] == "trims_paper" for r in rows)
    cols = ["task", "budget", "full", "TriMS", "TriMS, paper's start", "top-k", "LoRA", "LISA", "TriMS − full",
            "TriMS − best static", "TriMS − paper's start", *(["paper preset (seed 0)"] if with_paper else []),
            "TriMS budget use"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (task, b), fam in sorted(trims_groups(rows).items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        # the families as labels of one task: paired_differences pairs them seed by seed
        paired = paired_differences([{**r, "label": f} for f, rs in fam.items() for r in rs], metric)
        cells, means = [], {}
        for f in ("full", "trims", "trims_start_last", *STATIC):
            rs = fam.get(f)
            if not rs:
                cells.append("does not fit")
                continue
            means[f] = statistics.mean(r["test"][metric] for r in rs)
            peak = statistics.mean(r["counted_peak_bytes"] for r in rs) / 2**20
            name = rs[0]["label"].split("@")[0] + " " if f in STATIC else ""
            cells.append(f"{name}{spread(r['test'][metric] for r in rs)} ({peak:.0f} MiB)")
        pick = min if metric in LOWER_IS_BETTER else max
        best = pick((f for f in STATIC if f in means), key=lambda f: means[f], default=None)
        cells += [paired(task, "trims", "full"), paired(task, "trims", best) if best else "—",
                  paired(task, "trims", "trims_start_last")]
        if with_paper:
            paper = fam.get("trims_paper")
            cells.append(f"{paper[0]['test'][metric]:.3f}" if paper else "—")
        use = [r["largest_step_predicted_peak_bytes"] / r["budget_bytes"] for r in fam["trims"]
               if r.get("largest_step_predicted_peak_bytes") and r.get("budget_bytes")]
        cells.append(f"{max(use):.0%}" if use else "—")
        lines.append(f"| {task} | {b:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRIMS_VARIANTS = {"trims_start_last": "start=last", "trims_con_trend": "con=trend",
                  "trims_lambda0": "lambda_m=lambda_t=0"}


def trims_defaults_table(rows, metric="accuracy"):
    """The sweep behind TriMS's defaults, on validation: the defaults against each one turned back to
    the paper's alone, per task and budget (mean over seeds, paired per-seed differences), and the
    mean of the paired differences over every task and budget."""
    variants = [v for v in TRIMS_VARIANTS if any(r["family"] == v for r in rows)]
    cols = ["task", "budget", "defaults (start=fit, con=last)", *(TRIMS_VARIANTS[v] for v in variants),
            *(f"defaults − {TRIMS_VARIANTS[v]}" for v in variants)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    overall = {v: [] for v in variants}
    scale, unit = difference_units(metric)
    for (task, b), fam in sorted(trims_groups(rows).items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if "trims" not in fam:
            continue
        cells = []
        for f in ("trims", *variants):
            cells.append(spread(r["validation"][metric] for r in fam[f]) if fam.get(f) else "—")
        paired = paired_differences([{**r, "label": f} for f, rs in fam.items() for r in rs], metric, "validation")
        cells += [paired(task, "trims", v) for v in variants]
        val = {(f, r["seed"]): r["validation"][metric] for f in ("trims", *variants) for r in fam.get(f, [])}
        for v in variants:
            overall[v] += [scale * (val[("trims", s)] - val[(v, s)]) for (f, s) in val if f == v and ("trims", s) in val]
        lines.append(f"| {task} | {b:.0%} | " + " | ".join(cells) + " |")
    summary = ", ".join(f"defaults − {TRIMS_VARIANTS[v]}: {statistics.mean(d):+.2f}{unit} over {len(d)} pairs"
                        for v, d in overall.items() if d)
    return "\n".join(lines) + f"\n\nMean paired validation difference over every task, budget and seed: {summary}."


def trims_plot(rows, path, metric="accuracy"):
    """Test metric against budget, one panel per task: TriMS, the fitting static plans, full as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = trims_groups(rows)
    tasks = sorted({t for t, _ in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        budgets = sorted(b for t, b in groups if t == task)
        for f, style in (("trims", "o-"), ("trims_start_last", "o:"), ("top", "s--"), ("lora", "^--"),
                         ("lisa", "v--")):
            pts = [(b, mean_sd(r["test"][metric] for r in groups[(task, b)][f])) for b in budgets
                   if f in groups[(task, b)]]
            if pts:
                ax.errorbar([100 * b for b, _ in pts], [m for _, (m, _) in pts], yerr=[sd for _, (_, sd) in pts],
                            fmt=style, capsize=3, label=f)
        full, _ = mean_sd(r["test"][metric] for r in groups[(task, budgets[0])]["full"])
        ax.axhline(full, color="black", lw=1, label="full (100%)")
        ax.set(title=task, xlabel="budget (% of full fine-tuning's predicted peak)", ylabel=f"test {metric}")
        ax.legend(fontsize=7)
    return saved(fig, path, 110)


def dynalora_table(d: dict) -> str:
    """One row per task and method: accuracy over seeds, the paired difference to the all-active
    counterpart (same seed), the chosen rate, active trainable parameters and the counted terms a
    plan changes (gradients + optimizer state + saved activations) at the peak step."""
    out = ["| task | method | lr | accuracy (mean ± sd) | paired vs all-active (mean ± sd) | active params | "
           "grads + optimizer + activations MiB | counted peak MiB |", "|" + "---|" * 8]
    for row in d["table"]:
        mine = [r for r in d["rows"] if r["task"] == row["task"] and r["label"] == row["label"]]
        moving = statistics.mean(sum(r["counted_peak_terms"][k] for k in ("gradients", "optimizer", "activations"))
                                 for r in mine) / 2**20
        base = next((k for k in row if k.startswith("paired_vs_") and not k.endswith("_std")), None)
        paired = f"{100 * row[base]:+.1f} ± {100 * row[base + '_std']:.1f} pt" if base and row[base] is not None else "—"
        out.append(f"| {row['task']} | {row['label']} | {row['lr']:g} | {row['accuracy']:.3f} ± {row['accuracy_std']:.3f} "
                   f"| {paired} | {row['trainable_params']:,} | {moving:.1f} | {row['counted_peak_MiB']:.1f} |")
    return "\n".join(out)


# metrics where lower wins; their differences are in the metric's own units, not points
LOWER_IS_BETTER = {"perplexity", "loss"}


def difference_units(metric: str) -> tuple[int, str]:
    """(scale, unit) of a difference in `metric`: points for a fraction, the metric's own units else."""
    return (1, "") if metric in LOWER_IS_BETTER else (100, " pt")


def paired_differences(rows, metric, split="test"):
    """paired(task, label, other): the mean ± sd over seeds of label's `split` metric minus other's
    on the same seed (same data order), in points (a perplexity: in its units); "—" against itself
    or without common seeds."""
    by = {(r["task"], r["label"], r["seed"]): r[split][metric] for r in rows}
    scale, unit = difference_units(metric)

    def paired(task, label, other):
        seeds = sorted(s for t, lab, s in by if t == task and lab == label and (task, other, s) in by)
        if label == other or not seeds:
            return "—"
        return spread((scale * (by[(task, label, s)] - by[(task, other, s)]) for s in seeds), 1, True, unit)
    return paired


def ist_table(d: dict, metric: str) -> str:
    """One row per task and method: the test metric over seeds, the paired per-seed differences to
    random layers and to LoRA (same seed, same data order), the chosen rate and mu, the largest
    per-step trainable parameters and the counted peak."""
    out = [f"| task | method | lr | mu | {metric} (mean ± sd) | paired vs random | paired vs LoRA | active params (max) "
           "| counted peak MiB |", "|" + "---|" * 9]
    paired = paired_differences(d["rows"], metric)
    for row in d["table"]:
        t, lab = row["task"], row["label"]
        mu = f"{row['mu']:g}" if row.get("mu") else "—"
        out.append(f"| {t} | {lab} | {row['lr']:g} | {mu} | {row[metric]:.3f} ± {row[metric + '_std']:.3f} | "
                   f"{paired(t, lab, 'random') if lab == 'ist' else '—'} | {paired(t, lab, 'lora')} | "
                   f"{row['trainable_params']:,} | {row['counted_peak_MiB']:.1f} |")
    return "\n".join(out)


def spsft_table(d: dict) -> str:
    """One row per task and method: test accuracy over seeds, the paired per-seed differences to LoRA
    r=16 and to full fine-tuning (same seed, same data order), the chosen rate, the trainable
    parameters and the counted peak."""
    out = ["| task | method | lr | accuracy (mean ± sd) | paired vs LoRA r=16 | paired vs full | trainable params "
           "| counted peak MiB |", "|" + "---|" * 8]
    paired = paired_differences(d["rows"], "accuracy")
    for row in d["table"]:
        t, lab = row["task"], row["label"]
        out.append(f"| {t} | {lab} | {row['lr']:g} | {row['accuracy']:.3f} ± {row['accuracy_std']:.3f} | "
                   f"{paired(t, lab, 'lora_r16')} | {paired(t, lab, 'full')} | {row['trainable_params']:,} | "
                   f"{row['counted_peak_MiB']:.1f} |")
    return "\n".join(out)


def peers_gpu_table(d: dict, anchors: dict | None = None) -> str:
    """One row per runner of benchmarks/peers.py gpu: measured peak and step time, each against full
    fine-tuning of the same run; dynatune's rows add the memory model's predicted peak. With the
    shared anchors of the same GPU session, the anchor of the same configuration beside it."""
    anchor = {r["config"]: r for r in (anchors or {}).get("rows", [])}
    same = {"full": "full", "dynatune full": "full", "top6": "top6_blocks", "dynatune top6": "top6_blocks",
            "lora r64": "lora_r64_all_linear", "dynatune lora r64": "lora_r64_all_linear",
            "lisa2 (public callbacks)": "lisa2_plus_embed", "dynatune lisa2": "lisa2_plus_embed",
            "badam random (bf16 weights)": "badam_bf16_switch10"}
    out = ["| runner | trainable | measured peak GiB | vs full | median step s | vs full | optimizer state MiB "
           "| predicted peak GiB | anchor peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "error" in r:
            out.append(f"| {r['label']} | does not run: {r['error'].split(';')[0]} | | | | | | | |")
            continue
        pred = r.get("predicted_peak_bytes_max", r.get("predicted_peak_bytes_last_plan"))
        a = anchor.get(same.get(r["label"], ""), {})
        out.append(f"| {r['label']} | {r['trainable_params'] / 1e6:.1f}M | {r['measured_peak_bytes'] / 2**30:.2f} | "
                   f"{r['measured_peak_vs_full']:.2f} | {r['median_step_s']:.3f} | {r['step_vs_full']:.2f} | "
                   f"{r['optimizer_state_bytes'] / 2**20:.0f} | {'' if pred is None else f'{pred / 2**30:.2f}'} | "
                   f"{a.get('peak_GiB', '')} |")
    return "\n".join(out)


def peers_gpu_plot(d: dict, path) -> Path:
    """Measured peak against median step time, one marker per runner (dynatune's filled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in d["rows"]:
        if "error" in r:
            continue
        ours = r["label"].startswith("dynatune")
        ax.scatter(r["median_step_s"], r["measured_peak_bytes"] / 2**30, marker="o" if ours else "s",
                   color="tab:blue" if ours else "tab:orange", s=30)
        ax.annotate(r["label"].replace("dynatune ", "dt "), (r["median_step_s"], r["measured_peak_bytes"] / 2**30),
                    fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    ax.set(xlabel="median step time (s)", ylabel="measured peak (GiB)",
           title=f"{d['arch']} on {d['machine'].get('gpu', d['device'])}, {d['batch']} x {d['seq']}, "
                 f"{d['precision']} (blue: dynatune, orange: peers)")
    ax.grid(alpha=0.3)
    return saved(fig, path, 120)


def peer_budget_groups(d: dict, metric: str):
    """Per task and budget of a peers.py table: (task, budget, limit MiB, scored, missing, over, paired).
    scored: (mean, label, rows) of every tool that ran, best first; missing: "label: why" of those
    that did not; over: the labels whose counted peak in some seed passed the budget; paired: the
    per-seed difference function of paired_differences."""
    groups: dict = {}
    for r in d["rows"]:
        groups.setdefault((r["task"], r["budget"]), {}).setdefault(r["label"], []).append(r)
    for (task, budget), by_label in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        limit = d["budget_bytes"][f"{task}@{budget}"] / 2**20
        scored, missing = [], []
        for label, rs in by_label.items():
            ok = [r for r in rs if r.get("fits") and "error" not in r and r.get("test")]
            if not ok:
                why = rs[0].get("error", "")
                missing.append(f"{label}: " + ("does not fit" if not why or "BudgetError" in why else "failed: " + why[:120]))
                continue
            scored.append((statistics.mean(r["test"][metric] for r in ok), label, ok))
        scored.sort(key=lambda x: -x[0])
        # a 2-step probe misses memory that grows later in a run (peers.py probes the switching peers
        # over the whole run for that reason): a run that still passed the budget is shown, wins nothing
        over = {label for _, label, ok in scored if max(r["counted_peak_bytes"] for r in ok) > limit * 2**20}
        paired = paired_differences([{**r, "label": lab} for _, lab, ok in scored for r in ok], metric)
        yield task, budget, limit, scored, sorted(missing), over, paired


def ours(label: str) -> bool:
    return label.startswith("dynatune")


def peers_budget_table(d: dict, metric: str = "accuracy") -> str:
    """benchmarks/peers.py table: per task and budget, every tool that ran (best first), then who wins
    within the budget, by how much over the runner-up and over the best of the other side (dynatune or
    peers), with the paired per-seed difference."""
    out = []
    for task, budget, limit, scored, missing, over, paired in peer_budget_groups(d, metric):
        # on an unbalanced task (SMS spam: 13% spam) accuracy hides what macro-F1 shows, so it rides along
        f1 = all("macro_f1" in r["test"] for *_, ok in scored for r in ok) and metric != "macro_f1"
        over_seeds = " (mean ± sd)" if any(len(ok) > 1 for *_, ok in scored) else ""
        out += [f"**{task} at {budget:.0%}** of full fine-tuning's counted peak ({limit:.0f} MiB)", "",
                f"| tool | seeds | test {metric}{over_seeds} |{f' test macro-F1{over_seeds} |' if f1 else ''} "
                "counted peak MiB (largest seed) | trainable | median step s | lr |",
                "|---|---|---|---|---|---|---|" + ("---|" if f1 else "")]
        for _, label, ok in scored:
            f1_cell = spread(r["test"]["macro_f1"] for r in ok) + " | " if f1 else ""
            out.append(f"| {label}{' (over the budget)' if label in over else ''} | {len(ok)} | "
                       f"{spread(r['test'][metric] for r in ok)} | "
                       f"{f1_cell}{max(r['counted_peak_bytes'] for r in ok) / 2**20:.0f} | "
                       f"{ok[0]['trainable_params'] / 1e6:.2f}M | "
                       f"{statistics.median(r['median_step_s'] for r in ok):.3f} | {ok[0]['lr']:g} |")
        out.append("")
        if missing:
            out += ["Not in the table: " + "; ".join(missing) + ".", ""]
        if over:
            out += [f"Over the budget in the full run though its probe fit: {', '.join(sorted(over))}.", ""]
        within = [x for x in scored if x[1] not in over]
        if len(within) > 1:
            best = within[0]
            other = next((x for x in within[1:] if ours(x[1]) != ours(best[1])), None)
            line = (f"Best: {best[1]} ({best[0]:.3f}), {100 * (best[0] - within[1][0]):+.1f} points over "
                    f"{within[1][1]} (paired {paired(task, best[1], within[1][1])})")
            if other is not None and other is not within[1]:
                line += f"; over the best {'peer' if ours(best[1]) else 'dynatune method'}, {other[1]}: " \
                        f"{100 * (best[0] - other[0]):+.1f} (paired {paired(task, best[1], other[1])})"
            out += [line + ".", ""]
    return "\n".join(out)


def peers_winners_table(d: dict, metric: str = "accuracy") -> str:
    """One line per task and budget: the best dynatune method and the best peer within the budget
    (test metric mean ± sd over seeds) and dynatune's paired per-seed margin."""
    out = [f"| task | budget | best dynatune method | test {metric} | best peer | test {metric} | "
           "dynatune − peer (paired, points) |", "|---|---|---|---|---|---|---|"]
    for task, budget, limit, scored, _, over, paired in peer_budget_groups(d, metric):
        within = [x for x in scored if x[1] not in over]
        mine = next((x for x in within if ours(x[1])), None)
        peer = next((x for x in within if not ours(x[1])), None)
        cell = lambda x: (x[1], spread(r["test"][metric] for r in x[2])) if x else ("none fits", "—")  # noqa: E731
        margin = paired(task, mine[1], peer[1]) if mine and peer else "—"
        out.append(f"| {task} | {budget:.0%} ({limit:.0f} MiB) | {' | '.join(cell(mine))} | {' | '.join(cell(peer))} "
                   f"| {margin} |")
    return "\n".join(out)


def merged_peer_tables(model: str, smoke: bool = False) -> dict | None:
    """peers.py writes one table per task (peers_table_<model>_<task>[_smoke].json); the rows,
    budgets and their bytes of a model's tables, as one."""
    paths = sorted(p for p in RESULTS.glob(f"peers_table_{model}_*.json") if p.stem.endswith("_smoke") == smoke)
    parts = [json.loads(p.read_text()) for p in paths]
    if not parts:
        return None
    return {"metric": parts[0].get("metric", "accuracy"), "budgets": parts[0]["budgets"],
            "rows": [r for d in parts for r in d["rows"]],
            "budget_bytes": {k: v for d in parts for k, v in d["budget_bytes"].items()}}


def peers_pareto_plot(d: dict, path, metric: str = "accuracy") -> Path:
    """Test metric against counted peak, one panel per task, one marker per tool and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in d["rows"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts: dict = {}
        for r in d["rows"]:
            if r["task"] == task and r.get("fits") and "error" not in r and r.get("test"):
                pts.setdefault((r["label"], r["budget"]), []).append(r)
        seen = set()
        for (label, budget), rs in pts.items():
            m, sd = mean_sd(r["test"][metric] for r in rs)
            x = statistics.mean(r["counted_peak_bytes"] for r in rs) / 2**20
            ours = label.startswith("dynatune")
            ax.errorbar(x, m, yerr=sd, fmt="o" if ours else "s", color="tab:blue" if ours else "tab:orange",
                        capsize=2, ms=4)
            if (label, round(x)) not in seen:
                seen.add((label, round(x)))
                ax.annotate(label.replace("dynatune ", "dt "), (x, m), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        for b in d["budgets"]:
            ax.axvline(d["budget_bytes"][f"{task}@{b}"] / 2**20, color="grey", lw=0.6, ls=":")
        ax.set(title=f"{task} (blue: dynatune, orange: peers; dotted: budgets)", xlabel="counted peak (MiB)",
               ylabel=f"test {metric}")
        ax.grid(alpha=0.3)
    return saved(fig, path, 120)


def peers_memory_time_plot(d: dict, path) -> Path:
    """Two panels: each dynatune run's predicted peak (the memory model at full-length batches, the
    largest over its plans) against its counted peak, with y = x; and each tool's median step time
    per budget (median over seeds, as in the tables; one bar group per task and budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in d["rows"] if r.get("fits") and "error" not in r and r.get("test")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.6]})
    mine = [r for r in ok if r["kind"] == "dynatune" and r.get("predicted_peak_bytes")]
    for i, label in enumerate(sorted({r["label"] for r in mine})):
        rs = [r for r in mine if r["label"] == label]
        left.scatter([r["counted_peak_bytes"] / 2**20 for r in rs], [r["predicted_peak_bytes"] / 2**20 for r in rs],
                     s=14, color=f"C{i}", label=label.replace("dynatune ", ""))
    if mine:
        lo = min(min(r["counted_peak_bytes"], r["predicted_peak_bytes"]) for r in mine) / 2**20
        hi = max(max(r["counted_peak_bytes"], r["predicted_peak_bytes"]) for r in mine) / 2**20
        left.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="predicted = counted")
    left.set(xlabel="counted peak (MiB)", ylabel="predicted peak (MiB)",
             title="dynatune: predicted (full-length batches) vs counted")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    groups: dict = {}  # a peer's bar is its family's, whichever setting fit the budget
    for r in ok:
        tool = r["label"] if r["kind"] == "dynatune" else r["label"].split()[0]
        groups.setdefault((r["task"], r["budget"]), {}).setdefault(tool, []).append(r["median_step_s"])
    labels = sorted({lab for g in groups.values() for lab in g}, key=lambda lab: (lab.startswith("dynatune"), lab))
    keys = sorted(groups, key=lambda k: (k[0], -k[1]))
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        xs = [j + i * width for j, k in enumerate(keys) if lab in groups[k]]
        ys = [statistics.median(groups[k][lab]) for k in keys if lab in groups[k]]
        right.bar(xs, ys, width, label=lab, color=plt.cm.tab20(i % 20))
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{t} {b:.0%}" for t, b in keys], fontsize=8,
                     rotation=25, ha="right")
    right.set(ylabel="median step (s)", title="step time per tool and budget (CPU)")
    right.legend(fontsize=6, ncol=2)
    return saved(fig, path, 120)


def lisa_memory_table(runs: dict) -> str:
    """Optimizer-state MiB (and measured peak GiB on a GPU) at the end of each period, both LISAs."""
    out = []
    for where, d in runs.items():
        pub, ours = d["public_callbacks"], d["dynatune_lisa"]
        measured = "measured_peak_bytes" in pub[0]
        out += [f"{where}: {d['arch']}, {d['batch']} x {d['seq']}, k={d['k']}, a switch every {d['period']} steps",
                "", "| after switch | public callbacks: optimizer MiB | dynatune lisa: optimizer MiB |"
                + (" public: measured peak GiB | dynatune: measured peak GiB |" if measured else ""),
                "|---|---|---|" + ("---|---|" if measured else "")]
        for i, (a, b) in enumerate(zip(pub, ours), 1):
            peaks = "".join(f" {x['measured_peak_bytes'] / 2**30:.2f} |" for x in (a, b)) if measured else ""
            out.append(f"| {i} | {a['optimizer_state_bytes'] / 2**20:.0f} | {b['optimizer_state_bytes'] / 2**20:.0f} |"
                       + peaks)
        out.append("")
    return "\n".join(out)


def lisa_memory_plot(runs: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (where, d) in zip(axes[0], runs.items()):
        for key, label, style in (("public_callbacks", "public callbacks (one optimizer over all)", "s-"),
                                  ("dynatune_lisa", "dynatune lisa (state of blocks that leave freed)", "o-")):
            ys = [p["optimizer_state_bytes"] / 2**20 for p in d[key]]
            ax.plot(range(1, len(ys) + 1), ys, style, label=label)
        ax.set(title=f"{where}: {d['arch']}, k={d['k']}", xlabel="switch", ylabel="optimizer state (MiB)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return saved(fig, path, 110)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "baselines"
    if which == "baselines":
        print(table(rows_of("baselines_table_minilm*.json"), "accuracy"))
        print()
        print(table([r for r in rows_of("baselines_table_smollm2*.json")], "exact_match"))
    elif which == "adagradselect":
        for part, metric in (("minilm", "accuracy"), ("smollm2", "exact_match")):
            print(f"{part}, one learning rate per method family:")
            print(table(rows_of(f"adagradselect_table_{part}.json"), metric, keys=("label",)))
            swept = []  # each method's learning rate chosen on validation (seed 0)
            for path in sorted(RESULTS.glob(f"adagradselect_table_{part}_lr_sweep*.json")):
                d = json.loads(path.read_text())
                swept += [{**r, "label": f"{r['label']} (lr {d['chosen_lr'][r['label']]:g})"} for r in d["rows"]]
            if swept:
                print(f"\n{part}, learning rate chosen on validation:")
                print(table(sorted(swept, key=lambda r: r["label"]), metric, keys=("label",)))
            print()
    elif which == "dynalora":
        for name in ("dynalora_table.json", "dynalora_table_e6.json"):  # 2 epochs, then the 6-epoch protocol
            if (RESULTS / name).exists():
                print(f"{name}:\n{dynalora_table(json.loads((RESULTS / name).read_text()))}", end="\n\n")
    elif which == "ist":
        for part, metric in (("minilm", "accuracy"), ("smollm2", "exact_match")):
            path = RESULTS / f"ist_table_{part}.json"
            if path.exists():
                print(ist_table(json.loads(path.read_text()), metric), end="\n\n")
    elif which == "spsft":
        print(spsft_table(json.loads((RESULTS / "spsft_table.json").read_text())))
    elif which == "peers":
        gpu = RESULTS / "peers_gpu.json"
        if gpu.exists():
            d = json.loads(gpu.read_text())
            anchors = RESULTS / "peers_anchors_gpu.json"
            print(peers_gpu_table(d, json.loads(anchors.read_text()) if anchors.exists() else None), end="\n\n")
            print(peers_gpu_plot(d, RESULTS / "peers_gpu.png"), end="\n\n")
        smoke = "_smoke" if "--smoke" in sys.argv else ""
        for model in ("minilm", "smollm2"):  # MiniLM's classification tasks, SmolLM2's SFT task
            d = merged_peer_tables(model, bool(smoke))
            if d is not None:
                print(peers_winners_table(d, d["metric"]), end="\n\n")
                print(peers_budget_table(d, d["metric"]), end="\n\n")
                print(peers_pareto_plot(d, RESULTS / f"peers_table_{model}{smoke}.png", d["metric"]), end="\n\n")
                print(peers_memory_time_plot(d, RESULTS / f"peers_table_{model}{smoke}_memory_time.png"), end="\n\n")
        runs = {where: json.loads((RESULTS / name).read_text()) for where, name in
                (("CPU, counted", "peers_lisa_memory.json"), ("GPU, counted and measured", "peers_lisa_memory_cuda.json"))
                if (RESULTS / name).exists()}
        if runs:
            print(lisa_memory_table(runs))
            print(lisa_memory_plot(runs, RESULTS / "peers_lisa_memory.png"))
    elif which == "trims":
        for part, metric in (("minilm", "accuracy"), ("smollm2", "exact_match"), ("smollm2_dialog-sft", "perplexity")):
            path = RESULTS / f"trims_budgets_{part}.json"
            if path.exists():
                rows = json.loads(path.read_text())["rows"]
                print(trims_table(rows, metric), end="\n\n")
                print(trims_defaults_table(rows, metric), end="\n\n")
                print(trims_plot(rows, RESULTS / f"trims_budgets_{part}.png", metric))
