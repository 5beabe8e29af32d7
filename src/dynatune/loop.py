"""The training loop: one function you can read top to bottom.

`train(cfg)` builds the model, task and method from a config and calls `fit`, which runs the
engine's per-step contract (engine.py) around a plain PyTorch step. Everything a run produces
lands in `output_dir`: log.jsonl (one record per step), metrics.json, plots, checkpoints and the
model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import checkpoint, distributed
from .batching import largest_shape, split_batches
from .checkpoint import LoopState
from .config import method_config, run_budget, run_dir, to_dict
from .data.metrics import evaluate, improves
from .data.tasks import load_task, task_kind
from .engine import Tuner
from .errors import DynatuneError
from .files import usual_permissions
from .losses import chunked_causal_lm_loss
from .memory import MemoryModel, install_budget, largest_prediction
from .methods import METHODS, build_method
from .models import load_model
from .optim import linear_factor
from .plan_mechanics import enable_checkpointing
from .precision import autocast_for, check_device, grad_scaler
from .report import plot_run
from .tracking import open_trackers

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak rate, then linear decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_factor(step, warmup_steps, total_steps))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a function of (seed, epoch) alone, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def move(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def fit(model, method, train_set: Dataset, collate, cfg, out_dir: Path | None = None, evaluate=None,
        state: LoopState | None = None, tuner: Tuner | None = None, on_step=None) -> tuple[Tuner, LoopState]:
    """Train `model` with `method` on `train_set`; returns the tuner (plans, memory) and loop state.

    cfg needs: batch_size, grad_accum, epochs, max_steps, lr, weight_decay, warmup_ratio,
    grad_clip, precision, seed, log_every, checkpoint_every, keep_checkpoints, progress.
    `evaluate(model, epoch)` (a dict of metrics) is called at the end of each epoch when given, and
    every `cfg.eval_steps` steps; each evaluation updates the best one (`cfg.metric_for_best`, by
    default the first metric evaluate returns), early stopping and, with `cfg.load_best`, the
    best weights in checkpoints/best (see `_after_eval`).
    """
    device = next(model.parameters()).device
    micro = cfg.batch_size // cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    if steps_per_epoch == 0:
        raise DynatuneError("the training set is empty; give data.train a file with at least one example.")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    # methods that count backward passes or schedule by epoch learn the loop's shape here
    method.configure_loop(cfg.grad_accum, steps_per_epoch)
    method.configure_schedule(total, int(cfg.warmup_ratio * total))

    if tuner is None:
        run_calibration(model, method, train_set, collate, cfg, device)
        tuner = make_tuner(model, method, cfg, device)
    model = tuner.model
    # data parallelism (distributed.py): batch_size is the global batch, each rank trains on its share,
    # only rank 0 writes the run directory, and evaluations are rank 0's, broadcast
    sync = tuner.sync
    writes = out_dir is not None  # the same on every rank: checkpoints gather every rank's RNG
    if sync is not None:
        sync.check_batches(cfg.batch_size, cfg.grad_accum, len(train_set))
        micro = micro_batch(cfg, sync)
        out_dir = out_dir if sync.is_main else None
        if evaluate is not None:
            evaluate = _agreed_evaluation(evaluate, sync)
    scheduler = linear_schedule(tuner.optimizer, int(cfg.warmup_ratio * total), total)
    state = state or LoopState()
    if getattr(cfg, "resume", None):
        state = checkpoint.load(cfg.resume, tuner, scheduler, rank=sync.rank if sync else 0)
        if out_dir:
            checkpoint.keep_log_until(out_dir / "log.jsonl", state.step)
    scaler = grad_scaler(cfg.precision, device.type)  # amp-fp16 only
    if scaler is not None and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)

    stop = min(total, cfg.stop_after) if getattr(cfg, "stop_after", -1) > 0 else total
    # a resumed run appends to its log (cut back to its checkpoint); a fresh run in a reused directory starts a new one
    log = open(out_dir / "log.jsonl", "a" if getattr(cfg, "resume", None) else "w") if out_dir else None
    if out_dir:  # every unit of the run, frozen ones too (units.png draws them all)
        (out_dir / "units.json").write_text(json.dumps([{"name": u.name, "kind": u.kind, "depth": u.depth}
                                                        for u in tuner.units]))
    bar = _progress(total, state.step, cfg.progress)
    # report_to: the step records and evaluations also go to TensorBoard / wandb (tracking.py)
    trackers = open_trackers(getattr(cfg, "report_to", "none"), out_dir, out_dir.name if out_dir else "",
                             _plain_config(cfg))
    model.train()
    eval_steps = getattr(cfg, "eval_steps", 0)
    try:
        # a run that stopped early stays stopped when resumed
        while state.step < stop and state.stopped_early_at_step is None:
            order = epoch_order(len(train_set), cfg.seed, state.epoch)
            starts = range(state.batch_in_epoch * cfg.batch_size, len(order), cfg.batch_size)
            for start in starts:
                if state.step >= stop or state.stopped_early_at_step is not None:
                    break
                idx = order[start:start + cfg.batch_size]
                batches = batcher(train_set, sync.shard(idx) if sync else idx, collate)
                # a data-parallel rank weights its losses by its share of the global batch
                loss = train_step(tuner, model, batches(micro), cfg, device, rebatch=batches, scaler=scaler,
                                  **({"n_global": len(idx)} if sync else {}))
                if scaler is not None:  # into every checkpoint, so a resumed run scales as this one would
                    state.grad_scaler = scaler.state_dict()
                scheduler.step()
                state.step += 1
                state.batch_in_epoch += 1
                entry = tuner.end_step(loss)
                entry["lr"] = scheduler.get_last_lr()[0]
                entry["epoch"] = state.epoch
                if log and state.step % cfg.log_every == 0:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                if trackers and state.step % cfg.log_every == 0:
                    trackers.log_step(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step:
                    on_step(tuner, state)
                # before the checkpoint, so that it holds this evaluation's best and patience
                if evaluate is not None and eval_steps and state.step % eval_steps == 0:
                    _after_eval(evaluate(model, state.epoch), model, tuner, state, cfg, out_dir, trackers, writes)
                if writes and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    _save(out_dir, tuner, scheduler, state, cfg)
            else:  # the epoch ran to its end
                evaluated = state.evals and state.evals[-1]["step"] == state.step  # by eval_steps just now
                if evaluate is not None and getattr(cfg, "eval_each_epoch", True) and not evaluated:
                    _after_eval(evaluate(model, state.epoch), model, tuner, state, cfg, out_dir, trackers, writes)
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        bar.close()
        if log:
            log.close()
        if trackers:
            trackers.close()
    if writes and (cfg.checkpoint_every or state.step < total):  # stopped early: make it resumable
        _save(out_dir, tuner, scheduler, state, cfg)
    if out_dir:  # the checkpoint's evaluations: a resumed run's file drops those of the steps it redid
        _write_evals(out_dir, state.evals)
    return tuner, state


def _save(out_dir: Path | None, tuner, scheduler, state: LoopState, cfg) -> None:
    """A checkpoint, written by rank 0 alone; every rank's RNG state goes into it (each rank's
    dropout stream is its own), so every rank calls this."""
    sync = tuner.sync
    tuner.fold_rank_statistics()
    rngs = sync.gather_objects(checkpoint.rng_state()) if sync is not None else None
    # FSDP2: every rank takes part in gathering the shards whole; DDP: rank 0 holds them all
    gathered = checkpoint.gather(tuner) if sync is not None and sync.strategy == "fsdp" else None
    if out_dir:
        checkpoint.save(out_dir, tuner, scheduler, state, cfg.keep_checkpoints, rng_ranks=rngs, gathered=gathered)


def _agreed_evaluation(evaluate, sync):
    """Evaluation whose metrics every rank holds, so the best evaluation and early stopping are decided
    alike: rank 0 evaluates alone under DDP (every rank holds the same weights); under FSDP2 every
    rank runs it (each forward gathers the shards) and rank 0's metrics are broadcast."""
    def agreed(model, epoch):
        result = evaluate(model, epoch) if sync.is_main or sync.strategy == "fsdp" else None
        model.train()
        return sync.broadcast_object(result)
    return agreed


