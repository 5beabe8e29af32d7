"""The engine: the per-step contract shared by the plain loop and the Trainer callback.

    tuner.begin_step()        # method chooses the plan; the plan is applied
    loss = forward(batch); loss.backward()      # the caller's (loop or Trainer)
    tuner.after_backward()    # signals are read, the method may promote probed gradients
    optimizer.step()          # only parameters with a gradient move (AdamW skips grad=None)
    tuner.after_optimizer_step()   # live bytes are counted before gradients are freed
    tuner.end_step(loss)      # method bookkeeping, one log record

A step that runs out of device memory in forward or backward is undone and run again with the
same plan: `tuner.retry_step(micro_batches, batch_shape)` (the loop and DynatuneTrainer call it
with the same examples split into smaller micro-batches; see docs/memory.md, "Out of memory").

Applying a plan is what saves memory: parameters outside it get requires_grad=False (no
gradient, and a frozen linear saves no input for backward), gradients of units that left are
freed, their optimizer state is kept/dropped/offloaded, backward stops at the lowest unit that
needs a gradient (its input does not require grad), and an exit truncates the block list so the
exited blocks neither run nor save anything.
"""
from __future__ import annotations

import logging
import time
import weakref
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .errors import DynatuneError
from .memory import BudgetError, MemoryRecord, SavedTensorCounter, check_margin, grad_bytes, unique_bytes, usable_budget
from .optim import OptimizerStates, ensure_in_optimizer, unit_groups
from .plan import Plan
from .plan_mechanics import (BlockStack, add_plan_hooks, grad_param_names, input_grad_hooks_on,
                             remove_input_grad_hooks, require_grad_only)
from .distributed import agree_signals, local_part
from .signals import SIGNALS, read_signals
from .units import Units, partition

logger = logging.getLogger(__name__)


