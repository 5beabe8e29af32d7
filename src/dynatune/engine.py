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

import time
from contextlib import ExitStack

import torch
from torch import nn

from .errors import DynatuneError
from .memory import MemoryRecord, SavedTensorCounter, grad_bytes, unique_bytes
from .optim import OptimizerStates, ensure_in_optimizer
from .plan import Plan
from .signals import SIGNALS, first_tensor, read_signals
from .units import Units, get_submodule, partition


def capture_rng() -> dict:
    """The global RNG state dropout draws from: torch's CPU generator and, once CUDA is in use, CUDA's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Tuner:
    """Owns the plan, the optimizer state policy, signals and byte counting for one model."""

    def __init__(self, model: nn.Module, method, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float = 1e-4, weight_decay: float = 0.0, layers: str | None = None,
                 count_memory: bool = True, clock=time.perf_counter):
        self.method = method
        # budget (set_budget): methods read these; apply() refuses plans priced above the budget
        self.memory_model = None
        self.budget_bytes: int | None = None
        self.budget_margin = 0.03
        self.model = method.prepare_model(model)
        self.units: Units = partition(self.model, method.granularity, layers)
        # Keep every parameter by name, including those of blocks an exit will cut off.
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        self.device = next(iter(self.params.values())).device
        self.clock = clock
        method.setup(self)

        candidates = set(self.units.param_names(method.candidates()))
        self.candidate_params = {n: p for n, p in self.params.items() if n in candidates}
        for n, p in self.params.items():  # never a candidate: frozen for the whole run
            if n not in self.candidate_params:
                p.requires_grad_(False)
        if optimizer is None:
            optimizer = torch.optim.AdamW(list(self.candidate_params.values()), lr=lr, weight_decay=weight_decay)
        else:
            ensure_in_optimizer(optimizer, self.candidate_params)
        self.optimizer = optimizer
        self.states = OptimizerStates(optimizer, self.candidate_params, method.config.state_policy)

        self.signals = {name: SIGNALS[name]() for name in method.signals}
        for s in self.signals.values():
            s.attach(self.model, self.units, self.params)

        # Early exit swaps the block list for a truncated one; keep the full list and config.
        parent_path, _, self._blocks_attr = self.units.blocks_path.rpartition(".")
        self._blocks_parent = get_submodule(self.model, parent_path) if parent_path else self.model
        self._all_blocks: nn.ModuleList = getattr(self._blocks_parent, self._blocks_attr)
        cfg = getattr(self.model, "config", None)
        self._config_layers = (getattr(cfg, "num_hidden_layers", None), getattr(cfg, "layer_types", None))

        self.count_memory = count_memory
        self.counter = SavedTensorCounter(self.device)
        if count_memory:
            self.counter.attach({f"block.{i}": b for i, b in enumerate(self._all_blocks)}, self.params.values())
        self._count_ctx: ExitStack | None = None
        self._plan_hooks: list = []

        self.plan: Plan | None = None
        self.applied_plans: set[Plan] = set()
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
        if r.counted >= self.peak.counted:
            self.peak = MemoryRecord(**vars(r))

    def end_step(self, loss: float | None = None) -> dict:
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
        method_log = getattr(self.method, "log_fields", None)  # optional: extra per-step fields
        if method_log is not None:
            fields = method_log(self.step)
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
        hook = getattr(self.method, "retry_step", None)
        if hook is not None:
            hook(self.step, micro_batches)
        if self.count_memory:
            self._count_ctx = ExitStack()
            self._count_ctx.enter_context(self.counter.counting())
        return self.plan

    def _recalibrate(self) -> None:
        """After an out-of-memory retry: fold the step's measured peak (at the retried micro-batch
        shape) into the memory model, so later predictions see what this device really needed."""
        mm = self.memory_model
        calibrate = getattr(mm, "calibrate", None)
        if not (self.oom_retries and calibrate is not None and self._retry_shape is not None
                and self.record.measured):
            return
        rec = calibrate(self.plan, self.record.measured, batch_shape=self._retry_shape)
        self._recalibration = {"measured": int(self.record.measured), "batch_shape": list(self._retry_shape)}
        if isinstance(rec, dict) and "predicted" in rec:
            self._recalibration["predicted"] = rec["predicted"]

    def signal_values(self) -> dict[str, dict[str, float]]:
        """signal name -> unit -> float. Hooks kept their readings on the device; this is the step's
        one host sync for signals (none when the method reads no signal)."""
        return dict(zip(self.signals, read_signals(list(self.signals.values()))))

    # -- applying a plan -------------------------------------------------------------------------
    def set_budget(self, memory_model, budget_bytes: int | None, margin: float = 0.03) -> None:
        """Price plans with `memory_model` (memory_model.MemoryModel, its batch_shape set); from now
        on `apply` refuses a plan predicted above budget_bytes x (1 - margin). Methods read
        `tuner.memory_model`, `tuner.budget_bytes` and `tuner.budget_margin` to choose within it."""
        from .memory_model import check_margin
        self.memory_model = memory_model
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.budget_margin = check_margin(margin)

    def apply(self, plan: Plan) -> None:
        plan.validate(self.units)
        if self.budget_bytes is not None and self.memory_model is not None:
            # a method may price its own plan where the plan's fields cannot say it all (gradselect's
            # streaming top-m keeps m+1 of the probed gradients): `plan_peak(plan)`, None = the model's
            own = getattr(self.method, "plan_peak", None)
            peak = own(plan) if own is not None else None
            if peak is None:  # the only memory-model call: any object with predict(plan).predicted_peak_bytes
                peak = self.memory_model.predict(plan).predicted_peak_bytes
            from .memory_model import BudgetError, usable_budget
            limit = usable_budget(self.budget_bytes, self.budget_margin)
            if peak > limit:  # refused before anything changes
                raise BudgetError(f"{self.method.name}'s plan (update {', '.join(sorted(plan.update)[:4])}"
                                  f"{', ...' if len(plan.update) > 4 else ''}) is predicted to peak at {peak} bytes, "
                                  f"above the budget's usable {limit} bytes ({self.budget_bytes} x "
                                  f"(1 - {self.budget_margin:g})).", predicted_bytes=peak, budget_bytes=self.budget_bytes)
        old = self.plan
        self._set_exit(plan.exit_depth)
        grad_units = plan.update | plan.probe_params
        wanted = set(self.units.param_names(grad_units))
        stray = wanted - set(self.candidate_params)
        if stray:
            raise DynatuneError(f"the plan trains parameters outside the method's candidates ({sorted(stray)[:3]}...).")
        for n, p in self.candidate_params.items():
            p.requires_grad_(n in wanted)
            if n not in wanted:
                p.grad = None  # units that left free their gradient now
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
        self._plan_hooks = []
        for name in plan.probe:
            self._plan_hooks.append(self._probe_output(self.units[name]))
        if plan.detach_tied_input:
            emb = self.model.get_input_embeddings()
            self._plan_hooks.append(emb.register_forward_hook(lambda m, a, out: out.detach()))
        self.plan = plan
        self.applied_plans.add(plan)

    def _probe_output(self, unit):
        """Make the unit's output require grad so backward reaches it (not its weights)."""
        if unit.kind != "block":
            raise DynatuneError(f"only blocks can be probed at their output, not {unit.name}.")

        def hook(mod, args, out):
            t = first_tensor(out)
            if t is not None and not t.requires_grad:
                t.requires_grad_(True)
        # prepend: signal hooks on the same block (ActivationGradNorm) must see the output
        # already requiring grad, or the probed block reports nothing
        return self._all_blocks[unit.depth].register_forward_hook(hook, prepend=True)

    def _set_exit(self, exit_depth: int | None) -> None:
        n = len(self._all_blocks)
        e = n if exit_depth is None else exit_depth
        current = getattr(self._blocks_parent, self._blocks_attr)
        if len(current) == e:
            return
        setattr(self._blocks_parent, self._blocks_attr,
                self._all_blocks if e == n else nn.ModuleList(list(self._all_blocks)[:e]))
        cfg = getattr(self.model, "config", None)
        n_layers, layer_types = self._config_layers
        if cfg is not None and n_layers is not None:
            # the saved model must load with e blocks: its config says so
            cfg.num_hidden_layers = e if e < n else n_layers
            if layer_types is not None:
                cfg.layer_types = list(layer_types)[:e] if e < n else layer_types

    # -- state ------------------------------------------------------------------------------------
    def params_in(self, unit_names) -> int:
        """Number of parameters in these units (e.g. a plan's `update`)."""
        return sum(self.params[n].numel() for n in self.units.param_names(unit_names))

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.states.state_dict(), "method": self.method.state_dict(),
                "plan": self.plan.to_dict() if self.plan else None, "promoted": sorted(self.promoted),
                "history": self.history,
                "peak": self.peak.to_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]
        self.method.load_state_dict(sd["method"])
        self.history = list(sd["history"])
        self.peak = MemoryRecord(**{k: v for k, v in sd["peak"].items() if k != "counted"})
        if sd["plan"] is not None:
            self.apply(Plan.from_dict(sd["plan"]))
            self.promoted = frozenset(sd.get("promoted", ()))
        self.states.load_state_dict(sd["optimizer"])

    def close_hooks(self) -> None:
        """Remove every hook; an exit stays in place (a saved model then has e blocks)."""
        for h in self._plan_hooks:
            h.remove()
        self._plan_hooks = []
        for s in self.signals.values():
            s.detach()
        self.counter.detach()
        method_hooks = getattr(self.method, "close_hooks", None)  # a method's own hooks (gradselect's)
        if method_hooks is not None:
            method_hooks()

    def close(self) -> None:
        """Remove every hook and restore the full block list."""
        self.close_hooks()
        self._set_exit(None)