def _after_eval(result: dict, model, tuner, state: LoopState, cfg, out_dir: Path | None, trackers=None,
                writes: bool = True) -> None:
    """Record one validation evaluation; update the best one, the best weights and early stopping.
    `writes`: whether the run (rank 0) writes a run directory; under FSDP2 every rank then takes part
    in gathering the best weights whole."""
    model.train()
    if trackers:
        trackers.log_eval(state.step, result)
    metric = getattr(cfg, "metric_for_best", None) or next(iter(result))
    if metric not in result:
        raise DynatuneError(f"metric_for_best={metric} is not among this task's validation metrics "
                            f"({', '.join(result)}); choose one of them.")
    state.evals.append({"epoch": state.epoch, "step": state.step, **result})
    value = result[metric]
    threshold = getattr(cfg, "early_stopping_threshold", 0.0)
    if state.best is None or improves(metric, value, state.best["value"], threshold):
        state.best = {"step": state.step, "metric": metric, "value": value}
        state.bad_evals = 0
        if writes and getattr(cfg, "load_best", False):
            weights = checkpoint.whole_weights(tuner) if tuner.shards_gradients else None  # a collective: every rank
            if out_dir:
                state.best_path = checkpoint.save_best(out_dir, tuner, state.best, weights)
    else:
        state.bad_evals += 1
        patience = getattr(cfg, "early_stopping_patience", 0)
        if patience and state.bad_evals >= patience:
            state.stopped_early_at_step = state.step
            logger.warning("stopping early at step %d: %s has not improved on %g (step %d) in %d evaluations.",
                           state.step, metric, state.best["value"], state.best["step"], state.bad_evals)
    if out_dir:
        _write_evals(out_dir, state.evals)


