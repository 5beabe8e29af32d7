"""Print the README's benchmark tables (markdown) from benchmarks/results/*.json."""
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
        vals = [r["test"][metric] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(f"| {' | '.join(map(str, key))} | {len(rs)} | {statistics.mean(vals):.3f} ± {sd:.3f} | "
                   f"{rs[0]['trainable_params'] / 1e6:.2f}M | "
                   f"{statistics.mean(r['counted_peak_bytes'] for r in rs) / 2**20:.0f} | "
                   f"{statistics.mean(r['optimizer_bytes_at_peak'] for r in rs) / 2**20:.0f} | "
                   f"{statistics.median(r['median_step_s'] for r in rs):.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "baselines"
    if which == "baselines":
        print(table(rows_of("baselines_table_minilm*.json"), "accuracy"))
        print()
        print(table([r for r in rows_of("baselines_table_smollm2*.json")], "exact_match"))
    elif which == "adagradselect":
        print(table(rows_of("adagradselect_table_*.json"), "accuracy", keys=("label",)))
