"""dynatune inside a stock Hugging Face `Trainer`: a callback owns the engine's timing.

    method = build_method("lisa", seed=0)
    model = prepare(model, method)              # before the Trainer: adapters go in first
    callback = DynatuneCallback(method, log_path="out/log.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.tuner.history, callback.tuner.peak   # plans and counted bytes, step by step

The callback maps the engine's per-step contract (engine.py) onto the Trainer's events:

    on_train_begin         Tuner(model, method, optimizer=<the Trainer's optimizer>)
    on_step_begin          tuner.begin_step()       (before the first micro-batch)
    on_pre_optimizer_step  tuner.after_backward()   (after the last backward)
    on_optimizer_step      tuner.after_optimizer_step()
    on_step_end            tuner.end_step(loss)     (one record, also written to `log_path`)

Why `prepare` comes first: the Trainer builds its optimizer from the parameters that require a
gradient when `train()` starts, before any callback runs. Adapter methods (lora, dora, vera)
inject new parameters, and peft freezes the base model while doing so (a fresh task head too),
so `prepare` injects them and marks every parameter trainable; the engine then freezes, per
step, whatever the plan leaves out. A parameter the Trainer's optimizer still lacks (frozen by
the user beforehand) is added by the engine, and the Trainer's scheduler is extended to it.

The loss passed to `end_step` is the loss the Trainer optimizes for that step, read by a forward
hook on the model (it only reads `output.loss`, so numerics do not change): when the Trainer
passes `num_items_in_batch` (models that accept loss kwargs, e.g. causal LMs) each micro-batch
loss is already normalized by the step's total count of target tokens and the micro-batch losses
are summed; otherwise it is the mean of the micro-batch losses, as the Trainer divides each by the
number of accumulation steps. With one process it equals the Trainer's logged loss at
`logging_steps=1` (bit for bit without gradient accumulation), including the Trainer's own quirk:
a model that accepts `num_items_in_batch` but ignores it (BERT classifiers in transformers 5) gets
the sum of its micro-batch means. It is None when the model returns no loss (a `compute_loss_func`
or label smoothing computes it outside the model).

Budgets: `DynatuneCallback(method, budget="60%")` (or "12GiB", 0.6, a byte count) prices the run as
the plain loop does, from the Trainer's per-device batch size, gradient accumulation, precision
(bf16=True is autocast, "amp-bf16"; fp16=True is "amp-fp16", priced as amp-bf16 byte for byte,
with gradient signals read divided by the Trainer's loss scale; a model loaded in bf16 is "bf16") and `max_length` (default: the longest tokenised training example it can see; it says
which it used). A budgeted method's own default (TriMS's 60%) applies here too. A budget below the
method's smallest plan is refused at train begin; a plan above it is refused before its step runs.

Checkpoints: on each Trainer save the callback writes the engine's state (`dynatune_state.pt`:
method state and generator, plans, history, optimizer state by parameter name, offloaded state
included) into the checkpoint folder, and the full model even while an exit is active; on
`trainer.train(resume_from_checkpoint=...)` it reads that state back, so the resumed run takes the
same plans and reaches the same weights as a straight one.

Evaluation, early stopping and the best checkpoint are the Trainer's own (`eval_strategy`,
`eval_steps`, `EarlyStoppingCallback`, `metric_for_best_model`, `load_best_model_at_end`); they
work with the callback as they are. With `load_best_model_at_end` the engine takes the best
checkpoint's state along with its weights (plan and exit, method state, optimizer state, as
resuming from it would; the history keeps every step run), and when an early exit was active at
the end or at the best step, every block's weights are loaded from that checkpoint, not only those
of the blocks running at the end (tests/test_hf_eval.py).

Tracking: with the Trainer's `report_to` (tensorboard, wandb, ...), each training log also
carries the last step's record as `dynatune/...` scalars (plan size, counted bytes by term,
predicted bytes, budget, the method's fields); the callback runs ahead of the reporting callbacks
so that they see them.

Activation checkpointing: the Trainer's `gradient_checkpointing=True` works and is priced; it must
be non-reentrant (`use_reentrant=True` is refused), and the `enable_input_require_grads` hook the
Trainer turns on with it is turned off again (it would put every block on the backward path).

`prepare` leaves a guard on the model: training it without the callback (which would be full
fine-tuning, since every parameter is marked trainable) fails at the first training forward.

One ordering differs from the plain loop: the Trainer clips gradients *before*
`on_pre_optimizer_step`, so a plan with `probe_params` (gradients read for a signal, then freed)
would have those gradients counted in the clip norm. `DynatuneTrainer` frees them before it
clips, which a callback cannot do; with such methods and `max_grad_norm > 0`, use it to match the
plain loop exactly.

Out of memory: `DynatuneTrainer` catches torch.OutOfMemoryError in a micro-batch's forward or
backward and retries the step with the same plan (`tuner.retry_step`: gradients, signals and the
global RNG back to the step's start), replaying the step's earlier micro-batches and running the
failed one as pieces of half the size, until pieces of one example (then DynatuneError, or the
OutOfMemoryError itself under `auto_find_batch_size`, which then restarts with a smaller batch;
the callback first aborts the failed step). Each piece is scaled as the Trainer scales a micro-batch
under gradient accumulation, so the step equals a Trainer run that split that micro-batch by
accumulation from the start (single process; see `DynatuneTrainer`). A plain `Trainer` with the
callback lets the error through.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..batching import largest_shape, n_examples, split_batch
from ..engine import Tuner, guard_until_tuned
from ..errors import DynatuneError
from ..loop import one_budget
from ..memory import install_budget
from ..optim import split_into_unit_groups
from ..units import partition
from ..tracking import step_scalars

STATE_FILE = "dynatune_state.pt"  # the engine's state, beside the Trainer's files in each checkpoint

logger = logging.getLogger(__name__)


def prepare(model: nn.Module, method, train_dataset=None, data_collator=None, *, batch_size: int = 8,
            seed: int = 0, precision: str = "fp32") -> nn.Module:
    """Get `model` ready for a Trainer: inject the method's adapters, make every parameter trainable.

    Call it before creating the Trainer and give the Trainer the model it returns (VeRA wraps the
    model in a PeftModel). Idempotent: a model that already carries adapters is kept as it is.
    A method that updates base weights refuses a model carrying adapters (`Method.check_model`):
    Trainer.save_model would save the adapter alone and lose those updates.
    A method with a calibration phase (SPSFT's Taylor importance) needs `train_dataset` and
    `data_collator` here: it reads examples drawn from them (by `seed`, in micro-batches of
    `batch_size`, under `precision`'s autocast) before its modules go in, as the plain loop does.
    """
    method.check_model(model)
    if method.calibration_examples() > 0:
        if train_dataset is None or data_collator is None:
            raise DynatuneError(f"method '{method.name}' chooses its structure from calibration batches; pass "
                                "train_dataset and data_collator to prepare(model, method, train_dataset, "
                                "data_collator).")
        from types import SimpleNamespace

        from ..loop import run_calibration
        device = next(model.parameters()).device
        cfg = SimpleNamespace(batch_size=batch_size, grad_accum=1, seed=seed, precision=precision, budget=None)
        run_calibration(model, method, train_dataset, data_collator, cfg, device)
    model = method.prepare_model(model)
    for p in model.parameters():
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    guard_until_tuned(model)  # every parameter trains now: without the callback this would be full fine-tuning
    return model


class DynatuneCallback(TrainerCallback):
    """Runs a dynatune method inside `transformers.Trainer`; no per-step call is left to the user.

    Args:
        method: a method instance (`dynatune.build_method(name, seed=0, **options)`).
        budget: "60%", 0.6 (fractions of full fine-tuning's predicted peak), "12GiB", or a byte count
            (int); default: the method's own (TriMS: 60%), or none. Given to build_method as well: an error.
        max_length: the sequence length budgets are priced at; default: the longest tokenised
            training example the callback can see.
        margin: the share of the budget kept free (0.03).
        log_path: optional file that receives one JSON record per optimizer step, the same records
            the plain loop writes to log.jsonl (plus `lr` and `epoch`); appended to.
        **tuner_kwargs: passed to `Tuner` (e.g. `layers="transformer.h"`, `count_memory=False`).

    After training, `callback.tuner` holds the history (plans, losses, counted bytes) and the peak;
    `callback.budget_note` says how the budget was priced.
    """

    def __init__(self, method, budget=None, *, max_length: int | None = None, margin: float = 0.03,
                 log_path: str | Path | None = None, **tuner_kwargs):
        self.method = method
        # one budget: the callback's or build_method's (never both), else the method's default
        given = one_budget(budget, method, "DynatuneCallback")
        self.budget = given if given is not None else method.default_budget
        if isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget > 1:
            self.budget = f"{self.budget}B"  # a byte count, in the form budgets are parsed from
        self.max_length = max_length
        self.margin = margin
        self.budget_note: str | None = None
        self.log_path = Path(log_path) if log_path is not None else None
        self.tuner_kwargs = tuner_kwargs
        self.tuner: Tuner | None = None
        self._hook = None
        self._losses: list[tuple[torch.Tensor, bool, float]] = []  # (loss, normalized, weight)
        self._in_step = False  # between begin_step and after_backward: forward losses are read
        self._step_open = False  # between begin_step and end_step
        self._backward_done = False
        self._warned_clip = False
        self._scaler = None
        # this step's micro-batches so far, each as the pieces it ran as (DynatuneTrainer replays them)
        self.step_inputs: list[list] = []
        # the step's training inputs, kept only at steps whose method runs its own forwards on them
        self._keep_inputs = False
        self._inputs: list[dict] = []
        # set by DynatuneTrainer under several processes: it keeps the Trainer from wrapping the model
        # in DDP, so the engine sums the plan's gradients over ranks itself (docs/distributed.md)
        self.reduces_gradients = False
        # set by DynatuneTrainer(strategy=...): ddp (replicas; the engine reduces) or fsdp (FSDP2 shards)
        self.strategy = "ddp"
        self._tokens_global = True  # the Trainer counts num_items_in_batch over every rank

    # -- the Trainer's events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise DynatuneError("DynatuneCallback needs the Trainer's model and optimizer at train begin; "
                                "pass it to a transformers.Trainer through callbacks=[...].")
        # what some methods learn from the training loop (gradselect, adagradselect): backward passes
        # per optimizer step, and optimizer steps per epoch
        n = len(train_dataloader) if train_dataloader is not None else 0
        self.method.configure_loop(args.gradient_accumulation_steps,
                                   max(1, math.ceil(n / args.gradient_accumulation_steps)) if n else 0)
        # the schedule's shape, for methods with clocks of their own (dynalora's local optimisation)
        self.method.configure_schedule(state.max_steps, args.get_warmup_steps(state.max_steps))
        # fp16: accelerate's optimizer wrapper holds the loss scaler backward runs under
        self._scaler = getattr(optimizer, "scaler", None)
        self._tokens_global = bool(getattr(args, "average_tokens_across_devices", True))
        inner = optimizer  # accelerate's wrapper (maybe nested) shares state and groups with the torch one
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if self._step_open:  # a step raised (e.g. auto_find_batch_size retries after out of memory)
            self.tuner.abort_step()
            self._step_open = self._in_step = False
        if self.tuner is None or self.tuner.model is not model or self.tuner.optimizer is not inner:
            _check_checkpointing(args, self.budget)
            self._build(model, inner, lr_scheduler)
            if self.budget is not None:
                self._install_budget(args, model, train_dataloader)
            if state.global_step > 0:  # the Trainer resumed from a checkpoint: so does the engine
                self._resume(args, state)
        if self._hook is None:
            self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)
        _run_before_reporters(self, inspect.currentframe())

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The last step's record (plan, counted and predicted bytes, the method's fields) joins the
        Trainer's training logs as dynatune/... scalars, so its report_to loggers (TensorBoard,
        wandb, ...) chart them next to the loss."""
        if logs is None or "loss" not in logs or self.tuner is None or not self.tuner.history:
            return
        if not _reports(args):
            return  # nothing charts them; the console's log lines stay as the Trainer prints them
        skip = ("train/loss", "train/lr", "train/epoch")
        logs.update({f"dynatune/{k}": v for k, v in step_scalars(self.tuner.history[-1]).items() if k not in skip})

    def on_step_begin(self, args, state, control, **kwargs):
        self.tuner.begin_step()
        self._losses = []
        self.step_inputs = []
        self._inputs = []
        self._keep_inputs = self.tuner.wants_extra_forwards()
        self._backward_done = False
        self._step_open = True
        self._in_step = True  # set after begin_step: a method's own probe forward is not a training loss

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._backward_done:  # DynatuneTrainer ran it before clipping
            return
        clipped = bool(args.max_grad_norm and args.max_grad_norm > 0)
        held = self._probes_holding_grads() if clipped and not self._warned_clip else set()
        self.after_backward()
        if held - self.tuner.promoted and not self._warned_clip:
            warnings.warn("the Trainer clipped gradients before dynatune freed the probed ones, so they counted "
                          "in the clip norm; use dynatune.integrations.hf.DynatuneTrainer to match the plain loop.",
                          stacklevel=2)
            self._warned_clip = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tuner.after_optimizer_step()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self._in_step = self._step_open = False
        if self._keep_inputs and self._inputs:  # the Trainer has zeroed the gradients by now
            inputs, self._inputs = self._inputs, []
            self.tuner.extra_forwards(lambda: self._forward_loss(inputs, args))
        entry = self.tuner.end_step(self._step_loss())
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            entry["lr"] = lr_scheduler.get_last_lr()[0]
        entry["epoch"] = max(0, math.ceil(state.epoch or 0) - 1)  # state.epoch is e + (batches done)/len
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self._losses = []

    def on_save(self, args, state, control, model=None, **kwargs):
        """The Trainer has written checkpoint-N: add the engine's state, and the whole model when an
        exit has cut blocks off (the Trainer saved only the blocks that run)."""
        if self.tuner is None:
            return
        self.tuner.fold_rank_statistics()  # every rank: the state rank 0 writes holds every rank's share
        sharded = self.tuner.shards_gradients
        if not (args.should_save or sharded):
            return
        tuner_state = self.tuner.state_dict()  # FSDP2: every rank takes part in gathering the optimizer state
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise DynatuneError(f"the Trainer's checkpoint {folder} is not where dynatune expects it "
                                "(output_dir/checkpoint-<step>); hyper-parameter search runs are not supported.")
        if self.tuner.plan is not None and self.tuner.plan.exit_depth is not None and not sharded:
            with self.tuner.all_blocks() as full:  # (under FSDP2 DynatuneTrainer.save_model saved every block)
                full.save_pretrained(folder)
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save({"tuner": tuner_state, "global_step": state.global_step}, tmp)
        tmp.replace(folder / STATE_FILE)  # atomic: a kill mid-write leaves no half file under the name

    def on_train_end(self, args, state, control, **kwargs):
        """Remove the loss hook. The engine's hooks stay, as after `fit`; `callback.tuner.close_hooks()`
        removes them (do it before saving a model that exited early, as `dynatune.loop.train` does)."""
        self._in_step = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        best = getattr(state, "best_model_checkpoint", None)
        if args.load_best_model_at_end and best and self.tuner is not None:
            self._load_best(Path(best))

    def _load_best(self, folder: Path) -> None:
        """load_best_model_at_end: the Trainer has loaded the best checkpoint's weights; the engine
        takes that checkpoint's state too (plan and exit, method state, optimizer state), as resuming
        from it would, so the model, its plan and a save agree. The history keeps every step run.
        With an exit at the end or at the best step, the Trainer loaded only the blocks running at
        the end: every block is loaded again from the checkpoint."""
        path = folder / STATE_FILE
        if not path.is_file():
            raise DynatuneError(f"the Trainer loaded its best checkpoint {folder}, which holds no {STATE_FILE}, so "
                                "dynatune cannot restore the plan that goes with those weights; use checkpoints a "
                                "DynatuneCallback run saved.")
        t = self.tuner
        history, peak = t.history, t.peak
        end_exit = t.plan.exit_depth if t.plan is not None else None
        t.load_state_dict(torch.load(path, weights_only=False)["tuner"])
        t.history, t.peak = history, peak
        if not t.shards_gradients and (end_exit is not None or (t.plan is not None and t.plan.exit_depth is not None)):
            weights = checkpoint_weights(folder, "to load every block from after an early exit")
            with t.all_blocks() as full:
                full.load_state_dict(weights, strict=False)
        logger.warning("dynatune: loaded the engine's state of the best checkpoint %s with its weights.", folder)

    # -- helpers ----------------------------------------------------------------------------------
    def after_backward(self) -> None:
        """Signals read the step's gradients; probed gradients that were not promoted are freed."""
        self._in_step = False
        if not self._backward_done:
            if self._scaler is not None:  # gradient signals were read on the scaled loss
                self.tuner.grad_scale = float(self._scaler.get_scale())
            self.tuner.after_backward()
            self._backward_done = True

    def _probes_holding_grads(self) -> set[str]:
        """Probed units that still hold a gradient (a method may free some during backward)."""
        t = self.tuner
        return {u for u in t.plan.probe_params if any(t.params[p].grad is not None for p in t.units[u].param_names)}

    def _build(self, model, optimizer, lr_scheduler) -> None:
        if self.tuner is not None:  # a new Trainer (or optimizer) for the same callback: start over
            self.tuner.close()
            self.tuner = None
        self.method.check_model(model)  # before anything trains, also when prepare() was skipped
        from ..distributed import current
        sync = current(self.strategy)
        if sync is not None and not self.reduces_gradients:
            # a stock Trainer wraps the model in DDP over a fixed parameter set, which plans change
            raise DynatuneError("under several processes a stock Trainer wraps the model in DDP over a fixed "
                                "parameter set, which dynatune's plans change; use "
                                "dynatune.integrations.hf.DynatuneTrainer, which lets dynatune sum the plan's "
                                "gradients over ranks instead (docs/distributed.md).")
        names = {n for n, _ in model.named_parameters()}
        n_groups = len(optimizer.param_groups)
        tuner = Tuner(model, self.method, optimizer=optimizer, sync=sync, **self.tuner_kwargs)
        if tuner.model is not model or set(tuner.params) != names:
            tuner.close()
            raise DynatuneError(f"method '{self.method.name}' changes the model (adapters) after the Trainer built "
                                "its optimizer; call dynatune.integrations.hf.prepare(model, method) before creating "
                                "the Trainer and give the Trainer the model it returns.")
        added = len(optimizer.param_groups) - n_groups
        if added and lr_scheduler is not None:
            _extend_scheduler(lr_scheduler, optimizer, added)
        self.tuner = tuner

    def _install_budget(self, args, model, train_dataloader) -> None:
        params = [p for p in model.parameters() if p.is_floating_point()]
        precision = ("bf16" if params and all(p.dtype == torch.bfloat16 for p in params)
                     else "amp-bf16" if args.bf16 else "amp-fp16" if args.fp16 else "fp32")
        if self.max_length is not None:
            seq, where = int(self.max_length), "max_length"
        else:
            seq, n = _longest_example(train_dataloader)
            where = f"the longest of the {n} training examples; pass max_length= to price another length"
        batch = args.per_device_train_batch_size
        mm = install_budget(self.tuner, self.budget, batch_shape=(batch, seq), precision=precision,
                            margin=self.margin, grad_accum=args.gradient_accumulation_steps,
                            device_type=self.tuner.device.type,
                            gradient_checkpointing=checkpointing_on(args),
                            **({"world_size": self.tuner.sync.world, "strategy": self.tuner.sync.strategy}
                               if self.tuner.sync else {}))
        self.budget_note = (f"budget {self.budget} = {self.tuner.budget_bytes} bytes, priced at batch {batch} x "
                            f"{seq} tokens ({where}), {precision}, gradient accumulation "
                            f"{args.gradient_accumulation_steps}")
        logger.warning("dynatune: %s", self.budget_note)
        # the Trainer's evaluation runs while the optimizer state is resident: it must fit as well
        fits = self.tuner.eval_batch_that_fits(args.per_device_eval_batch_size, seq)
        if fits < args.per_device_eval_batch_size:
            logger.warning("dynatune: per_device_eval_batch_size=%d is predicted above the budget; evaluating in "
                           "batches of %d.", args.per_device_eval_batch_size, fits)
            args.per_device_eval_batch_size = fits
        return mm

    def _resume(self, args, state) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / STATE_FILE
        if not path.is_file():
            raise DynatuneError(f"the Trainer resumed at step {state.global_step}, but {path} does not exist, so "
                                "dynatune cannot resume its plans and optimizer state exactly; resume from a "
                                "checkpoint a DynatuneCallback run saved in this output_dir.")
        saved = torch.load(path, weights_only=False)
        if saved["global_step"] != state.global_step:
            raise DynatuneError(f"{path} was saved at step {saved['global_step']}, not {state.global_step}.")
        self.tuner.load_state_dict(saved["tuner"])

    def _forward_loss(self, inputs: list[dict], args) -> torch.Tensor:
        """The step's loss by forward alone (Tuner.extra_forwards sets no_grad, eval mode and the RNG
        fork): each micro-batch's mean loss, weighted by its examples, under the Trainer's autocast."""
        from ..precision import autocast_for
        total, n = 0.0, sum(n_examples(kw) or 1 for kw in inputs)
        model = self.tuner.model
        for kw in inputs:
            with autocast_for("amp-bf16" if args.bf16 else "fp32", self.tuner.device.type):
                out = model(**kw)
            loss = out["loss"] if isinstance(out, dict) else out.loss
            total = total + loss.float() * ((n_examples(kw) or 1) / n)
        return total  # this rank's mean: a method agrees it over ranks (IST averages its candidates' losses)

    def _ranks(self) -> int:
        return self.tuner.sync.world if self.tuner is not None and self.tuner.sync is not None else 1

    def _read_loss(self, module, args, kwargs, output):
        if not (self._in_step and module.training):
            return None
        if self._keep_inputs:  # a method's own forwards run on them after the optimizer step
            self._inputs.append({k: v for k, v in kwargs.items() if k != "num_items_in_batch"})
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            # a copy: under several processes the Trainer scales the output's loss in place afterwards
            self._losses.append((loss.detach().clone(), kwargs.get("num_items_in_batch") is not None, 1.0))
        else:
            self._losses.append((None, False, 1.0))
        return None  # the output is left untouched

    def _step_loss(self) -> float | None:
        if not self._losses or any(l is None for l, _, _ in self._losses):
            return None
        normalized = all(n for _, n, _ in self._losses)  # each is already a share of the step's loss
        # the engine sums the step's loss over ranks: a rank's mean counts as its share of the global batch
        if normalized:
            share = 1 if self._tokens_global else self._ranks()  # num_items_in_batch counted over every rank
            return sum(l.float().item() for l, _, _ in self._losses) / share
        # a mean over micro-batches; a micro-batch retried in pieces (DynatuneTrainer) weighs them by size
        return sum(l.float().item() * w for l, _, w in self._losses) / sum(w for _, _, w in self._losses) / self._ranks()


def _longest_example(train_dataloader) -> tuple[int, int]:
    """(longest input_ids, number of examples) of the Trainer's training set, to price a budget."""
    data = getattr(train_dataloader, "dataset", None)
    try:
        if hasattr(data, "column_names"):  # a datasets.Dataset: read the column, not every row
            lengths = [len(x) for x in data["input_ids"]]
        else:
            lengths = [int(torch.as_tensor(data[i]["input_ids"]).shape[-1]) for i in range(len(data))]
    except (TypeError, KeyError, IndexError):
        lengths = []
    if not lengths:
        raise DynatuneError("DynatuneCallback cannot see the training examples' input_ids to price the budget; "
                            "pass DynatuneCallback(method, budget=..., max_length=<longest sequence>).")
    return max(lengths), len(lengths)


def _reports(args) -> bool:
    r = getattr(args, "report_to", None)
    names = [r] if isinstance(r, str) else list(r or [])
    return any(n not in ("none", None) for n in names)


def _run_before_reporters(callback, frame) -> None:
    """Move `callback` ahead of the Trainer's report_to callbacks in its callback list.

    The Trainer puts its reporting callbacks before the user's, and each sees the same `logs` dict
    in turn, so scalars added in on_log reach them only from a callback that runs first. The
    Trainer's callback handler is the caller of on_train_begin (CallbackHandler.call_event)."""
    from transformers.trainer_callback import CallbackHandler
    try:
        from transformers.integrations import INTEGRATION_TO_CALLBACK
    except ImportError:
        return
    caller = frame.f_back if frame is not None else None
    handler = caller.f_locals.get("self") if caller is not None else None
    if not isinstance(handler, CallbackHandler) or callback not in handler.callbacks:
        return
    reporters = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if isinstance(c, type))
    cbs = handler.callbacks
    first = next((i for i, c in enumerate(cbs) if isinstance(c, reporters)), None)
    if first is not None and cbs.index(callback) > first:
        cbs.remove(callback)
        cbs.insert(first, callback)


def checkpointing_on(args) -> bool:
    """Whether the Trainer checkpoints activations (activation_checkpointing, or its older name)."""
    if hasattr(args, "activation_checkpointing"):
        return bool(args.activation_checkpointing)
    return bool(getattr(args, "gradient_checkpointing", False))


def _check_checkpointing(args, budget) -> None:
    """The Trainer's activation checkpointing must be what dynatune runs and prices: non-reentrant,
    every block. (The Trainer also turns on enable_input_require_grads; the Tuner turns it off.)"""
    if not checkpointing_on(args):
        return
    kw = dict((args.activation_checkpointing_kwargs if hasattr(args, "activation_checkpointing_kwargs")
               else getattr(args, "gradient_checkpointing_kwargs", None)) or {})
    if kw.get("use_reentrant", False):
        raise DynatuneError("reentrant checkpointing (use_reentrant=True) gives the weights of a block whose input "
                            "needs no gradient no gradient at all, so dynatune's frozen bottom blocks would break "
                            "training; drop use_reentrant from gradient_checkpointing_kwargs (False is the default).")
    if budget is not None and (kw.get("every_n_layers", 1) != 1 or kw.get("offload", False)):
        raise DynatuneError("the memory model prices checkpointing of every block on the device, so a budget cannot "
                            "be held with every_n_layers or offload in gradient_checkpointing_kwargs; drop them, or "
                            "the budget.")


def _extend_scheduler(scheduler, optimizer, added: int) -> None:
    """Make a scheduler built before the engine added param groups drive those groups too."""
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is None:
        raise DynatuneError(f"the learning-rate scheduler {type(scheduler).__name__} cannot follow the parameter "
                            "groups dynatune added; call prepare(model, method) before creating the Trainer.")
    for group in optimizer.param_groups[-added:]:
        group.setdefault("initial_lr", group["lr"])
        base_lrs.append(group["initial_lr"])
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR / MultiplicativeLR: one function per group
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(group["lr"])


class DynatuneTrainer(Trainer):
    """A Trainer that frees probed gradients before it clips, as the plain loop does, and survives
    running out of device memory.

    Clipping: only needed for methods whose plans carry `probe_params` when `max_grad_norm > 0`. It
    overrides the Trainer's private `_clip_grad_norm` (transformers 5); tests/test_hf.py pins that
    it still runs.

    Out of memory (torch.OutOfMemoryError, CUDA's included) in `training_step`: the tuner undoes the
    step (`retry_step`: no gradients, signals reset, global RNG back to the step's start, the plan
    kept and the method not asked again); the step's earlier micro-batches run again as they ran
    (same dropout masks, so the same gradients) and the failed one runs as pieces of half its
    examples, halving again on each failure down to one example. Each piece is the Trainer's own
    `training_step` on a slice of the inputs: a loss normalized by `num_items_in_batch` is summed over
    the pieces unchanged; a mean loss is weighted by the piece's share of the examples. This is how
    the Trainer treats micro-batches under gradient accumulation, so the step equals a run that
    split that micro-batch by accumulation from the start (a model that accepts `num_items_in_batch`
    but ignores it, BERT classifiers, gets the Trainer's sum of piece means, as it would there).
    Nothing is counted twice: the Trainer adds the returned loss, flops and tokens once per
    micro-batch. Limits: one process (under several, a rank out of memory stops the run); inputs are
    split on their first dimension; out of memory in the optimizer step is not retried. On CUDA the
    memory model, if the tuner has one, is recalibrated with the retried step's measured peak.

    Several processes (torchrun, accelerate launch): the Trainer would wrap the model in DDP, whose
    reducer fixes its parameter set when it is built; plans change that set. DynatuneTrainer asks
    accelerate to prepare the model without the DDP wrapper, and the engine sums the plan's
    gradients over ranks after the step's last backward, as in `dynatune train` (docs/distributed.md).
    Each rank's loss is divided by the number of ranks for backward, so the sum is DDP's average;
    the loss the Trainer logs is the one it logs under DDP. No out-of-memory retry there.
    """

    def __init__(self, *args, strategy: str = "ddp", **kwargs):
        super().__init__(*args, **kwargs)
        from ..distributed import STRATEGIES, current, destroy_at_exit
        if strategy not in STRATEGIES:
            raise DynatuneError(f"DynatuneTrainer(strategy={strategy!r}): use 'ddp' or 'fsdp'.")
        cb = self._dynatune_callback()
        if cb is not None and getattr(self, "is_fsdp_enabled", False):
            raise DynatuneError("DynatuneTrainer does not run under the Trainer's own FSDP (its wrapping fixes "
                                "which parameters train); drop the fsdp arguments and pass strategy='fsdp' to "
                                "DynatuneTrainer, which shards with FSDP2 itself (docs/distributed.md).")
        self.strategy = strategy
        if cb is not None:
            cb.strategy = strategy
        if (cb is not None and strategy == "fsdp" and self.args.load_best_model_at_end and current() is not None
                and _is_peft_model(self.model)):
            raise DynatuneError("DynatuneTrainer(strategy='fsdp') does not load the best checkpoint of a peft model "
                                "at the end yet (load_best_model_at_end=True: its checkpoints hold the adapter "
                                "under peft's names); use strategy='ddp', or `dynatune train strategy=fsdp "
                                "load_best=true`.")
        if cb is not None and current() is not None:
            cb.reduces_gradients = True
            destroy_at_exit()  # accelerate set the group up and leaves it to the interpreter's exit
            prepare_model = self.accelerator.prepare_model

            def without_ddp(model, device_placement=None, evaluation_mode=False):
                # accelerate's evaluation mode places the model and sets up autocast, without DDP
                return prepare_model(model, device_placement=device_placement, evaluation_mode=True)
            self.accelerator.prepare_model = without_ddp

    def _dynatune_callback(self):
        return next((c for c in self.callback_handler.callbacks if isinstance(c, DynatuneCallback)), None)

    def _ranks(self) -> int:
        cb = self._dynatune_callback()
        return cb._ranks() if cb is not None else 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        world = self._ranks()
        if world == 1 or not model.training:
            return out
        # the engine sums gradients over ranks where DDP averages them
        return (out[0] / world, *out[1:]) if return_outputs else out / world

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; for a method with per-unit learning rates (dynalora's local
        optimisation) each unit's parameters get groups of their own, with the Trainer's
        hyperparameters. Made the same way on resume, so the Trainer's saved optimizer loads."""
        fresh = self.optimizer is None
        cb = self._dynatune_callback()
        if fresh and cb is not None:
            self._shard(self.model if model is None else model, cb)
        optimizer = super().create_optimizer(model)
        if fresh and cb is not None and cb.method.per_unit_lr:
            target = self.model if model is None else model
            params = dict(target.named_parameters())
            units = partition(target, cb.method.granularity, cb.tuner_kwargs.get("layers"))
            split_into_unit_groups(optimizer, {u.name: [params[p] for p in u.param_names] for u in units})
        return optimizer

    def _sharded(self) -> bool:
        cb = self._dynatune_callback()
        return cb is not None and cb.tuner is not None and cb.tuner.shards_gradients

    def _shard(self, model, cb) -> None:
        """strategy='fsdp' under several processes: FSDP2 on every block and the root, before the
        Trainer's optimizer is made over the parameters (which become DTensor shards), after every
        rank took rank 0's weights. The engine finds the model sharded and leaves it so."""
        from ..distributed import current
        sync = current(self.strategy)
        if sync is not None and sync.strategy == "fsdp":
            sync.take_model(model, partition(model, cb.method.granularity, cb.tuner_kwargs.get("layers")), cb.method)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP2 every rank gathers the weights whole (every block, also after an exit) and rank 0
        saves them as the Trainer saves a model; otherwise the Trainer's own save_model."""
        if not self._sharded():
            return super().save_model(output_dir, _internal_call)
        from ..distributed import full_tensor
        tuner = self._dynatune_callback().tuner
        with tuner.all_blocks() as full:
            whole = {k: full_tensor(v).detach().cpu() for k, v in full.state_dict().items()}
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=whole)

    def _load_best_model(self) -> None:
        """load_best_model_at_end under FSDP2: each rank takes its shard of the best checkpoint's whole
        weights (every block, also after an exit); the callback then restores that checkpoint's
        engine state, as in one process."""
        if not self._sharded():
            return super()._load_best_model()
        from ..distributed import shard_like
        weights = checkpoint_weights(Path(self.state.best_model_checkpoint), "to load")
        tuner = self._dynatune_callback().tuner
        tuner.sync.reshard(tuner.model)  # the sharded parameters, not a gathered copy, are what trains and saves
        with torch.no_grad(), tuner.all_blocks() as full:
            for name, t in [*full.named_parameters(), *full.named_buffers()]:
                if name in weights:
                    t.copy_(shard_like(weights[name].to(t.dtype), t))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP2 the optimizer state goes whole into the engine's dynatune_state.pt (gathered by
        every rank); the Trainer writes the scheduler alone."""
        if not self._sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Under FSDP2 the scheduler alone; the engine restores the optimizer state at train begin,
        each rank taking its shard of the whole state."""
        if checkpoint is None or self.strategy != "fsdp" or self._dynatune_callback() is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from ..distributed import current
        if current() is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = Path(checkpoint) / SCHEDULER_FILE
        if path.is_file():
            self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))

    def _clip_grad_norm(self, model):
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, DynatuneCallback) and cb.tuner is not None:
                cb.after_backward()
        return super()._clip_grad_norm(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        cb = self._dynatune_callback()
        if cb is None or cb.tuner is None or not cb._step_open:
            return super().training_step(model, inputs, num_items_in_batch)
        sync = cb.tuner.sync
        if sync is not None:
            # gradients read during backward are summed over ranks in hooks, on the step's last backward
            sync.final_backward = len(cb.step_inputs) + 1 >= int(self.current_gradient_accumulation_steps)
            cb.step_inputs.append([inputs])
            # the Trainer adds up and logs the returned loss: the one it would log under DDP
            return super().training_step(model, inputs, num_items_in_batch) * sync.world
        earlier = cb.step_inputs  # this step's micro-batches so far, as the pieces they ran as
        pieces, size, retried = [inputs], n_examples(inputs), False
        while True:
            try:
                if retried:
                    for done in earlier:
                        self._run_pieces(cb, model, done, num_items_in_batch)
                loss = self._run_pieces(cb, model, pieces, num_items_in_batch)
                break
            except torch.OutOfMemoryError as err:
                if size is None or size <= 1:
                    cb.tuner.abort_step()
                    if self.args.auto_find_batch_size:
                        raise  # the Trainer restarts with a smaller batch
                    raise DynatuneError(
                        f"out of device memory at step {cb.tuner.step} even with micro-batches of "
                        f"{'one example' if size else 'the inputs as given (they cannot be split)'} "
                        f"({cb.tuner.oom_retries} retries): lower max_length, the budget, or per_device_train_batch_size "
                        "and raise gradient_accumulation_steps.") from err
            # outside the except clause: the failed attempt's graph (held by the traceback) is freed by now
            size, retried = (size + 1) // 2, True
            pieces = split_batch(inputs, size)
            cb._losses, cb._backward_done, cb._in_step, cb._inputs = [], False, True, []
            later = max(0, int(self.current_gradient_accumulation_steps) - len(earlier) - 1)  # still to come
            cb.tuner.retry_step(sum(len(d) for d in earlier) + len(pieces) + later, largest_shape(pieces))
            logger.warning("step %d: out of device memory; retrying with the micro-batch of %d examples as %d pieces "
                           "(retry %d)", cb.tuner.step, n_examples(inputs), len(pieces), cb.tuner.oom_retries)
        earlier.append(pieces)
        return loss

    def _run_pieces(self, cb, model, pieces, num_items_in_batch):
        """The Trainer's training_step on each piece of one micro-batch; the summed (scaled) loss."""
        if len(pieces) == 1:
            return super().training_step(model, pieces[0], num_items_in_batch)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as Trainer.training_step decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        n = sum(n_examples(p) for p in pieces)
        ga = self.current_gradient_accumulation_steps
        first = len(cb._losses)
        total = None
        try:
            for piece in pieces:
                if not scaled:  # a mean loss: weight the piece by its share of the micro-batch's examples
                    self.current_gradient_accumulation_steps = ga * n / n_examples(piece)
                loss = super().training_step(model, piece, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self.current_gradient_accumulation_steps = ga
        read = cb._losses[first:]
        if not scaled and len(read) == len(pieces):
            # the callback's step loss averages micro-batches: the pieces count as their micro-batch
            cb._losses[first:] = [(l, nz, n_examples(p) / n) for (l, nz, _), p in zip(read, pieces)]
        return total


def checkpoint_weights(folder: Path, purpose: str) -> dict:
    """Every tensor of a Trainer checkpoint's model*.safetensors, whole, by name; one sentence when there
    are none."""
    from safetensors.torch import load_file
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise DynatuneError(f"the best checkpoint {folder} has no model*.safetensors {purpose}; save with "
                            "save_safetensors=True.")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _is_peft_model(model) -> bool:
    """A peft PeftModel (whose checkpoints hold its adapter under peft's names), not adapters injected
    into a transformers model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


SCHEDULER_FILE = "scheduler.pt"  # the Trainer's name for its scheduler's state in a checkpoint

__all__ = ["DynatuneCallback", "DynatuneTrainer", "prepare"]
