"""`dynatune eval RUN_DIR`: evaluate a finished run's saved model on its task (or another task).

On its own task, at the evaluation batch size and precision the run used (both recorded), it
reproduces metrics.json's figures exactly; a saved model that cannot is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import load_config
from .data.metrics import evaluate
from .data.tasks import load_task, task_kind
from .errors import DynatuneError
from .loop import resolve_device
from .models import load_model
from .precision import autocast_for


def evaluate_run(run_dir, overrides: list[str] | None = None) -> dict:
    run = Path(run_dir)
    saved = run / "config.json"
    if not (run / "model").is_dir() or not saved.is_file():
        raise DynatuneError(f"'{run_dir}' is not a finished dynatune run (it needs config.json and model/); "
                            "pass the output_dir of a run trained with save_model=true.")
    recorded = json.loads(saved.read_text())
    keep = ("task", "max_length", "eval_batch_size", "precision", "device", "seed")
    base = [f"{k}={recorded[k]}" for k in keep if recorded.get(k) is not None]
    base += [f"data.{k}={v}" for k, v in recorded.get("data", {}).items() if v is not None]
    metrics = run / "metrics.json"
    used = json.loads(metrics.read_text()).get("eval_batch_size") if metrics.is_file() else None
    if used is not None:  # the batch the run evaluated in, which its budget may have lowered
        base.append(f"eval_batch_size={used}")
    cfg = load_config(None, base + list(overrides or []))
    model_dir = str(run / "model")
    # an adapter's arch: base is rebuilt from the run's seed
    _, tokenizer = load_model(model_dir, task_kind(cfg.task), seed=cfg.seed, tokenizer_only=True, saved=True)
    task = load_task(cfg.task, tokenizer, cfg.data, cfg.max_length)
    # bf16 as the run had it: the base model cast before any adapter went in (peft keeps adapters in fp32)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, _ = load_model(model_dir, task.kind, num_labels=task.num_labels, dtype=dtype, seed=cfg.seed, saved=True)
    device = resolve_device(cfg.device)
    model.to(device)
    out = {"run": str(run), "task": cfg.task}
    with torch.no_grad(), autocast_for(cfg.precision, device.type):
        for split in ("validation", "test"):
            if getattr(task, split) is not None:
                out[split] = evaluate(model, task, split, cfg.eval_batch_size, device)
    return out
