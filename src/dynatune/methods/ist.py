"""IST, importance-aware sparse tuning (shared/papers/004): train the PEFT modules of the N_u layers
that a learned importance draws, and learn that importance by suppressing the adapters' response.

A layer's unit is the set of its PEFT modules (the adapter units of one block, each priced on its
own by the memory model, as DynaLoRA's are); a plan updates every adapter module of the drawn
layers. The others get no gradient, take no optimizer step, save no input for backward, and their
optimizer state follows `state_policy`; backward stops at the lowest drawn layer.

- fine-tuning loop (eq. 6-7): importance I is zero-initialised; each step p_i ~ U(0, sigmoid(I_i))
  is drawn from the method's own generator and the N_u layers with the largest p_i train.
- importance loop (eq. 8-10), after the optimizer step of every `t_c`-th step: `n_c` candidate
  sets of N_v layers drawn uniformly; for each, the adapters of the layers outside the set answer
  base + beta * (adapted - base) (a forward hook on each adapted module computes the base output
  with the module's base layer, so it is exact for LoRA, DoRA and the bottleneck adapters alike);
  the loss L_j of a no-grad forward of the step's own batch (Tuner.extra_forwards: dropout off,
  global RNG forked); reward r_j = e^-L_j - mean_k e^-L_k; I_i += mu * r_j for i in S_j.
- `sampling=inverted`: the public implementation's reading, which draws the layers to train with
  multinomial(sigmoid(-I)) and the layers to suppress with multinomial(sigmoid(I)); see the doc.
- `selection=random`: N_u layers drawn uniformly each step, no importance loop (the ablation).
- N_u: `n_u`, else ceil(`fraction` x layers); under a budget it is checked against the worst
  plan (the lowest layer plus the N_u - 1 that raise the peak most, extra forwards included), or,
  with both null, derived as the largest that fits. When backward through every layer does not
  fit, layers below a depth are never drawn to train (they are still scored). A drawn plan still
  above the budget loses its lowest-drawn layers, so a draw never fails mid-run.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import BudgetError, DynatuneError
from ..plan import Plan
from ..units import get_submodule
from .adapters import Dora, Lora, LoraConfig, already_adapted, present_targets
from .base import Method, count_and_depth, opt, register

ADAPTERS = ("lora", "dora", "series", "parallel")
SAMPLING = ("paper", "inverted")
SELECTION = ("importance", "random")


@dataclass
class IstConfig(LoraConfig):
    r: int = opt(32, "LoRA/DoRA rank (table 8: 32)")
    alpha: float = opt(64.0, "LoRA/DoRA scaling numerator, alpha / r (table 8: 64)")
    dropout: float = opt(0.05, "dropout on the adapter input (table 8: 0.05)")
    targets: str = opt("q_proj,k_proj,v_proj,up_proj,down_proj,query,key,value",
                       "LoRA/DoRA: adapted linears (those the model has are used), or 'all-linear'; table 8: "
                       "{Q, K, V, Up, Down}")
    adapter: str = opt("lora", "adapter injected when the model has none: lora, dora, series or parallel "
                               "(bottleneck adapters on the MLP); a peft model handed in is used as it is")
    bottleneck: int = opt(256, "series/parallel adapters: bottleneck size (table 9: 256)")
    n_u: Optional[int] = opt(None, "layers trained per step; null: ceil(fraction x layers)")
    fraction: Optional[float] = opt(0.25, "N_u as a fraction of the layers when n_u is null (tables 8-9: 25%); "
                                          "null too: the largest N_u the budget admits")
    n_v: Optional[int] = opt(None, "layers left unsuppressed in each candidate set; null: ceil(v_fraction x layers)")
    v_fraction: float = opt(0.5, "N_v as a fraction of the layers when n_v is null (tables 8-9: 50%)")
    beta: float = opt(0.25, "response suppression factor of eq. 8 (table 11: 0.25 is best)")
    t_c: int = opt(10, "importance loop every t_c steps (the paper's T_c = 10); 0 turns it off")
    n_c: int = opt(3, "candidate sets per importance loop (N_c = 3)")
    mu: float = opt(10.0, "importance updating rate of eq. 10 (10 for commonsense, 100 for arithmetic; "
                          "too small behaves like random selection on short runs)")
    sampling: str = opt("paper", "paper (eq. 6-8: train the top-N_u of p_i ~ U(0, sigmoid(I_i)), candidate sets "
                                 "uniform) or inverted (the public code: train multinomial(sigmoid(-I)), suppress "
                                 "multinomial(sigmoid(I)))")
    selection: str = opt("importance", "importance (IST) or random (N_u layers drawn uniformly each step, no "
                                       "importance loop: the paper's random ablation)")


@register
class Ist(Method):
    name = "ist"
    Config = IstConfig
    granularity = "adapter"
    summary = ("IST: the PEFT modules of N_u of the layers train each step, drawn by an importance learned by "
               "suppressing the adapters' response (25% of layers, every 10 steps 3 candidate sets)")
    default_lr = 2e-4
    schedules_under_budget = True  # N_u is checked against (or derived from) the budget at the first plan
    updates_base_weights = False   # only adapters train: a peft model is used as it is
    extra_forwards = True          # the importance loop's suppressed forwards

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        c = self.config
        for value, allowed, what in ((c.adapter, ADAPTERS, "adapter"), (c.sampling, SAMPLING, "sampling"),
                                     (c.selection, SELECTION, "selection")):
            if value not in allowed:
                raise DynatuneError(f"{self.name}.{what}={value!r}; use one of {', '.join(allowed)}.")
        if not 0 <= c.beta <= 1:
            raise DynatuneError(f"{self.name}.beta={c.beta} must be in [0, 1] (eq. 8).")
        if c.t_c < 0 or c.n_c < 1:
            raise DynatuneError(f"{self.name}.t_c must be 0 (off) or more and n_c at least 1.")
        if c.fraction is not None and not 0 < c.fraction <= 1:
            raise DynatuneError(f"{self.name}.fraction={c.fraction} must be in (0, 1].")
        if not 0 < c.v_fraction <= 1:
            raise DynatuneError(f"{self.name}.v_fraction={c.v_fraction} must be in (0, 1].")
        if c.bottleneck < 1:
            raise DynatuneError(f"{self.name}.bottleneck={c.bottleneck} must be at least 1.")
        self.n_u: int | None = None
        self.n_v: int | None = None
        self.lowest_depth = 0
        self.active: list[int] = []        # indices into self.depths of the layers training now
        self.importance = torch.zeros(0, dtype=torch.float64)
        self.last_losses: list[float] = []  # the last importance loop's candidate losses (logged)
        self.last_sets: list[list[int]] = []
        self._scored_at: int | None = None
        self._resolved = False
        self._hooks: list = []

    # -- adapters ----------------------------------------------------------------------------------
    def prepare_model(self, model):
        from ..modules.bottleneck import has_bottleneck
        if already_adapted(model) or has_bottleneck(model):
            return model
        c = self.config
        if c.adapter in ("series", "parallel"):
            from ..modules.bottleneck import inject_bottleneck
            return inject_bottleneck(model, c.adapter, c.bottleneck, c.dropout)
        fields = {f: getattr(c, f) for f in ("r", "alpha", "dropout", "train_head", "state_policy", "blocks")}
        cfg = LoraConfig(**fields, targets=present_targets(model, self.config.targets))
        return (Dora if c.adapter == "dora" else Lora)(cfg).prepare_model(model)

    def export(self, model, out_dir, tokenizer=None, merged=False):
        from ..modules.bottleneck import has_bottleneck, save_bottleneck
        if has_bottleneck(model):
            save_bottleneck(model, out_dir, tokenizer, [p for u in self.units.fresh_heads for p in u.param_names])
        else:
            Lora.export(self, model, out_dir, tokenizer, merged)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, tuner) -> None:
        super().setup(tuner)
        by_depth: dict[int, list[str]] = {}
        for u in self.units.of_kind("adapter"):
            by_depth.setdefault(u.depth, []).append(u.name)
        if not by_depth:
            raise DynatuneError(f"{self.name} found no adapter modules in the model.")
        self.depths = sorted(by_depth)
        self.layers = [by_depth[d] for d in self.depths]   # the unit names of each layer
        N = len(self.depths)
        self.importance = torch.zeros(N, dtype=torch.float64)
        c = self.config
        if c.n_u is not None:
            if not 1 <= c.n_u <= N:
                raise DynatuneError(f"{self.name}.n_u={c.n_u} is outside 1..{N} (the model has {N} layers with adapters).")
            self.n_u = c.n_u
        elif c.fraction is not None:
            self.n_u = max(1, math.ceil(c.fraction * N - 1e-9))
        if c.n_v is not None and not 1 <= c.n_v <= N:
            raise DynatuneError(f"{self.name}.n_v={c.n_v} is outside 1..{N} (the model has {N} layers with adapters).")
        self.n_v = c.n_v if c.n_v is not None else max(1, math.ceil(c.v_fraction * N - 1e-9))

    def close_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _module(self, unit_name: str):
        return get_submodule(self.tuner.model, f"{self.units.blocks_path}.{unit_name[len('block.'):]}")

    # -- the fine-tuning loop (eq. 6-7) ------------------------------------------------------------
    def pool(self) -> list[int]:
        """Layers that may be drawn to train: all, or under a tight budget those at or above lowest_depth."""
        return [i for i, d in enumerate(self.depths) if d >= self.lowest_depth]

    def draw(self) -> list[int]:
        """The layers (indices into `depths`) that train this step."""
        pool = self.pool()
        n = min(self.n_u, len(pool))
        I = self.importance[pool]
        if self.config.selection == "random":
            p = torch.rand(len(pool), generator=self.generator, dtype=torch.float64)
        elif self.config.sampling == "inverted":
            w = torch.sigmoid(-I).clamp_min(torch.finfo(torch.float64).tiny)
            return sorted(pool[j] for j in torch.multinomial(w, n, replacement=False, generator=self.generator).tolist())
        else:  # eq. 6: p_i ~ U(0, sigmoid(I_i)); eq. 7: the N_u largest train
            p = torch.rand(len(pool), generator=self.generator, dtype=torch.float64) * torch.sigmoid(I)
        order = sorted(range(len(pool)), key=lambda j: (-float(p[j]), j))
        return sorted(pool[j] for j in order[:n])

    def plan_of(self, layers) -> Plan:
        return Plan.of(self.with_head(u for i in layers for u in self.layers[i]))

    def plan(self, step: int) -> Plan:
        if not self._resolved:
            self._resolve_n_u()
            self._resolved = True
        self.active = self._within_budget(self.draw())
        return self.plan_of(self.active)

    def _within_budget(self, layers: list[int]) -> list[int]:
        """A draw priced above the budget (the worst case was priced up front, so only if the state
        kept by earlier plans pushes it over) loses its lowest layers until it fits."""
        limit = self.tuner.usable_budget
        if limit is None:
            return layers
        layers = list(layers)
        while len(layers) > 1 and self.tuner.predict_peak(self.plan_of(layers)) > limit:
            layers.remove(min(layers, key=lambda i: self.depths[i]))
        return layers

    # -- budget ------------------------------------------------------------------------------------
    def worst_plan(self, n: int, lowest_depth: int | None = None) -> Plan:
        """The most memory an n-layer plan of the layers at or above `lowest_depth` can need, found
        greedily: the lowest layer (backward runs deepest), then the layer that raises the predicted
        peak most, n - 1 times; without a memory model, the lowest n layers."""
        d = self.lowest_depth if lowest_depth is None else lowest_depth
        rest = [i for i, dep in enumerate(self.depths) if dep >= d]
        chosen = [rest.pop(0)]
        while len(chosen) < n and rest:
            if self.tuner.has_memory_model:
                best = max(rest, key=lambda i: (self.tuner.predict_peak(self.plan_of(chosen + [i])), -i))
            else:
                best = rest[0]
            chosen.append(best)
            rest.remove(best)
        return self.plan_of(chosen)

    def _fits(self, n: int, depth: int) -> bool:
        return self.tuner.predict_peak(self.worst_plan(n, depth)) <= self.tuner.usable_budget

    def _resolve_n_u(self) -> None:
        """At the first plan (or set_budget's largest_plan): check N_u against the budget, or derive the
        largest that fits; when backward through every layer does not fit, layers below a depth are
        never drawn to train (the lowest depth where N_u fits; for a derived N_u, the one admitting most)."""
        limit = self.tuner.usable_budget
        if limit is None:
            if self.n_u is None:
                raise DynatuneError(f"{self.name}: n_u and fraction are both null, so N_u comes from the memory "
                                    "budget; give a budget (budget=0.6) or set n_u or fraction.")
            return
        best = count_and_depth(self.depths, lambda d: sum(dep >= d for dep in self.depths), self.n_u, self._fits)
        if best is None:
            n = self.n_u or 1
            top = self.depths[len(self.depths) - n]
            peak = self.tuner.predict_peak(self.worst_plan(n, top))
            raise BudgetError(
                f"{self.name}: {n} layer(s) of adapters do not fit the budget even at the top of the model (predicted "
                f"at {peak} bytes at worst, above the budget's usable {limit} bytes); lower n_u or fraction, or raise "
                "the budget.", predicted_bytes=peak, budget_bytes=self.tuner.budget_bytes)
        self.n_u, self.lowest_depth = best

    def smallest_plan(self, units) -> Plan:
        """The top layer's adapters: backward stops soonest."""
        top = max(u.depth for u in units.of_kind("adapter"))
        return Plan.of({u.name for u in units.of_kind("adapter") if u.depth == top} | self.fresh_heads(units))

    def largest_plan(self, units) -> Plan:
        if not self._resolved and self.tuner.usable_budget is not None:
            self._resolve_n_u()
            self._resolved = True
        return self.worst_plan(self.n_u) if self.n_u is not None else super().largest_plan(units)

    def cheaper_settings(self, largest):
        return (f"{self.name}.n_u", f"{self.name}.fraction", f"{self.name}.r") if largest else (f"{self.name}.r",)

    # -- the importance loop (eq. 8-10) ------------------------------------------------------------
    def wants_forwards(self, step: int) -> bool:
        c = self.config
        return c.selection == "importance" and c.t_c > 0 and (step + 1) % c.t_c == 0

    def candidate_sets(self) -> list[list[int]]:
        """N_c sets of N_v layers (indices into `depths`): the layers left unsuppressed."""
        N, n_v = len(self.depths), self.n_v
        sets = []
        for _ in range(self.config.n_c):
            if self.config.sampling == "inverted":  # the suppressed layers drawn by multinomial(sigmoid(I))
                if n_v == N:
                    sets.append(list(range(N)))
                    continue
                w = torch.sigmoid(self.importance).clamp_min(torch.finfo(torch.float64).tiny)
                out = set(torch.multinomial(w, N - n_v, replacement=False, generator=self.generator).tolist())
                sets.append([i for i in range(N) if i not in out])
            else:
                sets.append(sorted(torch.randperm(N, generator=self.generator)[:n_v].tolist()))
        return sets

    def forwards(self, step: int, run) -> None:
        sets = self.candidate_sets()
        losses = []
        for kept in sets:
            suppressed = [u for i in range(len(self.depths)) if i not in kept for u in self.layers[i]]
            with self.suppress(suppressed, self.config.beta):
                losses.append(run())
        if self.tuner.sync is not None:  # data parallel: each rank scored its share; the batch's is their mean
            losses = (self.tuner.sum_over_ranks(torch.tensor(losses, dtype=torch.float64)) / self.tuner.sync.world).tolist()
        self.update_importance(sets, losses)
        self.last_sets, self.last_losses, self._scored_at = sets, losses, step

    def update_importance(self, sets: list[list[int]], losses: list[float]) -> None:
        """Eq. 9-10: r_j = e^-L_j - mean_k e^-L_k; I_i += mu * r_j for every i in S_j."""
        e = torch.exp(-torch.tensor(losses, dtype=torch.float64))
        r = e - e.mean()
        for S, rj in zip(sets, r.tolist()):
            for i in S:
                self.importance[i] += self.config.mu * rj

    @contextmanager
    def suppress(self, unit_names, beta: float):
        """Eq. 8 for these adapter units: each adapted module answers base + beta * (adapted - base),
        the base output computed from the same input by its base layer."""
        handles = [self._module(n).register_forward_hook(_suppression_hook(beta), with_kwargs=True)
                   for n in unit_names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- logs and checkpoints ----------------------------------------------------------------------
    def log_fields(self, step):
        out = {"active_layers": [self.depths[i] for i in self.active], "n_u": self.n_u,
               "lowest_depth": self.lowest_depth, "importance": [round(float(v), 6) for v in self.importance]}
        if self._scored_at == step:
            out["candidate_sets"] = [[self.depths[i] for i in S] for S in self.last_sets]
            out["candidate_losses"] = [round(v, 6) for v in self.last_losses]
        return out

    def state_dict(self):
        return {**super().state_dict(), "n_u": self.n_u, "n_v": self.n_v, "lowest_depth": self.lowest_depth,
                "active": list(self.active), "importance": self.importance.clone()}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.n_u, self.n_v, self.lowest_depth = sd["n_u"], sd["n_v"], sd["lowest_depth"]
        self.active = list(sd["active"])
        self.importance = sd["importance"].clone().to(torch.float64)
        self._resolved = True

    @classmethod
    def plots(cls, run_dir, log):
        return plot_importance(run_dir, log)


def _suppression_hook(beta: float):
    """Eq. 8 on one adapted module: base + beta * (adapted - base), the base output computed from the
    same input by the module's base layer (peft's LoRA/DoRA layers and dynatune's bottleneck adapters
    keep the wrapped module there)."""
    def hook(module, args, kwargs, out):
        base_layer = getattr(module, "base_layer", None)
        if base_layer is None:
            raise DynatuneError(f"{type(module).__name__} has no base layer, so its adapter's response cannot be "
                                "suppressed (IST supports peft LoRA/DoRA and dynatune's series/parallel adapters).")
        base = base_layer(*args, **kwargs)
        return base + beta * (out - base)
    return hook


def plot_importance(run_dir, log: list[dict]) -> list[Path]:
    """Fig. 4: each layer's importance over the steps, and which layers trained."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log if "method_log" in r and "importance" in r["method_log"]]
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    imp = torch.tensor([r["method_log"]["importance"] for r in rows], dtype=torch.float64)
    layers = rows[0]["method_log"].get("layers") or list(range(imp.shape[1]))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    im = ax.imshow(imp.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, imp.shape[1] - 0.5, -0.5))
    ax.set_ylabel("layer")
    if len(layers) <= 40:  # the blocks the layers are (all of them, or those with adapters)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_title("IST layer importance I over steps (fig. 4)")
    fig.colorbar(im, ax=ax, label="importance")
    grid = torch.zeros(imp.shape[1], len(rows))
    for j, r in enumerate(rows):
        for d in r["method_log"]["active_layers"]:
            if d < imp.shape[1]:
                grid[d, j] = 1
    ax2.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="Greys",
               extent=(steps[0] - 0.5, steps[-1] + 0.5, imp.shape[1] - 0.5, -0.5))
    ax2.set_ylabel("layer")
    ax2.set_xlabel("step")
    ax2.set_title("layers trained")
    fig.tight_layout()
    out = Path(run_dir) / "ist_importance.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]
