"""Run configuration: one dataclass schema, YAML files and `key=value` overrides via OmegaConf.

Every registered method contributes its own section (`topk.k=2`, `lisa.period=20`, ...), so an
unknown key anywhere is rejected with the list of valid keys at that level.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .data.metrics import higher_is_better
from .data.tasks import DataConfig, read_text, task_kind
from .errors import DynatuneError
from .memory import check_margin, parse_budget
from .methods import METHODS
from .precision import check_precision
from .tracking import parse_report_to


def opt(default, help: str):
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    method: str = opt("trims", "method name (see `dynatune ls`); default TriMS under its 60% budget")
    model: str = opt("minilm-l6", "minilm-l6, smollm2-135m, a local Hugging Face directory, or arch:NAME")
    task: str = opt("trec", "task name (see `dynatune ls`)")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data files and column names"})
    epochs: float = opt(2.0, "passes over the training set (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run; -1 = as many as `epochs` needs")
    stop_after: int = opt(-1, "stop after this many steps as if interrupted (the schedule still spans the "
                                "whole run); resume later with --resume. -1 = run to the end")
    batch_size: int = opt(16, "examples per optimizer step (before gradient accumulation splits it)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (batch_size is split into this many)")
    eval_batch_size: int = opt(64, "examples per evaluation batch")
    max_length: int = opt(64, "tokens per example; longer examples are truncated")
    lr: Optional[float] = opt(None, "peak learning rate; default: the method's own")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.06, "fraction of steps of linear warm-up, then linear decay to 0")
    grad_clip: float = opt(1.0, "clip the gradient norm to this value; 0 = no clipping")
    precision: str = opt("fp32", "fp32, amp-bf16 (fp32 weights, bf16 autocast), amp-fp16 (fp32 weights, fp16 "
                                 "autocast, dynamic loss scaling; CUDA only) or bf16 (pure bf16)")
    seed: int = opt(0, "seed of the model's init, data order, dropout and the method's sampling")
    output_dir: str = opt("runs/{method}-{task}", "where logs, metrics, plots and the model go")
    log_every: int = opt(1, "write a JSONL record every this many steps")
    report_to: str = opt("none", "also send each step's record (loss, lr, plan, counted and predicted bytes) and "
                                 "each evaluation to tensorboard (output_dir/tensorboard), wandb (offline mode, in "
                                 "output_dir), both (tensorboard,wandb) or none; each is an optional extra")
    eval_each_epoch: bool = opt(True, "evaluate on validation at the end of each epoch")
    eval_steps: int = opt(0, "also evaluate on validation every this many optimizer steps (records in "
                             "metrics.json's evals and evals.jsonl); 0 = only at epoch ends")
    metric_for_best: Optional[str] = opt(None, "validation metric that picks the best evaluation and drives early "
                                               "stopping (accuracy, macro_f1, mcc, pearson, exact_match: higher is "
                                               "better; loss, perplexity, mse: lower); default: the task's first")
    early_stopping_patience: int = opt(0, "stop when this many evaluations in a row do not improve metric_for_best; "
                                          "0 = never stop early")
    early_stopping_threshold: float = opt(0.0, "an evaluation improves only if it beats the best by more than this")
    load_best: bool = opt(False, "keep the weights of the best evaluation in checkpoints/best and load them back "
                                 "before the final test evaluation and the model save")
    checkpoint_every: int = opt(0, "save a resumable checkpoint every this many steps; 0 = only at the end")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    resume: Optional[str] = opt(None, "a run directory or checkpoint to resume from")
    save_model: bool = opt(True, "save the trained model in output_dir/model: the whole model (safetensors), or for "
                                 "lora, dora and vera a peft adapter with the task head, which names its base model")
    save_merged: bool = opt(False, "lora, dora, vera: also save the adapter merged into its base model in "
                                   "output_dir/model/merged, loadable with plain from_pretrained")
    budget: Optional[str] = opt(None, "memory budget: bytes ('12GiB', '500MB'), a fraction of full fine-tuning's "
                                      "predicted peak (0.6 or 60%), or none; unset = the method's default (trims: 0.6)")
    margin: float = opt(0.03, "fraction of the budget kept free: a plan runs only if its predicted peak is at most "
                              "budget x (1 - margin)")
    chunked_loss: int = opt(0, "causal LM: compute the loss over this many tokens at a time without full fp32 "
                                 "logits (0 = the model's own loss)")
    gradient_checkpointing: bool = opt(False, "activation checkpointing: each block that runs keeps only its input and "
                                              "backward recomputes the rest, one block at a time (torch's "
                                              "non-reentrant checkpoint; priced by the memory model)")
    layers: Optional[str] = opt(None, "dotted path of the block list for architectures dynatune does not know")
    count_memory: bool = opt(True, "count live bytes each step (saved tensors hooked in forward, weights, gradients "
                                   "and optimizer state after the update); false skips that work, and then "
                                   "log.jsonl and metrics.json carry no counted bytes and TriMS calibrates its "
                                   "memory estimates from the memory model alone")
    device: str = opt("auto", "auto, cpu or cuda")
    strategy: str = opt("ddp", "under torchrun / accelerate launch: ddp (every rank holds the model) or fsdp "
                               "(FSDP2 fully_shard per block; not gradselect/adagradselect; budgets held against the prediction)")
    progress: bool = opt(True, "show a progress bar")


def _schema_class():
    """RunConfig plus one section per registered method, built once the registry is complete."""
    extra = [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in sorted(METHODS.items())]
    return dataclasses.make_dataclass("DynatuneConfig", extra, bases=(RunConfig,))


def valid_keys(node) -> list[str]:
    return sorted(node.keys()) if node is not None else []


def _explain(err: OmegaConfBaseException, base) -> DynatuneError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err) or "Missing key" in str(err):
        parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
        node = OmegaConf.select(base, parent) if parent else base
        keys = valid_keys(node) if OmegaConf.is_config(node) else []
        return DynatuneError(f"unknown config key '{key}'; valid keys{' under ' + parent if parent else ''} are: "
                             f"{', '.join(keys)}.")
    if isinstance(err, ValidationError):
        return DynatuneError(f"bad value for '{key}': {err.msg.splitlines()[0]}.")
    return DynatuneError(f"bad configuration at '{key}': {str(err).splitlines()[0]}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Any:
    """Schema <- YAML file <- `key=value` overrides, checked at every step; returns an object config.

    With `resume` set, the run's own config.json comes first (schema <- config.json <- YAML <-
    overrides): a resumed run is that run, so a setting that would change what it trains is refused."""
    base = OmegaConf.structured(_schema_class())
    cfg = _merged(base, base, path, overrides)
    if cfg.resume:
        run = _resumed_run(cfg.resume)
        saved = _run_config(run, base)
        cfg = _merged(base, OmegaConf.merge(saved, {"output_dir": str(run)}), path, overrides)
        _check_resume(saved, cfg, run)
    obj = OmegaConf.to_object(cfg)
    check(obj)
    return obj


def _merged(base, start, path, overrides):
    """start <- YAML file <- `key=value` overrides."""
    try:
        cfg = start
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise DynatuneError(f"config file '{path}' does not exist; pass an existing YAML file to --config.")
            loaded = _read_yaml(p, path) or {}
            if not isinstance(loaded, dict):
                raise DynatuneError(f"config file '{path}' must hold a mapping of keys to values.")
            cfg = OmegaConf.merge(cfg, OmegaConf.create(loaded))
        for item in overrides or []:
            if "=" not in item:
                raise DynatuneError(f"override '{item}' is not of the form key=value (e.g. lr=1e-4 or topk.k=2).")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _explain(err, base) from None
    return cfg


# What a resumed run may set anew: how it is shown, logged, checkpointed and saved, and where it
# runs; none of them changes an update. Everything else is the run's own.
RESUME_FREE = ("progress", "stop_after", "log_every", "checkpoint_every", "keep_checkpoints", "device",
               "save_model", "save_merged", "resume", "report_to", "strategy")


def _resumed_run(resume: str) -> Path:
    """The run directory of `resume`: the directory itself, or the run above a checkpoints/step-N."""
    p = Path(resume)
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent if p.name == "checkpoints" else p


def _run_config(run: Path, base):
    """The config a run wrote to its config.json, as its resumed run starts from it."""
    if not (run / "config.json").is_file():
        raise DynatuneError(f"cannot resume '{run}': it holds no config.json; pass a run directory that "
                            "`dynatune train` wrote, or one of its checkpoints/step-N folders.")
    saved = json.loads((run / "config.json").read_text())
    saved.update(stop_after=-1, resume=None)  # they were the interrupted invocation's, not the run's
    if saved.get("budget") is None:  # train() records a run without a budget as null; unset means the default
        saved["budget"] = "none"
    try:
        return OmegaConf.merge(base, saved)
    except OmegaConfBaseException as err:
        raise _explain(err, base) from None


def _check_resume(saved, cfg, run: Path) -> None:
    """Refuse a resumed config that differs from the run's own in a setting that changes training."""
    if run_dir(cfg).resolve() != run.resolve():
        raise DynatuneError(f"output_dir={cfg.output_dir} is not the run being resumed ({run}); a resumed run "
                            "writes into its own directory, so drop output_dir or give that one.")
    old, new = _flat(saved, cfg.method), _flat(cfg, cfg.method)
    changed = [k for k in sorted(old.keys() | new.keys())
               if k.split(".")[0] not in (*RESUME_FREE, "output_dir") and old.get(k) != new.get(k)]
    if changed:
        diffs = ", ".join(f"{k} is {old.get(k)} in the run but {new.get(k)} here" for k in changed)
        raise DynatuneError(f"cannot resume {run} exactly with a setting that changes its training ({diffs}); "
                            "drop the override, or start a new run in another output_dir.")


