"""What every method shares: a config dataclass, a registry, and the fresh-head rule."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch

from ..errors import DynatuneError
from ..plan import Plan
from ..units import already_adapted

METHODS: dict[str, type["Method"]] = {}


def register(cls):
    """Class decorator: makes the method reachable by name from the CLI, YAML and `dynatune ls`."""
    METHODS[cls.name] = cls
    return cls


def opt(default, help: str):
    """A config field with help text (shown by `dynatune ls`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MethodConfig:
    train_head: bool = opt(True, "always train a freshly initialised task head (it has no pretrained values)")
    state_policy: str = opt("keep", "optimizer state of units that leave the plan: keep, drop or offload")


def config_help(cfg_cls) -> list[tuple[str, object, str]]:
    """(name, default, help) of each option, for `dynatune ls` and the docs."""
    out = []
    for f in fields(cfg_cls):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


class Method:
    """A policy: reads signals and (with a budget) the memory model, returns the next Plan.

    Subclasses set `name`, `Config`, and override `plan`; most need nothing else. Every hook the
    engine (engine.Tuner) and the training loops (loop.fit, integrations.hf) call is declared here,
    in the order a run calls them, with a default that does nothing; nothing is looked up with
    getattr. What a method may read from the tuner it is handed in `setup` is the tuner's public
    API: `units`, `params`, `model`, `device`, `count_memory`, `record` (this step's counted bytes),
    `predict(plan)` / `predict_peak(plan)` (priced with the optimizer state the run really holds;
    None without a memory model), `has_memory_model`, `budget_bytes`, `usable_budget` and
    `squared_norms(tensors)` (whole tensors' squared norms, FSDP2 shards included),
    `shards_gradients` (True under FSDP2); and, for a
    data-parallel run, `sum_over_ranks(tensor)` (a statistic a rank gathered from its share of the
    batch, summed over ranks) and `from_main_rank(value)` (rank 0's reading of anything rank-local,
    such as a clock): every input a decision reads must be the same on every rank.
    """

    name = "base"
    Config = MethodConfig
    granularity = "block"
    signals: tuple[str, ...] = ()
    default_lr = 5e-5
    default_budget: str | None = None  # used when the run sets no budget (a budgeted method's own)
    # True: the method chooses each plan within the budget itself (tuner.predict_peak); False: its
    # plans are fixed by its options, so a budget below its largest plan is refused before training
    schedules_under_budget = False
    # False for adapter methods: the base model's weights stay as loaded, only the adapters train
    updates_base_weights = True
    # True: the engine gives each candidate unit its own optimizer parameter group, whose rate
    # `lr_factors` sets before each optimizer step (DynaLoRA's local optimisation)
    per_unit_lr = False
    # True: the method runs no-grad forwards of its own on the step's batch (`forwards`, IST's
    # response suppression); the engine prices them in every plan's predicted peak, and the loop and
    # the Trainer callback hand the step's batch over as a closure
    extra_forwards = False
    # True: the method reads parameter gradients in its own hooks during backward (a streaming
    # ranking); under data parallelism the engine then reduces each gradient in a hook that runs
    # before the method's, so it reads the global gradient (distributed.py)
    reads_gradients_in_backward = False
    # True: where gradients arrive sharded (FSDP2 reduce-scatters them after backward, and hooks on
    # the shards do not fire) the method reads them after backward instead, with
    # `tuner.squared_norms`, so strategy=fsdp accepts it (`tuner.shards_gradients` says which)
    reads_sharded_gradients_after_backward = False
    summary = ""

    def __init__(self, config: MethodConfig | None = None, seed: int = 0):
        self.config = config if config is not None else self.Config()
        # the budget given with the method (build_method(..., budget=)); the run's own applies otherwise
        self.budget: str | float | int | None = None
        # the method's own generator: selection never touches the global RNG (dropout's)
        self.generator = torch.Generator().manual_seed(seed)

    # -- before training ---------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Once, before prepare_model (integrations.hf.prepare, and the Trainer callback at train
        begin; the CLI refuses a model directory holding an adapter when it loads it): refuse a model
        whose training with this method could not be saved. Default: a method that updates base
        weights refuses a model carrying peft adapters, since saving a peft model (what
        Trainer.save_model does) writes the adapter alone and would drop those updates."""
        if self.updates_base_weights and already_adapted(model):
            raise DynatuneError(f"method={self.name} updates base weights, but the model carries peft adapters "
                                "and saving it would keep only the adapter; merge the adapter first "
                                "(merge_and_unload, or a run's save_merged=true) or use method=lora, dora or vera.")

    def calibration_examples(self) -> int:
        """Once, before anything else sees the model (the plain loop; integrations.hf.prepare when given
        data): how many training examples the calibration phase draws for `calibrate` (0: none)."""
        return 0

    def calibration_gradients(self, model) -> list[list[str]]:
        """Under a budget, before `calibrate`: groups of parameter names whose gradients calibrate holds
        at once; the phase is priced with the largest group (calibration.py) and its micro-batch
        lowered until it fits."""
        return []

    def calibrate(self, model, calibration) -> None:
        """Once, before prepare_model (so before partitioning and the optimizer): `calibration`
        (calibration.Calibration) holds the drawn training examples, a loss closure, the micro-batch
        and, under a budget, its bytes and pricing. The method may run forwards and backwards on the
        model as loaded; the caller forks the global RNG around it and restores requires_grad,
        gradients and train mode afterwards. Called even when calibration_examples() is 0 (no
        examples): a method may settle options from the budget here (SPSFT's r)."""

    def prepare_model(self, model):
        """Once, before the model is partitioned: wrap or modify it (adapters are injected here)."""
        return model

    def setup(self, tuner) -> None:
        """Once, after partitioning, before the optimizer exists: read units and parameters."""
        self.tuner = tuner
        self.units = tuner.units

    def candidates(self) -> list[str]:
        """Once, in setup order: units that may ever update (the optimizer is built over all of them)."""
        return [u.name for u in self.units]

    def configure_loop(self, micro_batches: int, steps_per_epoch: int) -> None:
        """Once, before the first step, by the loop or the Trainer callback: backward passes per
        optimizer step (gradient accumulation) and optimizer steps per epoch."""

    def configure_schedule(self, total_steps: int, warmup_steps: int) -> None:
        """Once, before the first step, by the plain loop: the run's optimizer steps and warm-up steps
        (the learning-rate schedule's shape, for methods that keep their own clocks)."""

    def smallest_plan(self, units) -> Plan:
        """Before training under a budget: the least memory this method can run with (a budget below
        its price is refused up front). Default: the fresh task head alone, else the last block."""
        fresh = self.fresh_heads(units)
        return Plan.of(fresh) if fresh else Plan.of(u.name for u in units.in_block(units.n_blocks - 1))

    def largest_plan(self, units) -> Plan:
        """Before training under a budget with state_policy=keep: the most memory one step of this
        method can need, besides the optimizer state it keeps. Default: every candidate updates (an
        upper bound); methods whose plans are smaller say so, so keep is not refused needlessly."""
        return Plan.of(self.candidates())

    def cheaper_settings(self, largest: bool) -> tuple[str, ...]:
        """Options (METHOD.key) whose lower values make the smallest plan (or, `largest`, the largest)
        cheaper: what a budget refused before training advises. Default: none does."""
        return ()

    # -- each step, in order -----------------------------------------------------------------------
    def plan(self, step: int) -> Plan:
        """At the start of each step: the plan the engine applies (and checks against the budget)."""
        raise NotImplementedError

    def plan_peak(self, plan: Plan) -> int | None:
        """When the engine prices a plan under a budget: the method's own price where the plan's
        fields cannot say it all (gradselect's streaming top-m); None = the memory model's."""
        return None

    def after_backward(self, step: int, signals: dict) -> frozenset | None:
        """After the step's last backward, before the optimizer step: `signals` maps each declared
        signal to {unit or block name: float}. Returns probed units promoted to update this step."""
        return None

    def lr_factors(self) -> dict[str, float] | None:
        """After `after_backward`, before the optimizer step, when `per_unit_lr`: {unit: factor}, each
        unit's rate as a factor of the run's peak rate (replacing the run's schedule for that unit);
        None: every unit steps at the run's scheduled rate."""
        return None

    def retry_step(self, step: int, micro_batches: int) -> None:
        """When the open step ran out of memory and is retried as `micro_batches` passes, same plan."""

    def wants_forwards(self, step: int) -> bool:
        """With `extra_forwards`, once per step before the step's first forward (the Trainer callback
        keeps the step's inputs only then) and again after the optimizer step: whether `forwards`
        runs at this step. Must not draw from the method's generator."""
        return False

    def forwards(self, step: int, run) -> None:
        """With `extra_forwards`, after the optimizer step (gradients freed), before end_step, when
        `wants_forwards(step)`: `run()` returns the loss (a float) of a forward of the step's own batch
        (every micro-batch, weighted by its examples, under the run's autocast), with no gradient,
        dropout off and the global RNG forked (Tuner.extra_forwards), so the training step's draws,
        a resume and an out-of-memory retry stay exact. The method may call it any number of times,
        changing the model's response in between (hooks it removes itself) but never its weights."""

    def end_step(self, step: int, loss: float | None) -> None:
        """After the optimizer step: the step's loss (None when the model returned none)."""

    def log_fields(self, step: int) -> dict:
        """After end_step: extra fields for the step's log record (under `method_log`)."""
        return {}

    # -- after training ----------------------------------------------------------------------------
    def close_hooks(self) -> None:
        """When training ends: remove any hook the method registered itself."""

    def export(self, model, out_dir, tokenizer=None, merged: bool = False) -> None:
        """Once, after training (close_hooks done, an exit still in place), when the run saves its
        model: write into `out_dir` what loads the trained model back. Default: the whole model with
        save_pretrained (safetensors) and the tokenizer; `merged` (adapter methods also write a
        merged model) changes nothing here, since this model holds every trained weight itself."""
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    @classmethod
    def plots(cls, run_dir, log: list[dict]) -> list:
        """The method's own figures for a finished run directory (report.py draws the common ones)."""
        return []

    # -- checkpoints -------------------------------------------------------------------------------
    def rank_statistics(self) -> list[torch.Tensor]:
        """Tensors a rank of a data-parallel run accumulates from its own share of the batch and keeps
        across steps (DynaLoRA's eq. 1 sums), which the method reads through `sum_over_ranks`. Before
        each checkpoint every rank folds them into rank 0's copy (Tuner.fold_rank_statistics), since
        rank 0 alone writes the method's state; on resume the other ranks start them from zero."""
        return []

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.generator.set_state(sd["generator"])

    # -- helpers -----------------------------------------------------------------------------------
    def fresh_heads(self, units) -> set[str]:
        return {u.name for u in units.fresh_heads} if self.config.train_head else set()

    def with_head(self, names) -> set[str]:
        return set(names) | self.fresh_heads(self.units)

    def block_units(self, indices) -> set[str]:
        return {f"block.{i}" for i in indices}

    def check_k(self, k: int, what: str = "k") -> int:
        n = self.units.n_blocks
        if not 1 <= k <= n:
            raise DynatuneError(f"{self.name}.{what}={k} is outside 1..{n} (the model has {n} blocks).")
        return k


def count_and_depth(depths, size_at, count: int | None, fits) -> tuple[int, int] | None:
    """For methods that train `count` units drawn at or above a lowest depth (DynaLoRA's modules,
    IST's layers), under a budget: (count, lowest depth), or None when nothing fits. A given count
    gets the lowest depth where its worst plan fits; a derived one (None) is the largest any depth
    admits, the lowest depth on ties. size_at(d): the units at or above d; fits(n, d): the worst
    n-unit plan at or above d fits. Peaks grow with n, so the largest n is found by bisection."""
    best = None
    for d in depths:
        size = size_at(d)
        if count is not None:
            if size >= count and fits(count, d):
                return count, d
            continue
        n, lo, hi = 0, 1, size
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid, d):
                n, lo = mid, mid + 1
            else:
                hi = mid - 1
        if n and (best is None or n > best[0]):
            best = (n, d)
        if n == size:  # every unit above d fits: a higher depth cannot admit more
            break
    return best
