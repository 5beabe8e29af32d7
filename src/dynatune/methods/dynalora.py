"""DynaLoRA and DynaVeRA (shared/papers/001): train only the most important adapter modules.

A unit is one adapter module: the adapter parameters on one target linear (LoRA's A/B pair,
DoRA's A/B and magnitude, VeRA's lambda_b/lambda_d pair). Every target carries an adapter; at
each reallocation k of the M modules are drawn active, the rest are frozen. An inactive module
gets no gradient, takes no optimizer step, saves no input for backward, and its optimizer state
follows `state_policy`; backward stops at the lowest active module (engine.py, plan_mechanics.py).
The memory model prices each module on its own (memory/probe.py, block_states).

- importance (§3.1): `forward` = eq. 1, the L1/L2 norm of the adapted layer's output per sample
  over its non-padding tokens, summed over every sample seen, normalised by eq. 2; `backward` =
  the L2 norm of the module's adapter-weight gradient, averaged over the steps it trained since
  the last reallocation (an inactive module keeps its last score); `random` = uniform.
  Scores accumulate in one device tensor, read once per reallocation (one host sync).
- allocators (§3.2): topk, threshold (smallest set whose normalised importance sums to p),
  stochastic (k drawn without replacement from Categorical(y_hat)), discounted-stochastic (eq. 3:
  y_hat / (C + 1), renormalised; C counts the steps a module trained). `independent=true` draws
  each module on its own with probability min(1, k * q_m) instead.
- schedules (§3.3): `periodic` (every `period` steps), `once` (at step 0 and after `once_after`
  steps, the paper's alpha; `alpha` is LoRA's scaling here).
- optimisation (§3.4): `global` (one optimizer and learning-rate schedule; selected modules step)
  or `local` (each module its own learning-rate clock that advances only on the steps it trains,
  the run's schedule shape over its expected active steps, k/M of the run). AdamW's moments and
  bias-correction step are per parameter in both: they only move when the module steps.
- k: `k` modules, else `fraction` of them; both null under a budget: the largest k whose worst
  plan the memory model admits. When backward through every block does not fit, modules below a
  depth are never drawn (`lowest_depth`). A drawn plan still above the budget loses its least
  important modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import BudgetError, DynatuneError
from ..optim import linear_factor
from ..plan import Plan
from ..units import get_submodule, unit_sort_key
from .adapters import Dora, Lora, LoraConfig, Vera, VeraConfig, already_adapted, present_targets
from .base import Method, count_and_depth, opt, register

IMPORTANCE = ("forward", "backward", "random")
ALLOCATORS = ("discounted-stochastic", "stochastic", "topk", "threshold")
SCHEDULES = ("periodic", "once")
OPTIMISATION = ("global", "local")
ADAPTERS = ("lora", "dora", "vera")


@dataclass
class DynaLoraConfig(LoraConfig):
    targets: str = opt("query,value,q_proj,v_proj",
                       "adapted linears (every one carries an adapter): module names (those the model has are used), "
                       "or 'all-linear'; table 1's rows and fig. 1 use query/value (its caption says query/key)")
    adapter: str = opt("lora", "adapter injected when the model has none: lora, dora or vera (a peft model handed in "
                               "is used as it is)")
    k: Optional[int] = opt(None, "active modules; null: fraction x modules")
    fraction: Optional[float] = opt(0.6667, "active fraction of the modules when k is null (table 1: 16 of 24; "
                                            "8 of 12 on MiniLM's query/value); null too: the largest k the budget admits")
    importance: str = opt("forward", "forward (eq. 1: output norm per sample), backward (adapter-weight gradient "
                                     "norm) or random (uniform)")
    norm: int = opt(2, "p of eq. 1's per-sample norm: 1 or 2 (the paper uses 2)")
    allocator: str = opt("discounted-stochastic", "discounted-stochastic (eq. 3), stochastic, topk or threshold")
    threshold: float = opt(0.9, "threshold allocator: smallest set whose normalised importance sums to this "
                                "(the paper gives no value)")
    independent: bool = opt(False, "stochastic allocators: draw each module on its own with probability "
                                    "min(1, k q_m) instead of k without replacement")
    schedule: str = opt("periodic", "periodic (every `period` steps) or once (at step 0 and after `once_after` steps)")
    period: int = opt(50, "periodic schedule: steps between reallocations (table 1: 50)")
    once_after: int = opt(100, "once schedule: the paper's alpha, the step of the second allocation (no value given)")
    optimisation: str = opt("global", "global (one learning-rate schedule) or local (each module's own clock, "
                                      "advanced only when it trains, over k/M of the run)")


@register
class DynaLora(Method):
    name = "dynalora"
    Config = DynaLoraConfig
    granularity = "adapter"
    summary = ("DynaLoRA: k of M adapter modules active, reallocated every `period` steps by importance "
               "(forward/backward/random) with a discounted stochastic allocator; inactive modules save nothing")
    default_lr = 5e-4
    schedules_under_budget = True  # k is checked against (or derived from) the budget at the first plan
    updates_base_weights = False   # only adapters train: a peft model is used as it is
    export = Lora.export           # a finished run saves a peft adapter with the task head, as lora does

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        c = self.config
        for value, allowed, what in ((c.importance, IMPORTANCE, "importance"), (c.allocator, ALLOCATORS, "allocator"),
                                     (c.schedule, SCHEDULES, "schedule"), (c.adapter, ADAPTERS, "adapter"),
                                     (c.optimisation, OPTIMISATION, "optimisation")):
            if value not in allowed:
                raise DynatuneError(f"{self.name}.{what}={value!r}; use one of {', '.join(allowed)}.")
        if c.norm not in (1, 2):
            raise DynatuneError(f"{self.name}.norm={c.norm}; eq. 1 uses p = 1 or 2.")
        if c.period < 1 or c.once_after < 1:
            raise DynatuneError(f"{self.name}.period and once_after must be at least 1.")
        if c.fraction is not None and not 0 < c.fraction <= 1:
            raise DynatuneError(f"{self.name}.fraction={c.fraction} must be in (0, 1].")
        if not 0 < c.threshold <= 1:
            raise DynatuneError(f"{self.name}.threshold={c.threshold} must be in (0, 1].")
        self.per_unit_lr = c.optimisation == "local"
        self.k: int | None = None
        self.lowest_depth = 0                # under a tight budget: modules below it are never drawn
        self.active: list[str] = []
        self.counts: list[int] = []          # C^(m): steps each module trained
        self.clocks: list[int] = []          # local optimisation: each module's learning-rate clock
        self.horizon: float | None = None    # local: expected active steps of a module
        self.total_steps: int | None = None  # the run's optimizer steps (configure_schedule)
        self.warmup_ratio = 0.0
        self.scores: list[float] = []        # importance at the last reallocation (logged, plotted)
        self._handles: list = []
        self._resolved = False  # k checked against (or derived from) the budget at the first plan
        self._owners_of: list[str] | None = None  # the allocation backward importance's indices are for

    # -- adapters ----------------------------------------------------------------------------------
    def prepare_model(self, model):
        if already_adapted(model):
            return model
        c = self.config
        base = {"lora": Lora, "dora": Dora, "vera": Vera}[c.adapter]
        fields = {f: getattr(c, f) for f in ("r", "alpha", "dropout", "train_head", "state_policy", "blocks")}
        if c.adapter == "vera":
            cfg = VeraConfig(**fields, d_initial=getattr(c, "d_initial", 0.1), targets=present_targets(model, self.config.targets))
        else:
            cfg = LoraConfig(**fields, targets=present_targets(model, self.config.targets))
        return base(cfg).prepare_model(model)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, tuner) -> None:
        super().setup(tuner)
        self.modules = [u.name for u in self.units.of_kind("adapter")]
        M = len(self.modules)
        if M == 0:
            raise DynatuneError(f"{self.name} found no adapter modules in the model.")
        self.index = {n: i for i, n in enumerate(self.modules)}
        self.counts = [0] * M
        self.clocks = [0] * M
        self.scores = [1.0 / M] * M
        c = self.config
        if c.k is not None:
            if not 1 <= c.k <= M:
                raise DynatuneError(f"{self.name}.k={c.k} is outside 1..{M} (the model has {M} adapter modules).")
            self.k = c.k
        elif c.fraction is not None:
            self.k = max(1, round(c.fraction * M))
        device = tuner.device
        # eq. 1's running sums (forward), or per-period gradient norm sums and counts (backward)
        self.acc = torch.zeros(M, dtype=torch.float32, device=device)
        self.seen = torch.zeros(M, dtype=torch.float32, device=device)
        self.measured = [False] * M
        if c.importance == "forward":
            self._attach_forward(tuner.model)

    def _attach_forward(self, model) -> None:
        """Forward hooks on every adapted layer (eq. 1) and one on the model for the padding mask."""
        self._mask = None

        def read_mask(mod, args, kwargs):
            self._mask = kwargs.get("attention_mask")
        self._handles.append(model.register_forward_pre_hook(read_mask, with_kwargs=True))
        for name in self.modules:
            mod = get_submodule(model, f"{self.units.blocks_path}.{name[len('block.'):]}")
            self._handles.append(mod.register_forward_hook(self._forward_hook(self.index[name])))

    def _forward_hook(self, i: int):
        p = self.config.norm

        def hook(mod, args, out):
            if not (mod.training and torch.is_grad_enabled()):
                return  # importance is the training samples' (eq. 1's D_t), not evaluation's
            with torch.no_grad():
                # per-token norms first (B x S, fp32): no fp32 copy of the whole output
                tok = torch.linalg.vector_norm(out.detach(), ord=p, dim=-1, dtype=torch.float32)
                if tok.dim() == 2 and self._mask is not None and self._mask.shape == tok.shape:
                    tok = tok * self._mask.to(tok.dtype)  # padding tokens count nothing
                tok = tok.reshape(len(tok), -1)
                per_sample = tok.sum(1) if p == 1 else tok.pow(2).sum(1).sqrt()  # the sample's L_p norm
                self.acc[i] += per_sample.sum()
        return hook

    def close_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def configure_schedule(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_ratio = warmup_steps / max(1, total_steps)

    # -- importance and allocation -----------------------------------------------------------------
    def importance(self) -> torch.Tensor:
        """y_hat (eq. 2), float64 on the host: one read of the device accumulators."""
        M = len(self.modules)
        imp = self.config.importance
        if imp == "random":
            y = torch.ones(M, dtype=torch.float64)
        elif imp == "forward":
            # each rank summed its share of the batch: the global batch's sums (a copy; acc keeps running)
            y = self.tuner.sum_over_ranks(self.acc).to("cpu", torch.float64)
        else:
            sums, seen = self.acc.to("cpu", torch.float64), self.seen.to("cpu", torch.float64)
            for i in range(M):
                if seen[i] > 0:  # trained this period: its mean gradient norm; else its last score stays
                    self.scores[i] = float(sums[i] / seen[i])
                    self.measured[i] = True
            self.acc.zero_()
            self.seen.zero_()
            known = [s for s, m in zip(self.scores, self.measured) if m]
            fill = sum(known) / len(known) if known else 1.0  # never trained: drawable at the mean
            y = torch.tensor([s if m else fill for s, m in zip(self.scores, self.measured)], dtype=torch.float64)
        total = float(y.sum())
        y = y / total if total > 0 else torch.full((M,), 1.0 / M, dtype=torch.float64)
        self.scores = y.tolist()
        return y

    def allocate(self, y_hat: torch.Tensor, k: int, counts: list[int] | None = None) -> list[int]:
        """Indices (into y_hat) of the modules to activate, from normalised importance y_hat (§3.2);
        `counts`: their activation counters (default: every module's)."""
        c = self.config
        counts = self.counts if counts is None else counts
        order = sorted(range(len(y_hat)), key=lambda i: (-float(y_hat[i]), i))  # ties: model order
        if c.allocator == "topk":
            return sorted(order[:k])
        if c.allocator == "threshold":
            chosen, total = [], 0.0
            for i in order:
                chosen.append(i)
                total += float(y_hat[i])
                if total >= c.threshold - 1e-12 or len(chosen) == k:
                    break
            return sorted(chosen)
        q = y_hat
        if c.allocator == "discounted-stochastic":  # eq. 3, with C + 1 so an untrained module is defined
            q = y_hat / (torch.tensor(counts, dtype=torch.float64) + 1)
            q = q / q.sum()
        if c.independent:
            u = torch.rand(len(q), generator=self.generator, dtype=torch.float64)
            chosen = [i for i in range(len(q)) if float(u[i]) < min(1.0, k * float(q[i]))]
            return chosen or [int(torch.argmax(q))]
        # an underflowed probability stays drawable (multinomial refuses fewer than k nonzero)
        q = q.clamp_min(torch.finfo(torch.float64).tiny)
        return sorted(torch.multinomial(q, k, replacement=False, generator=self.generator).tolist())

    def reallocates(self, step: int) -> bool:
        c = self.config
        if c.schedule == "periodic":
            return step % c.period == 0
        return step in (0, c.once_after)

    # -- plans -------------------------------------------------------------------------------------
    def plan(self, step: int) -> Plan:
        if not self._resolved:
            self._resolve_k()
            self._resolved = True
        if self.reallocates(step) or not self.active:
            y_hat = self.importance()
            pool = self.pool()
            sub = y_hat[pool]
            sub = sub / sub.sum() if float(sub.sum()) > 0 else torch.full_like(sub, 1.0 / len(pool))
            chosen = self.allocate(sub, self.k, [self.counts[i] for i in pool])
            self.active = self._within_budget([self.modules[pool[j]] for j in chosen])
        return Plan.of(self.with_head(self.active))

    def pool(self) -> list[int]:
        """Indices of the modules that may be drawn: all, or under a tight budget those at or above
        `lowest_depth` (backward through every block would not fit)."""
        return [i for i, n in enumerate(self.modules) if self.units[n].depth >= self.lowest_depth]

    def _within_budget(self, active: list[str]) -> list[str]:
        """A draw priced above the budget drops its least important modules until it fits."""
        limit = self.tuner.usable_budget
        if limit is None:
            return active
        active = list(active)
        while len(active) > 1 and self.tuner.predict_peak(Plan.of(self.with_head(active))) > limit:
            active.remove(min(active, key=lambda n: (self.scores[self.index[n]], -self.index[n])))
        return active

    def _sizes(self) -> dict[str, int]:
        return {n: sum(self.tuner.params[p].numel() for p in self.units[n].param_names) for n in self.modules}

    def worst_plan(self, k: int, lowest_depth: int | None = None) -> Plan:
        """The most memory a k-module plan of the modules at or above `lowest_depth` (default: the
        method's) can need, found greedily: the lowest module (backward runs deepest), then the module
        that raises the predicted peak most, k - 1 times; without a memory model, the lowest module
        and the largest ones."""
        d = self.lowest_depth if lowest_depth is None else lowest_depth
        sizes = self._sizes()
        rest = [n for n in self.modules if self.units[n].depth >= d]
        chosen = [min(rest, key=lambda n: (self.units[n].depth, -sizes[n], self.index[n]))]
        rest.remove(chosen[0])
        while len(chosen) < k:
            if self.tuner.has_memory_model:
                best = max(rest, key=lambda n: (self.tuner.predict_peak(Plan.of(self.with_head(chosen + [n]))),
                                                sizes[n], -self.index[n]))
            else:
                best = max(rest, key=lambda n: (sizes[n], -self.index[n]))
            chosen.append(best)
            rest.remove(best)
        return Plan.of(self.with_head(chosen))

    def _fits(self, k: int, depth: int) -> bool:
        return self.tuner.predict_peak(self.worst_plan(k, depth)) <= self.tuner.usable_budget

    def _resolve_k(self) -> None:
        """At the first plan (or set_budget's largest_plan): check k against the budget, or derive the
        largest k that fits. When backward through every block does not fit, modules below a depth are
        never drawn: the lowest depth where the given k fits, or, for a derived k, the depth that
        admits the largest k (the lowest on ties)."""
        limit = self.tuner.usable_budget
        if limit is None:
            if self.k is None:
                raise DynatuneError(f"{self.name}: k and fraction are both null, so k comes from the memory budget; "
                                    "give a budget (budget=0.6) or set k or fraction.")
            return
        depths = sorted({self.units[n].depth for n in self.modules})
        best = count_and_depth(depths, lambda d: sum(self.units[n].depth >= d for n in self.modules), self.k,
                               self._fits)
        if best is None:
            k = self.k or 1
            top = max(d for d in depths if sum(self.units[n].depth >= d for n in self.modules) >= k)
            peak = self.tuner.predict_peak(self.worst_plan(k, top))
            raise BudgetError(
                f"{self.name}: {k} adapter module(s) do not fit the budget even in the top blocks (predicted at "
                f"{peak} bytes at worst, above the budget's usable {limit} bytes); lower k or fraction, or raise "
                "the budget.", predicted_bytes=peak, budget_bytes=self.tuner.budget_bytes)
        self.k, self.lowest_depth = best

    def smallest_plan(self, units) -> Plan:
        """The cheapest one-module plan: the highest module (backward stops soonest), the smallest."""
        mods = units.of_kind("adapter")
        size = {u.name: sum(self.tuner.params[p].numel() for p in u.param_names) for u in mods}
        best = min(mods, key=lambda u: (-u.depth, size[u.name], u.name))
        return Plan.of({best.name} | self.fresh_heads(units))

    def largest_plan(self, units) -> Plan:
        """The worst k-module plan; under a budget k is settled first (set_budget asks this before the
        first plan, to know whether keep's state fits), so a derived k is not priced as all M."""
        if not self._resolved and self.tuner.usable_budget is not None:
            self._resolve_k()
            self._resolved = True
        return self.worst_plan(self.k) if self.k is not None else super().largest_plan(units)

    # -- each step ---------------------------------------------------------------------------------
    def after_backward(self, step, signals):
        if self.config.importance != "backward":
            return None
        # each active module's adapter-weight gradient norm, summed on the device (no host sync); the
        # index tensors change only with the allocation
        if self._owners_of != self.active:
            pairs = [(self.tuner.params[p], self.index[n]) for n in self.active for p in self.units[n].param_names]
            self._owner_params = [p for p, _ in pairs]
            self._owner_idx = torch.tensor([i for _, i in pairs], device=self.acc.device)
            self._active_idx = torch.tensor([self.index[n] for n in self.active], device=self.acc.device)
            self._owners_of = list(self.active)
        sq = self.tuner.squared_norms([p.grad if p.grad is not None else torch.zeros_like(p) for p in self._owner_params])
        self.acc += torch.zeros_like(self.acc).index_add_(0, self._owner_idx, sq).sqrt()
        self.seen[self._active_idx] += 1
        return None

    def lr_factors(self) -> dict[str, float] | None:
        """Local optimisation: each active module's rate on its own clock (the run's warm-up and linear
        decay over its expected active steps, k/M of the run)."""
        if not self.per_unit_lr:
            return None
        H = self.horizon if self.horizon is not None else self._horizon()
        warm = int(self.warmup_ratio * H)
        return {n: linear_factor(self.clocks[self.index[n]], warm, max(1, round(H))) for n in self.active}

    def _horizon(self) -> float:
        total = self.total_steps
        if total is None:
            raise DynatuneError(f"{self.name}.optimisation=local needs the run's length; the training loop gives "
                                "it (configure_schedule).")
        self.horizon = total * self.k / len(self.modules)
        return self.horizon

    def end_step(self, step, loss):
        for n in self.active:
            self.counts[self.index[n]] += 1
            self.clocks[self.index[n]] += 1

    def log_fields(self, step):
        out = {"active": list(self.active), "k": self.k, "lowest_depth": self.lowest_depth}
        if self.reallocates(step):
            out["importance"] = [round(s, 6) for s in self.scores]
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def rank_statistics(self):
        # eq. 1 sums over every sample seen: each rank's over its share (backward's are whole already)
        return [self.acc] if self.config.importance == "forward" else []

    def state_dict(self):
        return {**super().state_dict(), "k": self.k, "lowest_depth": self.lowest_depth, "active": list(self.active),
                "counts": list(self.counts),
                "clocks": list(self.clocks), "scores": list(self.scores), "measured": list(self.measured),
                "horizon": self.horizon, "acc": self.acc.detach().cpu().clone(),
                "seen": self.seen.detach().cpu().clone()}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.k, self.lowest_depth, self.active = sd["k"], sd["lowest_depth"], list(sd["active"])
        self.counts, self.clocks = list(sd["counts"]), list(sd["clocks"])
        self.scores, self.measured, self.horizon = list(sd["scores"]), list(sd["measured"]), sd["horizon"]
        self.acc.copy_(sd["acc"])
        self.seen.copy_(sd["seen"])
        self._resolved = True

    # -- figures -----------------------------------------------------------------------------------
    @classmethod
    def plots(cls, run_dir, log):
        return plot_dynalora(run_dir, log)


@dataclass
class DynaVeraConfig(DynaLoraConfig):
    adapter: str = opt("vera", "adapter injected when the model has none: lora, dora or vera (a peft model handed in "
                               "is used as it is)")
    r: int = opt(256, "VeRA: rank of the shared frozen random projections")
    d_initial: float = opt(0.1, "VeRA: initial value of the d scaling vector")


@register
class DynaVera(DynaLora):
    name = "dynavera"
    Config = DynaVeraConfig
    summary = "DynaVeRA: DynaLoRA over VeRA's per-module scaling vectors (lambda_b, lambda_d)"
    default_lr = 4e-3


def plot_dynalora(run_dir, log: list[dict]) -> list[Path]:
    """modules x steps heat map of active modules, and fig. 5: total active steps per module."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log if "method_log" in r and "active" in r["method_log"]]
    if not rows:
        return []
    modules = sorted({m for r in rows for m in r["method_log"]["active"]} |
                     {m for r in rows for m in r.get("update", []) if m != "head"}, key=unit_sort_key)
    pos = {m: i for i, m in enumerate(modules)}
    grid = torch.zeros(len(modules), len(rows))
    for j, r in enumerate(rows):
        for m in r["method_log"]["active"]:
            grid[pos[m], j] = 1
    run_dir = Path(run_dir)
    out = []
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(modules) + 1.5))
    ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="Greys",
              extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, len(modules) - 0.5, -0.5))
    ax.set_yticks(range(len(modules)), modules, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("active adapter modules")
    fig.tight_layout()
    out.append(run_dir / "dynalora_active.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    # fig. 5: blocks x module kinds, total active steps
    blocks = sorted({int(m.split(".")[1]) for m in modules})
    kinds = sorted({m.split(".", 2)[2] for m in modules})
    totals = torch.zeros(len(blocks), len(kinds))
    for m in modules:
        _, b, kind = m.split(".", 2)
        totals[blocks.index(int(b)), kinds.index(kind)] = grid[pos[m]].sum()
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2, 0.4 * len(blocks) + 1.5))
    im = ax.imshow(totals.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
    for i in range(len(blocks)):
        for j in range(len(kinds)):
            ax.text(j, i, int(totals[i, j]), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="active steps")
    ax.set_title("total active steps per module (fig. 5)")
    fig.tight_layout()
    out.append(run_dir / "dynalora_active_steps.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out