def _flat(cfg, method: str) -> dict:
    """Dotted key -> value over the run settings and the method's own section."""
    out = {}
    for k, v in OmegaConf.to_container(cfg).items():
        if isinstance(v, dict):
            if k not in METHODS or k == method:
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _read_yaml(p: Path, path: str):
    text = read_text(p, "utf-8", f"config file '{path}'", "save it as UTF-8")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark, started = err.problem_mark, err.context_mark
        where, problem = f"line {mark.line + 1}, column {mark.column + 1}", err.problem
        if started is not None:  # where the construct that the problem breaks begins
            problem += f" ({err.context} from line {started.line + 1}, column {started.column + 1})"
    except yaml.reader.ReaderError as err:  # a character YAML does not allow
        line = text.count("\n", 0, err.position) + 1
        where, problem = f"line {line}", str(err).splitlines()[0]
    raise DynatuneError(f"config file '{path}' is not valid YAML at {where}: {problem}; fix the file there.")


def check(cfg) -> None:
    """Value checks that the schema's types cannot express; all raised before any training."""
    if cfg.method not in METHODS:
        raise DynatuneError(f"unknown method '{cfg.method}'; choose one of: {', '.join(sorted(METHODS))}.")
    task_kind(cfg.task)  # raises, listing the known tasks
    run_dir(cfg)  # output_dir's braces name only {method} and {task}
    check_precision(cfg.precision)
    parse_report_to(cfg.report_to)  # a backend that is not installed is one sentence before anything loads
    for name in ("batch_size", "grad_accum", "eval_batch_size", "max_length"):
        if getattr(cfg, name) < 1:
            raise DynatuneError(f"{name} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("eval_steps", "early_stopping_patience", "early_stopping_threshold"):
        if getattr(cfg, name) < 0:
            raise DynatuneError(f"{name} must be at least 0, got {getattr(cfg, name)}.")
    if cfg.metric_for_best is not None:
        higher_is_better(cfg.metric_for_best)  # raises, listing the known metrics
    if (cfg.early_stopping_patience or cfg.load_best) and not (cfg.eval_steps or cfg.eval_each_epoch):
        raise DynatuneError("early_stopping_patience and load_best need evaluations; set eval_steps > 0 or "
                            "eval_each_epoch=true.")
    if cfg.batch_size % cfg.grad_accum:
        raise DynatuneError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}.")
    if run_budget(cfg.budget, METHODS[cfg.method]) is not None:
        # the form only (bytes with a unit, or a fraction in (0, 1]); a fraction is resolved against the
        # memory model's full fine-tuning peak, and the floor (smallest plan) is checked, before training
        parse_budget(run_budget(cfg.budget, METHODS[cfg.method]))
        check_margin(cfg.margin)


def run_dir(cfg) -> Path:
    """The directory a run writes to: output_dir with {method} and {task} filled in."""
    try:
        return Path(cfg.output_dir.format(method=cfg.method, task=cfg.task))
    except (KeyError, IndexError, ValueError) as err:
        raise DynatuneError(f"output_dir={cfg.output_dir!r} can name only {{method}} and {{task}} in braces "
                            f"({type(err).__name__}: {err}); write other braces as {{{{ and }}}}.") from None


def run_budget(budget, method):
    """The budget a run uses: the user's, else the method's default; 'none' turns it off."""
    budget = budget if budget is not None else method.default_budget
    if budget is not None and str(budget).strip().lower() in ("none", "off"):
        return None
    return budget


def method_config(cfg):
    return getattr(cfg, cfg.method)


def to_dict(cfg) -> dict:
    """Only the chosen method's section is kept: the others are noise in a run's record."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {k: v for k, v in d.items() if k not in METHODS or k == cfg.method}