def _plain_config(cfg) -> dict:
    """The run's settings for a tracker's run page (a RunConfig, or the namespace a caller of fit passes)."""
    try:
        return to_dict(cfg)
    except Exception:  # noqa: BLE001 - not a dataclass config: its plain attributes
        return {k: v for k, v in vars(cfg).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _write_evals(out_dir: Path, evals: list[dict]) -> None:
    """evals.jsonl: one record per validation evaluation, rewritten whole (atomically) from the loop state."""
    tmp = out_dir / ".evals.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in evals))
    os.replace(tmp, out_dir / "evals.jsonl")


def make_tuner(model, method, cfg, device) -> Tuner:
    """The engine for a run: the optimizer over the method's candidates and, with a budget (the
    config's or the method's), the memory model that checks every plan."""
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    check_device(cfg.precision, device.type)  # amp-fp16 needs CUDA: one sentence before anything trains
    if getattr(cfg, "gradient_checkpointing", False):
        enable_checkpointing(model)
    sync = distributed.current(getattr(cfg, "strategy", "ddp"))
    budget = one_budget(getattr(cfg, "budget", None), method, "the run's config")
    tuner = Tuner(model, method, lr=lr, weight_decay=cfg.weight_decay, layers=getattr(cfg, "layers", None),
                  count_memory=getattr(cfg, "count_memory", True), sync=sync)
    if budget is not None:  # a rank's memory: its micro-batches are its share of the global batch
        install_budget(tuner, budget, batch_shape=(micro_batch(cfg, sync), cfg.max_length),
                       precision=cfg.precision, margin=cfg.margin, **memory_model_options(cfg, device))
    return tuner


def run_calibration(model, method, train_set, collate, cfg, device) -> None:
    """The calibration phase (calibration.py), before the tuner exists: the method sees
    `calibration_examples()` training examples (drawn apart from the run's order, the global RNG
    forked), priced under the budget with the largest micro-batch that fits, then prepares its model.
    Nothing is priced unless the method draws examples or asks for the budget."""
    from .calibration import Calibration, block_price, draw, fit_micro_batch, restore
    from .memory import check_margin, full_finetuning_peak, parse_budget, resolve_budget, usable_budget

    want = method.calibration_examples()
    micro = cfg.batch_size // cfg.grad_accum
    seq = getattr(cfg, "max_length", None)
    budget = one_budget(getattr(cfg, "budget", None), method, "the run's config")
    has_budget = budget is not None and seq is not None
    opts = memory_model_options(cfg, device)
    layers = getattr(cfg, "layers", None)
    params = dict(model.named_parameters())
    plain = {}

    def memory_model(m, prepare=None, granularity="adapter"):
        return MemoryModel(m, granularity=granularity, layers=layers, precision=cfg.precision,
                           batch_shape=(micro, seq), prepare=prepare, **opts)

    def plain_model():  # the model as loaded, priced at block granularity (built once, on first use)
        if "mm" not in plain:
            plain["mm"] = memory_model(model, granularity="block")
        return plain["mm"]

    def resolve():
        kind, _ = parse_budget(budget)
        total = resolve_budget(budget, full_finetuning_peak(plain_model()) if kind == "fraction" else None)
        return total, usable_budget(total, check_margin(getattr(cfg, "margin", 0.03)))

    def price(names, m):
        mm = plain_model()
        return block_price(mm, mm.param_bytes([n for n in names if n in params]), m, seq)

    def loss(m, exs):
        batch = move(collate(exs), device)
        with autocast_for(cfg.precision, device.type):
            if getattr(cfg, "chunked_loss", 0):
                return chunked_causal_lm_loss(m, batch, cfg.chunked_loss)
            return m(**batch).loss

    calibration = Calibration([], micro, loss, device, has_budget, resolve if has_budget else None,
                              price if has_budget else None, memory_model if has_budget else None)
    if want > 0:
        calibration.examples = [train_set[i] for i in draw(len(train_set), want, cfg.seed)]
        groups = method.calibration_gradients(model)
        if has_budget and groups:
            biggest = max(groups, key=lambda g: sum(params[n].numel() * params[n].element_size() for n in g))
            calibration.micro_batch = fit_micro_batch(lambda m: price(biggest, m), calibration.usable, micro,
                                                      f"{method.name}'s calibration phase")
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout's RNG: the run draws as if no calibration happened
        model.eval()
        try:
            method.calibrate(model, calibration)
        finally:
            restore(model, was)


def micro_batch(cfg, sync=None) -> int:
    """Examples per forward on one rank: the global batch over ranks and accumulation steps."""
    return cfg.batch_size // (sync.world if sync is not None else 1) // cfg.grad_accum


def one_budget(run_budget, method, where: str):
    """The budget a run uses: the one given with the method (build_method(..., budget=)) or the
    one given at `where`; both is an error, since one of them would be silently ignored."""
    if run_budget is not None and method.budget is not None:
        raise DynatuneError(f"a budget was given both to build_method ({method.budget!r}) and to {where} "
                            f"({run_budget!r}); give it in one place.")
    return run_budget if run_budget is not None else method.budget


def batcher(train_set, idx: list[int], collate):
    """The examples of one step, as `batches(size)`: micro-batches of at most `size`, collated afresh
    (so an out-of-memory retry pads each smaller micro-batch as a run split from the start would)."""
    examples = [train_set[i] for i in idx]
    return lambda size: [collate(examples[j:j + size]) for j in range(0, len(examples), size)]


def train_step(tuner: Tuner, model, micro_batches: list[dict], cfg, device, rebatch=None, scaler=None,
               n_global: int | None = None) -> float:
    """One optimizer step: plan, forward/backward over micro-batches, signals, update.

    Out of device memory (torch.OutOfMemoryError) in forward or backward does not end the run: the
    step is undone (`tuner.retry_step`: gradients, signals and the global RNG go back to the step's
    start; the plan stays, the method is not asked again) and the same examples run again as
    micro-batches of half the size, each weighted by its share of the examples, so the update is
    the one a run that split this batch from the start makes. Micro-batches of one example that
    still do not fit raise DynatuneError. `rebatch(size)` returns the step's examples as
    micro-batches of at most `size` (fit's collates them afresh); without it the given ones are sliced.
    `scaler` (amp-fp16): backward runs on the scaled loss; gradients are unscaled before the
    signals read them and before clipping, and the scaler skips the update when they overflowed.
    `n_global`: the examples of the whole step over every rank of a data-parallel run (each
    micro-batch's loss is weighted by its share of them); by default, those given here.
    """
    tuner.begin_step()
    size = max(len(b["labels"]) for b in micro_batches)
    while True:
        try:
            loss_sum = _forward_backward(model, micro_batches, cfg, device, scaler, n_global, tuner.sync)
            break
        except torch.OutOfMemoryError as err:
            if size <= 1:
                tuner.abort_step()
                raise DynatuneError(
                    f"out of device memory at step {tuner.step} even with micro-batches of one example "
                    f"({tuner.oom_retries} retries): this plan does not fit the device at this sequence length. "
                    "Lower max_length, lower the budget (or give one) so fewer units train, or use "
                    "chunked_loss (causal LM) or precision=amp-bf16; batch_size and grad_accum no longer matter "
                    "here.") from err
        # outside the except clause: the failed attempt's graph (held by the traceback) is freed by now
        size = (size + 1) // 2
        micro_batches = rebatch(size) if rebatch is not None else split_batches(micro_batches, size)
        tuner.retry_step(len(micro_batches), largest_shape(micro_batches))
        logger.warning("step %d: out of device memory; retrying the same %d examples as %d micro-batches of at most %d "
                    "(retry %d)", tuner.step, sum(len(b["labels"]) for b in micro_batches), len(micro_batches),
                    size, tuner.oom_retries)
    if scaler is not None:
        scaler.unscale_(tuner.optimizer)
        tuner.grad_scale = float(scaler.get_scale())
    tuner.after_backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in tuner.params.values() if p.grad is not None], cfg.grad_clip)
    if scaler is not None:
        scaler.step(tuner.optimizer)  # skipped when a gradient is inf/nan; the scale then shrinks
        scaler.update()
    else:
        tuner.optimizer.step()
    tuner.after_optimizer_step()
    tuner.optimizer.zero_grad(set_to_none=True)
    # a method's own no-grad forwards on this step's examples (IST's response suppression), as they ran
    tuner.extra_forwards(lambda: _forward_loss(model, micro_batches, cfg, device))
    return loss_sum