def capture_rng() -> dict:
    """The global RNG state dropout draws from: torch's CPU generator and, once CUDA is in use, CUDA's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode (dropout off) for a while; each module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


_UNTUNED_GUARDS: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def guard_until_tuned(model: nn.Module) -> None:
    """Make a training forward of `model` fail until a Tuner takes it over.

    integrations.hf.prepare marks every parameter trainable so that the Trainer's optimizer holds
    them all; without the callback the Trainer would then silently run full fine-tuning. The
    guard turns that into one clear error at the first training forward (evaluation under no_grad
    is left alone); Tuner(model, ...) removes it.
    """
    if model in _UNTUNED_GUARDS:
        return

    def refuse(mod, args):
        if mod.training and torch.is_grad_enabled():
            raise DynatuneError(
                "this model was prepared for dynatune (prepare(model, method)) but is training without it, which "
                "would be full fine-tuning; add callbacks=[DynatuneCallback(method)] to the Trainer (or train it "
                "with dynatune's own loop).")

    _UNTUNED_GUARDS[model] = model.register_forward_pre_hook(refuse)


def release_guard(model: nn.Module) -> None:
    handle = _UNTUNED_GUARDS.pop(model, None)
    if handle is not None:
        handle.remove()


class Tuner:
    """Owns the plan, the optimizer state policy, signals and byte counting for one model."""

    def __init__(self, model: nn.Module, method, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float = 1e-4, weight_decay: float = 0.0, layers: str | None = None,
                 count_memory: bool = True, clock=time.perf_counter, sync=None):
        self.method = method
        # the loss scale backward ran under (amp-fp16's GradScaler; 1 otherwise): the loop sets it
        # each step before after_backward, and gradient signals are read unscaled
        self.grad_scale = 1.0
        # distributed.Replicas of a data-parallel run (None: one process): see distributed.py
        self.sync = sync
        # budget (set_budget): methods read these; apply() refuses plans priced above the budget
        self.memory_model = None
        self.budget_bytes: int | None = None
        self.budget_margin = 0.03
        self.policy_note: str | None = None  # set_budget's switch of state_policy, if any
        users_hooks = input_grad_hooks_on(model)
        self.model = method.prepare_model(model)
        if input_grad_hooks_on(self.model):
            # enable_input_require_grads makes the embedding output require grad, so backward (and the
            # saved activations) would reach every block whatever the plan trains; peft turns it on
            # when it wraps a checkpointed model. Non-reentrant checkpointing does not need it.
            remove_input_grad_hooks(self.model)
            if users_hooks:
                logger.warning("dynatune: turned off the model's enable_input_require_grads hooks, which would make "
                               "backward run through every block whatever the plan trains.")
        release_guard(model)
        release_guard(self.model)
        self.units: Units = partition(self.model, method.granularity, layers)
        if sync is not None:
            sync.take_model(self.model, self.units, method)
            if sync.strategy == "fsdp":
                count_memory = False  # the counter reads whole tensors; fsdp is priced by the memory model only
        # Keep every parameter by name, including those of blocks an exit will cut off.
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        self.device = next(iter(self.params.values())).device
        self.clock = clock
        self._sync_hooks: list = []
        if sync is not None and sync.strategy == "ddp":
            if method.reads_gradients_in_backward or any(SIGNALS[s].reads_gradients_in_backward
                                                         for s in method.signals):
                # before the method's and the signals' own hooks: they must read the global gradient
                self._sync_hooks = sync.reduce_in_hooks([p for p in self.params.values() if p.is_floating_point()])
        method.setup(self)

        candidates = set(self.units.param_names(method.candidates()))
        self.candidate_params = {n: p for n, p in self.params.items() if n in candidates}
        for n, p in self.params.items():  # never a candidate: frozen for the whole run
            if n not in self.candidate_params:
                p.requires_grad_(False)
        self._unit_groups: dict[str, list[dict]] = {}  # per_unit_lr: each candidate unit's parameter groups
        self.peak_lr = lr
        if optimizer is None and method.per_unit_lr:
            groups = [{"params": [self.params[p] for p in self.units[u].param_names], "lr": lr}
                      for u in method.candidates()]
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
            self._unit_groups = {u: [g] for u, g in zip(method.candidates(), optimizer.param_groups)}
        elif optimizer is None:
            optimizer = torch.optim.AdamW(list(self.candidate_params.values()), lr=lr, weight_decay=weight_decay)
        else:
            ensure_in_optimizer(optimizer, self.candidate_params)
            if method.per_unit_lr:  # e.g. DynatuneTrainer's optimizer, split by unit before the first step
                self._unit_groups = unit_groups(optimizer, {u: {id(self.params[p]) for p in self.units[u].param_names}
                                                            for u in method.candidates()}, method.name)
        self.optimizer = optimizer
        self.states = OptimizerStates(optimizer, self.candidate_params, method.config.state_policy, self.params)
        self._unit_params = {u.name: frozenset(u.param_names) for u in self.units}

        self.signals = {name: SIGNALS[name]() for name in method.signals}
        for s in self.signals.values():
            s.attach(self.model, self.units, self.params)

        # Early exit swaps the block list for a truncated one; the stack keeps the full list and config.
        self.block_stack = BlockStack(self.model, self.units.blocks_path)

        self.count_memory = count_memory
        self.counter = SavedTensorCounter(self.device)
        if count_memory:
            self.counter.attach({f"block.{i}": b for i, b in enumerate(self.block_stack.full)}, self.params.values())
        self._count_ctx: ExitStack | None = None
        self._plan_hooks: list = []

        self.plan: Plan | None = None
        # (plan, units whose optimizer state it kept) of every step: what the memory model prices
        self.applied_plans: set[tuple[Plan, frozenset[str]]] = set()
        # probed units the method promoted after backward: they update this step too
        self.promoted: frozenset[str] = frozenset()
        # parameters that left the plan but are probed: their state leaves after backward unless promoted
        self._leave_after_backward: set[str] = set()
        self.step = 0  # optimizer steps completed
        self.record = MemoryRecord()
        self.peak = MemoryRecord()
        self.history: list[dict] = []  # one entry per step: plan summary and counted bytes
        self._loss_sum = 0.0
        # out-of-memory retries of the open step (retry_step), logged by end_step
        self.oom_retries = 0
        self.micro_batches: int | None = None
        self._retry_shape = None
        self._recalibration: dict | None = None
        self._rng: dict | None = None

    # -- the per-step contract ------------------------------------------------------------------
    def begin_step(self) -> Plan:
        plan = self.method.plan(self.step)
        if self.sync is not None:  # a rank that disagrees stops every rank here, before any collective
            self.sync.check_same(plan.to_dict(), f"the plan of step {self.step}")
        self.states.bytes_moved = 0  # before apply: the plan switch's own state traffic is this step's
        self.apply(plan)
        for s in self.signals.values():
            s.reset()
        self.record = MemoryRecord()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = self.clock()
        self.oom_retries, self.micro_batches, self._retry_shape, self._recalibration = 0, None, None, None
        # after the plan: a retry replays the step's dropout masks, not a method's own draws
        self._rng = capture_rng()
        if self.count_memory:
            self._count_ctx = ExitStack()
            self._count_ctx.enter_context(self.counter.counting())
        return plan

    def after_backward(self) -> None:
        if self._count_ctx is not None:
            self._count_ctx.close()
            self._count_ctx = None
        self.record.activations = self.counter.total if self.count_memory else 0
        if self.sync is not None and self.sync.strategy == "ddp" and not self.sync.reduces_in_hooks:
            # the plan's gradients (updated and probed units), summed over ranks before anything reads them
            self.sync.reduce_gradients(list(self.candidate_params.items()))
        promoted = self.method.after_backward(self.step, self.signal_values()) or frozenset()
        stray = frozenset(promoted) - self.plan.probe_params - self.plan.update
        if stray:
            raise DynatuneError(f"{self.method.name} promoted units that were not probed: {sorted(stray)}.")
        self.promoted = frozenset(promoted)
        # probed parameters lent their gradient to a signal; only promoted ones keep it
        for name in self.plan.probe_params - frozenset(promoted):
            for p in self.units[name].param_names:
                self.params[p].grad = None
        # promoted units step now: their (offloaded) state comes back before the optimizer step;
        # probed units that stepped last step and were not promoted now leave (leave before enter)
        promoted_params = set(self.units.param_names(self.promoted - self.plan.update))
        self.states.leave(sorted(self._leave_after_backward - promoted_params))
        self._leave_after_backward = set()
        self.states.enter(sorted(promoted_params))
        self.states.ready()
        # per-unit rates replace the run's schedule for those units (the scheduler resets them after the step)
        for unit, factor in (self.method.lr_factors() or {}).items():
            for group in self._unit_groups[unit]:  # the scheduler's base rate (a Trainer's groups keep theirs)
                group["lr"] = group.get("initial_lr", self.peak_lr) * factor

    def after_optimizer_step(self) -> None:
        """Count live bytes while gradients still exist (the step's high-water mark)."""
        if not self.count_memory:
            return
        r = self.record
        # every parameter by name: blocks cut off by an exit are still resident (tied ones count once)
        r.weights = unique_bytes(self.params.values(), self.device)
        r.gradients = grad_bytes(self.params.values(), self.device)
        r.optimizer = self.states.resident_bytes(self.device)
        r.offloaded = self.states.offloaded_bytes()
        if self.device.type == "cuda":
            r.measured = torch.cuda.max_memory_allocated(self.device)
            self._recalibrate()
        if self.sync is not None:  # the budget binds on every rank: the largest rank's bytes, on all of them
            keys = ("weights", "gradients", "optimizer", "offloaded", "activations", "measured")
            for k, v in zip(keys, self.sync.max_scalars([float(getattr(r, k) or 0) for k in keys])):
                setattr(r, k, int(v))
        if r.counted >= self.peak.counted:
            self.peak = MemoryRecord(**vars(r))

    def wants_extra_forwards(self) -> bool:
        """Whether the method runs its own forwards at the open step (Method.wants_forwards)."""
        return bool(self.method.extra_forwards and self.method.wants_forwards(self.step))

    def extra_forwards(self, forward_loss) -> None:
        """After the optimizer step (gradients freed), before end_step: the loop and the Trainer
        callback hand over `forward_loss()`, the loss of the step's own batch as they compute it (every
        micro-batch, under the run's autocast). When the method wants forwards at this step, it gets
        `run()`: that loss under no_grad, with every module in eval mode (dropout off; each module's
        flag restored after) and the global RNG forked (CPU and every initialised CUDA device), so the
        training step's dropout masks, the data order, a resume and an out-of-memory retry see exactly
        the draws of a run without these forwards. Their peak is in `predict_peak` (below)."""
        if not self.wants_extra_forwards():
            return
        model = self.model

        def run() -> float:
            with torch.random.fork_rng(devices=_rng_devices()), torch.no_grad(), eval_mode(model):
                return float(forward_loss())
        self.method.forwards(self.step, run)

    def extra_forward_peak(self, plan: Plan) -> int | None:
        """A forward of the training micro-batch under no_grad with `plan`'s optimizer state (and the
        state the run keeps) resident and no gradient: what a method's extra forwards peak at."""
        mm = self.memory_model
        if mm is None or mm.batch_shape is None:
            return None
        B, S = mm.batch_shape
        resident = Plan.of(plan.update | self.kept_state(plan), exit_depth=plan.exit_depth)
        return int(mm.predict_eval(B, S, resident)["predicted_peak_bytes"])

    def end_step(self, loss: float | None = None) -> dict:
        if self.sync is not None:
            # the global batch's loss (each rank's was weighted by its share); what updated, checked equal
            self.sync.check_same(sorted(self.plan.update | self.promoted), f"the units updated at step {self.step}")
            if loss is not None:
                loss = self.sync.sum_scalars([float(loss)])[0]
        self.method.end_step(self.step, loss)
        entry = {"step": self.step, "loss": loss, "update": sorted(self.plan.update | self.promoted),
                 "exit_depth": self.plan.exit_depth,
                 "memory": self.record.to_dict() if self.count_memory else None,  # None: nothing was counted
                 "bytes_moved": self.states.bytes_moved, "step_time_s": self.clock() - self._t0}
        if self.plan.note:
            entry["note"] = self.plan.note
        if self.oom_retries:
            entry["oom_retries"] = self.oom_retries
            entry["micro_batches"] = self.micro_batches
            if self._recalibration is not None:
                entry["recalibrated"] = self._recalibration
        if self.promoted:
            entry["promoted"] = sorted(self.promoted)
        if self.memory_model is not None:
            pred = self.predict(self.plan)
            entry["predicted_bytes"] = pred.predicted_counted_bytes
            entry["predicted_peak_bytes"] = self.predict_peak(self.plan)
            if self.budget_bytes is not None:
                entry["budget_bytes"] = self.budget_bytes
        fields = self.method.log_fields(self.step)
        if fields:
            entry["method_log"] = fields
        self.history.append(entry)
        self.step += 1
        return entry

    def abort_step(self) -> None:
        """Undo a step that failed midway (e.g. out of memory): no hooks left on, no gradients kept."""
        if self._count_ctx is not None:
            self._count_ctx.close()
            self._count_ctx = None
        self.optimizer.zero_grad(set_to_none=True)

    def retry_step(self, micro_batches: int | None = None, batch_shape=None) -> Plan:
        """Reopen the step that just failed (out of memory in forward or backward) with the same plan.

        The method is not asked again: its state and generator advance once per step. Applying the
        plan is not redone either (a failed forward/backward changes none of it). What the failed
        attempt left goes back to the step's start: gradients (a step starts with none: the loop and
        the Trainer zero them with set_to_none), the signals' values, the saved-tensor count, the
        CUDA peak statistics, and the global RNG (CPU and CUDA), so dropout draws the same masks as a
        run that split this batch from the start. A method that keeps per-backward state (e.g. how
        many micro-batches to expect) gets `method.retry_step(step, micro_batches)` if it has one.

        `micro_batches` (passes the retried step makes) and the count of retries go to the step's
        log record. `batch_shape` = (examples, tokens) of the largest retried micro-batch: on CUDA,
        the memory model (if one is installed) is calibrated with the step's measured peak at that
        shape once the step is done; on the CPU nothing is measured and nothing is calibrated.
        """
        self.abort_step()
        if self.sync is not None:
            raise DynatuneError(f"out of device memory at step {self.step} under data parallelism, where a retry "
                                "with smaller micro-batches is not supported yet (the other ranks would wait for "
                                "this one); raise grad_accum or lower max_length or the budget.")
        if self._rng is not None:
            restore_rng(self._rng)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        for s in self.signals.values():
            s.reset()
        self.record = MemoryRecord()
        self.oom_retries += 1
        self.micro_batches = micro_batches
        self._retry_shape = tuple(batch_shape) if batch_shape is not None else None
        self.method.retry_step(self.step, micro_batches)
        if self.count_memory:
            self._count_ctx = ExitStack()
            self._count_ctx.enter_context(self.counter.counting())
        return self.plan

    def _recalibrate(self) -> None:
        """After an out-of-memory retry: fold the step's measured peak (at the retried micro-batch
        shape) into the memory model, so later predictions see what this device really needed."""
        mm = self.memory_model
        if not (self.oom_retries and mm is not None and self._retry_shape is not None and self.record.measured):
            return
        rec = mm.calibrate(self.plan, self.record.measured, batch_shape=self._retry_shape)
        self._recalibration = {"measured": int(self.record.measured), "batch_shape": list(self._retry_shape)}
        if isinstance(rec, dict) and "predicted" in rec:
            self._recalibration["predicted"] = rec["predicted"]

    def signal_values(self) -> dict[str, dict[str, float]]:
        """signal name -> unit -> float. Hooks kept their readings on the device; this is the step's
        one host sync for signals (none when the method reads no signal)."""
        if self.sync is not None:
            values = dict(zip(self.signals, agree_signals(self.sync, list(self.signals.values()), self.units)))
        else:
            values = dict(zip(self.signals, read_signals(list(self.signals.values()))))
        if self.grad_scale != 1.0:  # amp-fp16: backward ran on the scaled loss; scores read its gradient
            for name, sig in self.signals.items():
                if sig.reads_gradient:
                    values[name] = {u: v / self.grad_scale for u, v in values[name].items()}
        return values

    # -- data parallelism: what methods may call to agree across ranks (identity in one process) ---
    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """A new tensor: `t` summed over the ranks of a data-parallel run (a forward statistic each
        rank accumulated over its share of the batch); a copy of `t` in one process."""
        return t.clone() if self.sync is None else self.sync.sum_tensor(t)

    def squared_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Each tensor's squared L2 norm, of the whole tensor, as one float vector on the device (no
        host sync). Under FSDP2 a gradient is this rank's shard: the shards' squares are summed over
        the ranks (one all-reduce of the vector)."""
        sq = torch.stack(torch._foreach_norm([local_part(t) for t in tensors])).float().pow(2)
        return self.sync.sum_tensor(sq) if self.shards_gradients else sq

    @property
    def shards_gradients(self) -> bool:
        """True under FSDP2: each rank holds a shard of every gradient, handed over after backward
        (post-accumulate-grad hooks on the shards never fire)."""
        return self.sync is not None and self.sync.strategy == "fsdp"

    def from_main_rank(self, value: float) -> float:
        """Rank 0's `value` on every rank (a measured time); `value` itself in one process."""
        return value if self.sync is None else self.sync.from_main([float(value)])[0]

    # -- applying a plan -------------------------------------------------------------------------
    def set_budget(self, memory_model, budget_bytes: int | None, margin: float = 0.03) -> None:
        """Price plans with `memory_model` (memory.MemoryModel, its batch_shape set); from now
        on `apply` refuses a plan predicted above budget_bytes x (1 - margin), counting the optimizer
        state the run keeps. Methods choose within it through `predict_peak` and `usable_budget`.

        state_policy=keep piles up the state of every unit that ever updated. If that could outgrow
        the budget (the method's largest plan with every candidate's state kept), the policy becomes
        offload before the first step (the same updates, bit for bit; the state waits in host
        memory), and a warning says so: a run never finds out mid-way that its state does not fit.
        """
        self.memory_model = memory_model
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.budget_margin = check_margin(margin)
        self.policy_note = None
        if self.budget_bytes is None or self.states.policy != "keep":
            return
        largest = self.method.largest_plan(self.units)
        everything = frozenset(self.method.candidates()) - largest.update
        if not everything:  # no unit can leave the plan (full, topk, adapters): keep holds nothing extra
            return
        worst = memory_model.predict(largest, kept_state=everything).predicted_peak_bytes
        if worst > self.usable_budget:
            self.states.set_policy("offload")
            self.policy_note = (
                f"{self.method.name}: state_policy=keep would hold the optimizer state of every unit that has "
                f"trained, predicted at up to {worst} bytes, above the budget's usable {self.usable_budget} bytes; "
                "using state_policy=offload instead (the same updates, the state of units that leave waits in "
                "host memory); set state_policy=drop to free it instead.")
            logger.warning(self.policy_note)

    @property
    def has_memory_model(self) -> bool:
        return self.memory_model is not None

    @property
    def usable_budget(self) -> int | None:
        """The bytes a plan may be predicted at: budget x (1 - margin); None without a budget."""
        return None if self.budget_bytes is None else usable_budget(self.budget_bytes, self.budget_margin)

    def kept_state(self, plan: Plan) -> frozenset[str]:
        """Units outside `plan.update` whose optimizer state stays on the device while it runs: under
        state_policy=keep, every unit that holds state now (state piles up as units come and go)."""
        if self.states.policy != "keep":
            return frozenset()
        with_state = {self.states.name_of[id(p)] for p in self.optimizer.state}
        return frozenset(u for u, names in self._unit_params.items()
                         if u not in plan.update and not with_state.isdisjoint(names))

    def predict(self, plan: Plan):
        """The memory model's prediction of `plan` as this run would hold it (kept optimizer state
        included); None without a memory model."""
        if self.memory_model is None:
            return None
        return self.memory_model.predict(plan, kept_state=self.kept_state(plan))

    def predict_peak(self, plan: Plan, kept_state: frozenset[str] | None = None) -> int | None:
        """The predicted peak bytes the budget is checked against: the method's own price where it
        has one (Method.plan_peak), else the memory model's, and for a method with `extra_forwards`
        at least the peak of its no-grad forwards (extra_forward_peak); None without a memory model.
        kept_state: the units whose optimizer state stays beside the plan (default: as held now)."""
        if self.memory_model is None:
            return None
        peak = self.method.plan_peak(plan)
        if peak is None:
            kept = self.kept_state(plan) if kept_state is None else kept_state
            peak = self.memory_model.predict(plan, kept_state=kept).predicted_peak_bytes
        peak = int(peak)
        if self.method.extra_forwards:  # priced at every step: a plan never learns late that they do not fit
            peak = max(peak, self.extra_forward_peak(plan) or 0)
        return peak

    def apply(self, plan: Plan) -> None:
        plan.validate(self.units)
        if self.budget_bytes is not None and self.memory_model is not None:
            peak, limit = self.predict_peak(plan), self.usable_budget
            if peak > limit:  # refused before anything changes
                kept = self.kept_state(plan)
                raise BudgetError(f"{self.method.name}'s plan (update {', '.join(sorted(plan.update)[:4])}"
                                  f"{', ...' if len(plan.update) > 4 else ''}"
                                  f"{f'; optimizer state kept for {len(kept)} units that left' if kept else ''}"
                                  f") is predicted to peak at {peak} bytes, "
                                  f"above the budget's usable {limit} bytes ({self.budget_bytes} x "
                                  f"(1 - {self.budget_margin:g})).", predicted_bytes=peak, budget_bytes=self.budget_bytes)
        old = self.plan
        self.block_stack.set_exit(plan.exit_depth)
        wanted = grad_param_names(self.units, plan)
        stray = wanted - set(self.candidate_params)
        if stray:
            raise DynatuneError(f"the plan trains parameters outside the method's candidates ({sorted(stray)[:3]}...).")
        require_grad_only(self.candidate_params, wanted)
        if self.sync is not None:
            self.sync.reshard(self.model)  # FSDP2: gathered units take up the new flags
        updated = set(self.units.param_names(plan.update))
        # what really updated last step: the plan's units and the ones promoted after backward
        before = (set(self.units.param_names(old.update | self.promoted)) if old is not None
                  else set(self.candidate_params)) | self._leave_after_backward
        self.promoted = frozenset()
        # a probed unit may be promoted after backward: its state waits there instead of a round trip
        self._leave_after_backward = (before - updated) & set(self.units.param_names(plan.probe_params))
        self.states.leave(sorted(before - updated - self._leave_after_backward))
        self.states.enter(sorted(updated))
        for h in self._plan_hooks:
            h.remove()
        self._plan_hooks = add_plan_hooks(self.model, self.units, self.block_stack.full, plan)
        self.plan = plan
        self.applied_plans.add((plan, self.kept_state(plan)))

    @contextmanager
    def all_blocks(self):
        """Every block in place for a while (a checkpoint saves the whole model during an exit)."""
        exit_depth = self.plan.exit_depth if self.plan is not None else None
        self.block_stack.set_exit(None)
        try:
            yield self.model
        finally:
            self.block_stack.set_exit(exit_depth)

    def eval_batch_that_fits(self, batch: int, seq: int, new_tokens: int = 0) -> int:
        """The largest evaluation batch, at most `batch`, whose forward (and generate() with
        `new_tokens`) the memory model prices within the budget, with the optimizer state the run
        holds still resident (before the first step: the most it can hold); `batch` itself without
        a budget."""
        if self.budget_bytes is None or self.memory_model is None:
            return batch
        # before training, the most state the run can hold: its largest plan's (every candidate's under keep)
        plan = self.plan if self.plan is not None else self.method.largest_plan(self.units)
        kept = (frozenset(self.method.candidates()) if self.plan is None and self.states.policy == "keep"
                else self.kept_state(plan))
        resident = Plan.of(plan.update | kept, exit_depth=plan.exit_depth)
        mm = self.memory_model

        def peak(b):
            p = mm.predict_eval(b, seq, resident)["predicted_peak_bytes"]
            if new_tokens:
                p = max(p, mm.predict_generate(b, seq, new_tokens, resident)["predicted_peak_bytes"])
            return p
        if peak(batch) <= self.usable_budget:
            return batch
        lo, hi = 1, batch  # peaks grow with the batch: the largest that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if peak(mid) <= self.usable_budget else (lo, mid - 1)
        return lo

    # -- state ------------------------------------------------------------------------------------
    def params_in(self, unit_names) -> int:
        """Number of parameters in these units (e.g. a plan's `update`)."""
        return sum(self.params[n].numel() for n in self.units.param_names(unit_names))

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.states.state_dict(), "method": self.method.state_dict(),
                "plan": self.plan.to_dict() if self.plan else None, "promoted": sorted(self.promoted),
                "history": self.history,
                "peak": self.peak.to_dict(),
                # metrics.json prices the largest plan of the whole run, so a resume must know the earlier ones
                "applied_plans": [[p.to_dict(), sorted(kept)] for p, kept in self.applied_plans]}

    def fold_rank_statistics(self) -> None:
        """Before a checkpoint, on every rank of a data-parallel run: each of the method's
        rank_statistics summed over the ranks into rank 0's copy, the others zeroed. The sums the
        method reads stay the same, and the state rank 0 writes holds the whole batch's, so a resume
        on any number of ranks goes on from them."""
        if self.sync is None:
            return
        for t in self.method.rank_statistics():
            total = self.sync.sum_tensor(t)
            if self.sync.is_main:
                t.copy_(total)
            else:
                t.zero_()

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]
        self.method.load_state_dict(sd["method"])
        if self.sync is not None and not self.sync.is_main:  # rank 0 holds the folded statistics
            for t in self.method.rank_statistics():
                t.zero_()
        self.history = list(sd["history"])
        self.peak = MemoryRecord(**{k: v for k, v in sd["peak"].items() if k != "counted"})
        self.applied_plans = {(Plan.from_dict(p), frozenset(kept)) for p, kept in sd.get("applied_plans", ())}
        if sd["plan"] is not None:
            self.apply(Plan.from_dict(sd["plan"]))
            self.promoted = frozenset(sd.get("promoted", ()))
        self.states.load_state_dict(sd["optimizer"])

    def close_hooks(self) -> None:
        """Remove every hook; an exit stays in place (a saved model then has e blocks)."""
        for h in self._plan_hooks + self._sync_hooks:
            h.remove()
        self._plan_hooks, self._sync_hooks = [], []
        for s in self.signals.values():
            s.detach()
        self.counter.detach()
        self.method.close_hooks()

    def close(self) -> None:
        """Remove every hook and restore the full block list."""
        self.close_hooks()
        self.block_stack.set_exit(None)
