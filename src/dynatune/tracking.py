"""Experiment tracking for the plain loop: `report_to=tensorboard|wandb|none` (a comma list for both).

Each step's log record (engine.Tuner.end_step: loss, learning rate, the plan, counted bytes by
term, predicted bytes and the budget when a memory model prices the run, the method's own
fields) becomes a set of scalars at the optimizer step it ends; the plan's units go as text
whenever they change; each validation evaluation goes under eval/. TensorBoard is written with
torch.utils.tensorboard into output_dir/tensorboard, as float64 tensor summaries (exact bytes); wandb runs in offline mode into output_dir
(`wandb sync` uploads it later), so neither needs a network.
"""
from __future__ import annotations

import importlib.util

from .errors import DynatuneError

BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name -> (module, extra)
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "offloaded", "counted", "measured")


def parse_report_to(value) -> list[str]:
    """'tensorboard', 'wandb', 'tensorboard,wandb' or 'none' -> the backends, each checked installed."""
    names = [v.strip().lower() for v in str(value or "none").split(",") if v.strip()]
    if names in ([], ["none"]):
        return []
    for n in names:
        if n not in BACKENDS:
            raise DynatuneError(f"report_to={value} names {n!r}; use tensorboard, wandb, both as "
                                "tensorboard,wandb, or none.")
        module, extra = BACKENDS[n]
        if importlib.util.find_spec(module) is None:
            raise DynatuneError(f"report_to={n} needs the {module} package, which is not installed; "
                                f"pip install 'dynatune[{extra}]' (or {module}), or set report_to=none.")
    return list(dict.fromkeys(names))


def step_scalars(entry: dict) -> dict[str, float]:
    """A step's log record as flat scalars (what a tracker charts)."""
    out: dict[str, float] = {}
    if entry.get("loss") is not None:
        out["train/loss"] = float(entry["loss"])
    for k in ("lr", "epoch"):
        if entry.get(k) is not None:
            out[f"train/{k}"] = float(entry[k])
    if entry.get("step_time_s") is not None:
        out["train/step_time_s"] = float(entry["step_time_s"])
    out["plan/units_updated"] = float(len(entry.get("update", ())))
    if entry.get("exit_depth") is not None:
        out["plan/exit_depth"] = float(entry["exit_depth"])
    mem = entry.get("memory") or {}
    for k in MEMORY_TERMS:
        if k in mem:
            out[f"memory/{'counted_bytes' if k == 'counted' else k}"] = float(mem[k])
    for k in ("predicted_bytes", "predicted_peak_bytes", "budget_bytes", "bytes_moved"):
        if entry.get(k) is not None:
            out[f"memory/{k}"] = float(entry[k])
    for k, v in (entry.get("method_log") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"method/{k}"] = float(v)
    return out


class Trackers:
    """The trackers one run writes to; `log_step(entry)`, `log_eval(step, metrics)`, `close()`."""

    def __init__(self, names: list[str], out_dir, run_name: str, config: dict | None = None):
        self.names = names
        self._tb = self._wandb = None
        self._last_plan: str | None = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in names:
            import wandb
            self._wandb = wandb.init(mode="offline", dir=str(out_dir), project="dynatune", name=run_name,
                                     config=config or {}, reinit="finish_previous")

    def log_step(self, entry: dict) -> None:
        step = int(entry["step"]) + 1  # optimizer steps done, as evaluations and checkpoints count them
        scalars = step_scalars(entry)
        plan = ", ".join(entry.get("update", ()))
        changed = plan != self._last_plan
        self._last_plan = plan
        if self._tb is not None:
            for k, v in scalars.items():
                self._scalar(k, v, step)
            if changed:
                self._tb.add_text("plan/update", plan or "(nothing)", step)
        if self._wandb is not None:
            self._wandb.log({**scalars, **({"plan/update": plan} if changed else {})}, step=step)

    def log_eval(self, step: int, metrics: dict) -> None:
        values = {f"eval/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in values.items():
                self._scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        # a tensor summary in float64: byte counts above 2**24 stay exact (float32 scalars round them)
        self._tb.add_scalar(tag, value, step, new_style=True, double_precision=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_trackers(report_to, out_dir, run_name: str, config: dict | None = None) -> Trackers | None:
    names = parse_report_to(report_to)
    return Trackers(names, out_dir, run_name, config) if names and out_dir is not None else None