def _forward_backward(model, micro_batches: list[dict], cfg, device, scaler=None, n_global=None, sync=None) -> float:
    n_examples = n_global or sum(len(b["labels"]) for b in micro_batches)
    losses, weights = [], []
    for i, batch in enumerate(micro_batches):
        if sync is not None:  # gradients are reduced on the step's last backward only
            sync.final_backward = i == len(micro_batches) - 1
        # keep only the loss: holding the output would keep the logits alive through backward
        loss = micro_batch_loss(model, batch, cfg, device)
        # weight each micro-batch by its size so accumulation equals one big batch
        weight = len(batch["labels"]) / n_examples
        scaled = loss * weight
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.append(loss.detach())
        weights.append(weight)
    # read back once per step, not between micro-batches (a device sync each); same float sum as before
    return sum(v * w for v, w in zip(torch.stack(losses).tolist(), weights))


def _forward_loss(model, micro_batches: list[dict], cfg, device) -> torch.Tensor:
    """The step's loss by forward alone (the caller sets no_grad): micro-batches weighted by their size."""
    n_examples = sum(len(b["labels"]) for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss = micro_batch_loss(model, batch, cfg, device)
        total = total + loss.float() * (len(batch["labels"]) / n_examples)
    return total


def micro_batch_loss(model, batch: dict, cfg, device) -> torch.Tensor:
    """One micro-batch's loss under the run's autocast (the model's own, or the chunked LM loss)."""
    batch = move(batch, device)
    with autocast_for(cfg.precision, device.type):
        if getattr(cfg, "chunked_loss", 0):
            return chunked_causal_lm_loss(model, batch, cfg.chunked_loss)
        return model(**batch).loss


def memory_model_options(cfg, device) -> dict:
    """How this loop runs, in the memory model's terms."""
    opts = {"grad_accum": cfg.grad_accum, "device_type": device.type,
            "gradient_checkpointing": bool(getattr(cfg, "gradient_checkpointing", False))}
    sync = distributed.current()
    if sync is not None:  # one rank of a data-parallel run: its gradient buckets too
        opts.update(world_size=sync.world, strategy=getattr(cfg, "strategy", "ddp"))
    if getattr(cfg, "chunked_loss", 0):
        opts.update(loss="chunked", chunk_tokens=cfg.chunked_loss)
    return opts


def counted_memory(tuner) -> dict:
    """metrics.json's counted peak; None throughout when the run did not count (count_memory=false)."""
    if not tuner.count_memory:
        return {"counted_peak_bytes": None, "counted_peak_terms": None, "offloaded_bytes": None}
    return {"counted_peak_bytes": tuner.peak.counted, "counted_peak_terms": tuner.peak.to_dict(),
            "offloaded_bytes": tuner.peak.offloaded}


def predicted_memory(tuner, cfg, device) -> dict:
    """metrics.json's predicted bytes for the largest plan the run applied."""
    mm = tuner.memory_model
    if mm is None:
        mm = MemoryModel.from_tuner(tuner, precision=cfg.precision, batch_shape=(micro_batch(cfg, tuner.sync),
                                    cfg.max_length), **memory_model_options(cfg, device))
    # the price each step was admitted at (the method's own where it has one) needs the run's budget model
    price = tuner.predict_peak if tuner.memory_model is not None else None
    out = largest_prediction(mm, tuner.applied_plans, price)
    if tuner.budget_bytes is not None:
        out["budget_bytes"] = tuner.budget_bytes
    return out


def remove_new_entries(out_dir: Path, had: set | None) -> None:
    """Undo what a refused run wrote: the whole directory if it made it, else only what it added."""
    if had is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for entry in set(out_dir.iterdir()) - had:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _progress(total, initial, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def train(cfg) -> dict:
    """Build everything a config names, fit, evaluate, write metrics.json; returns the metrics.

    Launched by torchrun or accelerate launch with several processes, the run is data-parallel
    (distributed.py): every rank trains, rank 0 alone evaluates and writes; other ranks return None.
    """
    sync = distributed.init_from_env(cfg.device)
    main = sync is None or sync.is_main
    seed_everything(cfg.seed)
    check_device(cfg.precision, resolve_device(cfg.device).type)  # before anything loads
    method = build_method(cfg.method, method_config(cfg), cfg.seed)
    # the options as the method resolved them (a preset fills those left unset), so the run's
    # config.json says what ran and two presets never record the same options
    setattr(cfg, cfg.method, method.config)
    cfg.budget = run_budget(cfg.budget, method)  # the method's default budget when none is given
    _, tokenizer = load_model(cfg.model, task_kind(cfg.task), seed=cfg.seed, tokenizer_only=True)
    task = load_task(cfg.task, tokenizer, cfg.data, cfg.max_length)
    device = resolve_device(cfg.device)
    model, tokenizer = _run_model(cfg, task, device)
    if cfg.metric_for_best is not None and cfg.metric_for_best not in task.metric_names:
        raise DynatuneError(f"metric_for_best={cfg.metric_for_best} is not among task {cfg.task}'s validation "
                            f"metrics ({', '.join(task.metric_names)}); choose one of them.")
    run_calibration(model, method, task.train, task.collate, cfg, device)
    tuner = make_tuner(model, method, cfg, device)
    # only now, with model, data, task and budget accepted: a refused run leaves nothing behind
    out_dir = run_dir(cfg)
    had = set(out_dir.iterdir()) if out_dir.is_dir() else None  # a user's own directory: what it held
    if main:  # one writer: ranks writing the same files would corrupt them
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        task.warn_truncated()
    # an evaluation (or generation) must fit the budget too: smaller batches when it would not
    eval_batch = tuner.eval_batch_that_fits(cfg.eval_batch_size, cfg.max_length,
                                            task.max_new_tokens if task.answers is not None else 0)
    warn_eval_batch = eval_batch < cfg.eval_batch_size  # said at the first evaluation, so a run refused
    # at its first plan prints only its refusal

    def eval_split(m, split):
        nonlocal warn_eval_batch
        if warn_eval_batch:
            warn_eval_batch = False
            logger.warning("evaluating in batches of %d: eval_batch_size=%d is predicted above the budget.",
                           eval_batch, cfg.eval_batch_size)
        with autocast_for(cfg.precision, device.type):
            return evaluate(m, task, split, eval_batch, device)

    t0 = time.perf_counter()
    try:
        tuner, state = fit(model, method, task.train, task.collate, cfg, out_dir, tuner=tuner,
                           evaluate=lambda m, epoch: eval_split(m, "validation"))
    except DynatuneError:
        if tuner.step == 0 and not cfg.resume and main:  # refused at its first plan (TriMS's start, gradselect's k)
            remove_new_entries(out_dir, had)
        raise
    train_s = time.perf_counter() - t0
    model = tuner.model
    sharded = tuner.shards_gradients
    if sharded:
        # the trained weights gathered whole (every rank), into an unsharded model that rank 0 evaluates
        # and saves as a single process would
        weights = checkpoint.whole_weights(tuner)
        if main:
            model = _unsharded(cfg, task, weights, device, method)
    if not main:  # rank 0 evaluates and writes what the run produced
        tuner.close_hooks()
        return None
    if cfg.load_best and state.best_path:
        if sharded:  # the best weights, whole, into the unsharded model rank 0 evaluates and saves
            model = _unsharded(cfg, task, checkpoint.read_weights(out_dir / state.best_path), device, method)
        else:
            checkpoint.load_weights(out_dir / state.best_path, tuner)
    best_eval = next((e for e in state.evals if state.best and e["step"] == state.best["step"]), None)
    metrics = {
        "method": cfg.method, "model": cfg.model, "task": cfg.task, "seed": cfg.seed,
        "steps": state.step, "resumed_from_step": state.resumed_from_step, "train_seconds": round(train_s, 2),
        # the evaluation of the weights the run ends with (the best ones with load_best), else the final model's
        "validation": (best_eval if cfg.load_best and best_eval is not None
                       else state.evals[-1] if state.evals and state.evals[-1]["step"] == state.step
                       else eval_split(model, "validation")),
        "test": eval_split(model, "test") if task.test is not None else None,
        "trainable_params": max((tuner.params_in(h["update"]) for h in tuner.history), default=0),
        "total_params": sum(p.numel() for p in tuner.params.values()),
        "final_plan": tuner.plan.to_dict() if tuner.plan else None,
        "final_state": tuner.history[-1].get("method_log") if tuner.history else None,
        "memory": {**counted_memory(tuner), **predicted_memory(tuner, cfg, device)},
        "evals": state.evals,
        "best": state.best,
        "stopped_early_at_step": state.stopped_early_at_step,
        "truncated": task.truncated,
        # what `dynatune eval` needs to reproduce the figures above: the batches they were computed in
        # (the budget may have lowered eval_batch_size) and the class names
        "eval_batch_size": eval_batch,
        "label_names": task.label_names,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # Hooks on parameters are held from C++, out of the garbage collector's reach: left in place they
    # would keep this model, its optimizer and the method alive after train() returns.
    tuner.close_hooks()
    if cfg.save_model:
        method.export(model, out_dir / "model", tokenizer, merged=cfg.save_merged)
        usual_permissions(out_dir / "model")
    try:
        plot_run(out_dir)
    except ImportError:  # no matplotlib: no plots
        pass
    return metrics


def _run_model(cfg, task, device):
    """(model, tokenizer) as the run trains it: the config's model with the task's head, seeded, on
    the device, in bf16 when precision=bf16."""
    model, tokenizer = load_model(cfg.model, task.kind, num_labels=task.num_labels, seed=cfg.seed,
                                  label_names=task.label_names)
    model.to(device)
    if cfg.precision == "bf16":
        model.to(torch.bfloat16)
    return model, tokenizer


def _unsharded(cfg, task, weights: dict, device, method):
    """The run's model rebuilt whole from `weights` (by parameter name): what an FSDP2 run evaluates
    and saves. The method gives it the structure it trained (adapters, row deltas: the same targets,
    rows and seeded projections as the first time)."""
    model, _ = _run_model(cfg, task, device)
    model = method.prepare_model(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied - {n for n, _ in model.named_buffers()}:
        raise DynatuneError(f"the gathered FSDP2 weights do not match {cfg.model}'s parameters "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    return model


def resolve_device(name: str) -> torch.device:
    """The torch device for config's `device`: auto, cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DynatuneError("device=cuda was asked for but no CUDA device is visible; use device=cpu.")
    return torch.device(name)


__all__ = ["fit", "train", "train_step", "LoopState", "METHODS"]
