"""SPSFT (shared/papers/002): fine-tune only the important neurons, through row-sparse deltas.

Every adapted linear keeps its weight frozen and gets W_f (r x d_in, zero-initialised) on its r
most important output rows (modules/row_delta.py: one autograd function that saves only x, never
W_f x, and nothing for W). A unit is one linear's delta; every unit trains every step (the plan
is fixed, like LoRA's), and the memory model prices each: W_f, its gradient and AdamW state, and
x once (the probe measures the injected model as it trains).

- importance (§3.2, appendix A): `l2` (the row's magnitude, the paper's choice for LLMs; no data),
  `taylor` (sum over a row of |mean-over-data gradient x weight|, from calibration batches),
  `qm-taylor` (eq. 6-7: class-wise Taylor eta_i^t, the mean of its 0%, 10%, ..., 100% quantiles
  over classes; classification only), `random` (uniform rows, S2FT's selection, for comparison).
  `streaming=true`: Taylor summed per calibration micro-batch (|g_b x w|, reduced in a
  post-accumulate hook: no gradient buffer); `layerwise=true`: one calibration pass per block
  (a gradient buffer of one block's weights). Otherwise the buffer is every adapted weight's
  gradient, priced by the budget (calibration.py).
- selection: the top-r rows per linear (ties: the lower index), r = `r` (capped at d_out) or
  `ratio` x d_out; r null and ratio null: the largest r the memory budget admits.
- FA mode (`freeze_attention`, D.5): attention linears stay frozen, MLP rows only.
- norms (`norm_ratio` > 0): selected channels of the blocks' norm weights train too.
- dependencies (appendix B, `dependencies=true`, needs torch-pruning): the input columns that a
  selected row feeds (torch-pruning's DependencyGraph groups) train as column deltas on the same
  module, in the same autograd function (still only x saved).
- output (`export`): the merged model (plain safetensors, loadable with from_pretrained) or the
  deltas alone (indices + W_f + the fresh head, spsft_deltas.safetensors); `dynatune eval` loads
  both. An evaluation forward computes with the merged weight, so both reproduce the run exactly.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import BudgetError, DynatuneError
from ..modules.row_delta import (COL_DELTA, COLS, DELTA, DELTAS_CONFIG, DELTAS_FILE, ROWS, RowDeltaLinear, RowDeltaVector,
                                 replace_module, row_delta_modules, unwrap_all)
from ..plan import Plan
from ..units import already_adapted, find_blocks_path, unwrap_peft
from .adapters import target_linears
from .base import Method, MethodConfig, opt, register

IMPORTANCE = ("l2", "taylor", "qm-taylor", "random")
EXPORTS = ("merged", "deltas")
ATTENTION_WORDS = ("attn", "attention")


@dataclass
class SpsftConfig(MethodConfig):
    r: Optional[int] = opt(64, "trained rows per adapted linear (capped at its d_out); null: `ratio` x d_out, "
                               "else the largest r the budget admits")
    ratio: Optional[float] = opt(None, "with r null: the trained share of each adapted weight (rows = ratio x d_out)")
    importance: str = opt("l2", "l2 (row magnitude; the paper's choice for LLMs), taylor (appendix A: sum over a row "
                                "of |mean gradient x weight|, from calibration batches), qm-taylor (eq. 6-7: "
                                "quantile-mean of class-wise Taylor; classification) or random (uniform rows)")
    streaming: bool = opt(False, "taylor: sum |g_b x w| per calibration micro-batch (no gradient buffer) instead of "
                                 "|mean g x w|")
    layerwise: bool = opt(False, "taylor/qm-taylor: one calibration pass per block, holding that block's gradients only")
    calibration_examples: int = opt(128, "taylor/qm-taylor: training examples the calibration phase reads")
    targets: str = opt("all-linear", "'all-linear' (every linear in the blocks) or module names such as "
                                     "'gate_proj,up_proj,down_proj'")
    freeze_attention: bool = opt(False, "FA mode (D.5): attention linears stay frozen, MLP rows only")
    norm_ratio: float = opt(0.0, "share of each block norm's weight channels that train too (0: norms frozen)")
    dependencies: bool = opt(False, "appendix B: the input columns that depend on a selected row (torch-pruning's "
                                    "DependencyGraph) train too, as column deltas on the adapted linears; the paper "
                                    "halves the ratio when on (table 4-5: off does as well or better)")
    export: str = opt("merged", "what a finished run saves: merged (a plain model, from_pretrained) or deltas "
                                "(row indices + W_f + the task head, loaded onto the base by `dynatune eval`)")


@register
class Spsft(Method):
    name = "spsft"
    Config = SpsftConfig
    granularity = "adapter"
    default_lr = 5e-4
    updates_base_weights = False  # W stays as loaded; W_f trains and is merged when saved
    summary = ("SPSFT: r most important rows per linear (l2/Taylor/QM-Taylor/random) train as row-sparse deltas "
               "that save only x; merged or saved as deltas")

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        c = self.config
        if c.importance not in IMPORTANCE:
            raise DynatuneError(f"spsft.importance={c.importance!r}; use one of {', '.join(IMPORTANCE)}.")
        if c.export not in EXPORTS:
            raise DynatuneError(f"spsft.export={c.export!r}; use merged or deltas.")
        if c.r is not None and c.r < 1:
            raise DynatuneError(f"spsft.r={c.r} must be at least 1 (or null).")
        if c.ratio is not None and not 0 < c.ratio <= 1:
            raise DynatuneError(f"spsft.ratio={c.ratio} must be in (0, 1].")
        if not 0 <= c.norm_ratio <= 1:
            raise DynatuneError(f"spsft.norm_ratio={c.norm_ratio} must be in [0, 1].")
        if c.calibration_examples < 1:
            raise DynatuneError(f"spsft.calibration_examples={c.calibration_examples} must be at least 1.")
        self.seed = seed
        self.r = c.r                        # the rank used (derived from the budget when r and ratio are null)
        self.scores: dict[str, torch.Tensor] = {}   # calibrated importance by module name (taylor, qm-taylor)
        self.calibrated = False
        self.selection: dict[str, list[int]] = {}   # the run's rows by module name (set in setup)

    @property
    def needs_data(self) -> bool:
        return self.config.importance in ("taylor", "qm-taylor")

    # -- which modules, how many rows --------------------------------------------------------------
    def check_model(self, model) -> None:
        if already_adapted(model):
            raise DynatuneError("method=spsft adds row deltas to a plain model, but this one carries peft adapters; "
                                "merge the adapter first (merge_and_unload, or a run's save_merged=true).")

    def target_modules(self, model) -> dict[str, nn.Module]:
        """name -> module: the adapted linears (minus attention in FA mode) and, with norm_ratio, the
        blocks' norms with a weight vector."""
        c = self.config
        lins = target_linears(model, c.targets)
        blocks = find_blocks_path(model)
        if c.freeze_attention:
            lins = {n: m for n, m in lins.items() if not self._in_attention(n[len(blocks) + 1:])}
            if not lins:
                raise DynatuneError("spsft.freeze_attention=true leaves no linear to train (every target is an "
                                    "attention linear); widen spsft.targets.")
        out: dict[str, nn.Module] = dict(lins)
        if c.norm_ratio > 0:
            for n, m in model.named_modules():
                w = getattr(m, "weight", None)
                if n.startswith(blocks + ".") and "norm" in type(m).__name__.lower() \
                        and isinstance(w, torch.Tensor) and w.dim() == 1 \
                        and not (c.freeze_attention and self._in_attention(n[len(blocks) + 1:])):
                    out[n] = m
        return out

    @staticmethod
    def _in_attention(rel: str) -> bool:
        return any(w in part.lower() for part in rel.split(".") for w in ATTENTION_WORDS)

    def rows_for(self, mod: nn.Module) -> int:
        d = mod.out_features if isinstance(mod, nn.Linear) else mod.weight.numel()
        if not isinstance(mod, nn.Linear):
            return max(1, min(d, round(self.config.norm_ratio * d)))
        if self.r is not None:
            return min(self.r, d)
        if self.config.ratio is not None:
            return max(1, min(d, round(self.config.ratio * d)))
        raise DynatuneError("spsft: r and ratio are both null, so r comes from the memory budget; give a budget "
                            "(budget=0.6) or set spsft.r or spsft.ratio.")

    # -- importance ----------------------------------------------------------------------------------
    @staticmethod
    def l2(mod: nn.Module) -> torch.Tensor:
        """Appendix A's magnitude: the l2 norm of each neuron's weight vector (|w| for a norm channel)."""
        w = mod.weight.detach().float()
        return w.norm(dim=1) if w.dim() == 2 else w.abs()

    def select(self, name: str, mod: nn.Module, gen: torch.Generator) -> torch.Tensor:
        """The trained rows of one module: top-r by importance (ties: the lower index), or random."""
        r = self.rows_for(mod)
        d = mod.weight.shape[0]
        imp = self.config.importance
        if imp == "random":
            return torch.randperm(d, generator=gen)[:r]
        if mod.weight.is_meta:
            return torch.arange(r)  # a meta-device model (pricing): shapes only
        if imp == "l2":
            s = self.l2(mod)
        else:
            s = self.scores.get(name)
            if s is None or s.numel() != d:
                return torch.arange(r)  # structure only (the memory model's probe): calibrated on the run's model
        order = torch.sort(s.detach().float().cpu(), descending=True, stable=True).indices
        return order[:r]

    def prepare_model(self, model):
        """Inject a row delta on every target; a model whose selection needed calibration it did not get
        (the memory model's small probe model, a meta model) gets the same structure on the first rows."""
        if row_delta_modules(model):
            return model
        gen = torch.Generator().manual_seed(self.seed)  # fresh per call: the probe's model draws the same way
        structural = False
        chosen = {}
        for name, mod in sorted(self.target_modules(model).items()):
            chosen[name] = self.select(name, mod, gen)
            structural |= self.needs_data and name not in self.scores
        cols = self.dependent_columns(model, chosen) if self.config.dependencies else {}
        for name, mod in sorted(self.target_modules(model).items()):
            rows = chosen[name]
            new = RowDeltaLinear(mod, rows) if isinstance(mod, nn.Linear) else RowDeltaVector(mod, rows, "weight")
            if name in cols:
                new.add_columns(sorted(cols[name]))
            replace_module(model, name, new)
        model._spsft_structure_only = structural
        return model

    def dependent_columns(self, model, rows: dict[str, torch.Tensor]) -> dict[str, set[int]]:
        """Appendix B: for each adapted linear b and its selected rows, the input columns of every other
        adapted linear a that torch-pruning's DependencyGraph puts in the same group (b's output feature
        i is a's input feature j). Other members of a group (other layers' rows, norms, embeddings)
        stay as they are: the paper trains the dependent columns only."""
        try:
            import torch_pruning as tp
        except ImportError:
            raise DynatuneError("spsft.dependencies=true builds dependency groups with torch-pruning, which is not "
                                "installed; install it with pip install 'dynatune[deps]' (or pip install "
                                "torch-pruning).") from None
        lins = {n: m for n, m in self.target_modules(model).items() if isinstance(m, nn.Linear)}
        if any(m.weight.is_meta for m in lins.values()):
            raise DynatuneError("spsft.dependencies=true traces the model, which a meta-device model cannot run; set "
                                "spsft.r or spsft.ratio rather than deriving r from the budget.")
        name_of = {id(m): n for n, m in lins.items()}
        inner = unwrap_peft(model)
        vocab = int(getattr(inner.config, "vocab_size", 100) or 100)
        device = next(model.parameters()).device
        ids = torch.randint(3, max(4, min(vocab, 1000)), (1, 8), generator=torch.Generator().manual_seed(0))
        was = model.training
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            model.eval()
            try:
                graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": ids.to(device)})
            finally:
                model.train(was)
        cols: dict[str, set[int]] = {}
        for b, mod in lins.items():
            group = graph.get_pruning_group(mod, tp.prune_linear_out_channels, idxs=rows[b].tolist())
            for dep, idxs in group:
                a = name_of.get(id(dep.target.module))
                if a is None or a == b or not graph.is_in_channel_pruning_fn(dep.handler):
                    continue
                cols.setdefault(a, set()).update(int(getattr(i, "idx", i)) for i in idxs)
        return cols

    # -- calibration (Taylor, QM-Taylor; the budget's r) ------------------------------------------------
    def calibration_examples(self) -> int:
        return self.config.calibration_examples if self.needs_data else 0

    def _groups(self, model) -> list[list[str]]:
        """Parameter names whose gradients calibration holds at once: every target's, one block's
        (layerwise), or one weight's (streaming: each is reduced to row scores as it accumulates)."""
        mods = self.target_modules(model)
        names = {n: f"{n}.weight" for n in mods}
        if self.config.streaming:
            return [[p] for p in names.values()]
        if self.config.layerwise:
            blocks = find_blocks_path(model)
            by: dict[int, list[str]] = {}
            for n, p in names.items():
                by.setdefault(int(n[len(blocks) + 1:].split(".")[0]), []).append(p)
            return [by[k] for k in sorted(by)]
        return [list(names.values())]

    def calibration_gradients(self, model) -> list[list[str]]:
        return self._groups(model) if self.needs_data else []

    def calibrate(self, model, calibration) -> None:
        c = self.config
        if self.r is None and c.ratio is None and calibration.has_budget:
            if c.dependencies:
                raise DynatuneError("spsft.dependencies=true cannot derive r from the budget (its column counts "
                                    "need a traced model); set spsft.r or spsft.ratio.")
            self.r = self.largest_r(model, calibration)
        if not self.needs_data:
            return
        if not calibration.examples:
            raise DynatuneError("spsft: the calibration phase drew no examples (an empty training set?).")
        mods = self.target_modules(model)
        params = dict(model.named_parameters())
        if c.importance == "qm-taylor":
            by_class: dict[int, list] = {}
            for e in calibration.examples:
                by_class.setdefault(calibration.label_of(e), []).append(e)
            if None in by_class or len(by_class) < 2:
                raise DynatuneError("spsft.importance=qm-taylor needs class labels with at least two classes among "
                                    "the calibration examples (eq. 6 is per class); use importance=taylor.")
            per_class = [self._taylor(model, mods, params, calibration, by_class[t]) for t in sorted(by_class)]
            q = torch.linspace(0, 1, 11, dtype=torch.float64)
            self.scores = {n: torch.quantile(torch.stack([pc[n] for pc in per_class]), q, dim=0).mean(0)
                           for n in mods}
        else:
            self.scores = self._taylor(model, mods, params, calibration, calibration.examples)
        self.calibrated = True

    def _taylor(self, model, mods, params, calibration, examples) -> dict[str, torch.Tensor]:
        """Appendix A: eta_i = sum_j |mean_x dL(x)/dw_ij * w_ij| per row i (float64 on the host), or the
        streaming sum over micro-batches of |dL_b/dw_ij * w_ij| weighted by each one's share."""
        n_total = len(examples)
        scores: dict[str, torch.Tensor] = {}
        for group in self._groups(model) if not self.config.streaming else [[f"{n}.weight" for n in mods]]:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
            acc = {pn: torch.zeros(params[pn].shape[0], dtype=torch.float64, device=params[pn].device) for pn in group}
            handles = []
            for pn in group:
                w = params[pn]
                w.requires_grad_(True)
                if self.config.streaming:
                    def hook(p, pn=pn):
                        t = (p.grad * p.detach()).abs()
                        acc[pn] += (t.sum(1) if t.dim() == 2 else t).double()
                        p.grad = None  # reduced to row scores at once: no gradient buffer
                    handles.append(w.register_post_accumulate_grad_hook(hook))
            try:
                for batch in calibration.batches(examples):
                    # weighted by its share of the examples: accumulated, the gradient of the mean loss;
                    # streaming, each micro-batch's |g_b x w| counts by its share
                    (calibration.loss(model, batch) * (len(batch) / n_total)).backward()
            finally:
                for h in handles:
                    h.remove()
            for pn in group:
                w = params[pn]
                if not self.config.streaming:
                    g = w.grad if w.grad is not None else torch.zeros_like(w)
                    t = (g * w.detach()).abs()
                    acc[pn] = (t.sum(1) if t.dim() == 2 else t).double()
                w.grad = None
                w.requires_grad_(False)
                scores[pn[:-len(".weight")]] = acc[pn].cpu()
        return scores

    def largest_r(self, model, calibration) -> int:
        """The largest r (rows per linear) whose plan the memory model admits under the run's budget:
        bisection over r, each priced on a meta-device copy with deltas of that r (saved activations
        do not depend on r, so one probe serves every candidate)."""
        inner = unwrap_peft(model)
        cfg = copy.deepcopy(inner.config)
        cls = type(inner)
        dtype = next(inner.parameters()).dtype
        probe = {}

        def peak(r: int) -> int:
            with torch.device("meta"):
                meta = cls._from_config(cfg)
            meta.to(dtype)
            keep = self.r
            self.r = r
            try:
                self.prepare_model(meta)
                mm = calibration.memory_model(meta, self.prepare_model)
                if "probe" in probe:
                    mm.probe = probe["probe"]
                else:
                    probe["probe"] = mm.probe
                from ..units import partition
                units = partition(meta, "adapter")
                plan = Plan.of({u.name for u in units.of_kind("adapter")} |
                               ({u.name for u in units.fresh_heads} if self.config.train_head else set()))
                return mm.predict(plan).predicted_peak_bytes
            finally:
                self.r = keep

        hi = max(m.out_features for m in self.target_modules(model).values() if isinstance(m, nn.Linear))
        if peak(1) > calibration.usable:
            p = peak(1)
            raise BudgetError(f"spsft: one row per linear is predicted at {p} bytes, above the budget's usable "
                              f"{calibration.usable} bytes; raise the budget, lower batch_size or max_length, or "
                              "use freeze_attention=true.", predicted_bytes=p, budget_bytes=calibration.budget_bytes)
        lo, best = 1, 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if peak(mid) <= calibration.usable:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    # -- the run ---------------------------------------------------------------------------------------
    def setup(self, tuner) -> None:
        super().setup(tuner)
        if getattr(tuner.model, "_spsft_structure_only", False) or (self.needs_data and not self.calibrated):
            raise DynatuneError(f"spsft.importance={self.config.importance} chooses rows from calibration batches, "
                                "which this model has not seen; train with dynatune's loop (it runs the calibration "
                                "phase), or pass calibration data to integrations.hf.prepare.")
        self.modules = [u.name for u in self.units.of_kind("adapter")]
        if not self.modules:
            raise DynatuneError("spsft found no row deltas in the model.")
        self.selection = {n: m.spsft_rows.tolist() for n, m in sorted(row_delta_modules(tuner.model).items())}

    def plan(self, step: int) -> Plan:
        return self.smallest_plan(self.units)

    def smallest_plan(self, units) -> Plan:
        return Plan.of({u.name for u in units.of_kind("adapter")} | self.fresh_heads(units))

    def largest_plan(self, units) -> Plan:
        return self.smallest_plan(units)

    def cheaper_settings(self, largest: bool) -> tuple[str, ...]:
        return ("spsft.r", "spsft.ratio")

    def log_fields(self, step: int) -> dict:
        if step != 0:
            return {}
        return {"r": self.r, "rows": {n: len(v) for n, v in self.selection.items()}}

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "r": self.r, "selection": self.selection}

    def load_state_dict(self, sd):
        """The checkpoint's rows replace this run's own choice (the checkpoint's W_f belong to them), so a
        resume is exact even from a base whose importance would now pick other rows."""
        super().load_state_dict(sd)
        mods = row_delta_modules(self.tuner.model)
        saved = sd["selection"]
        if set(saved) != set(mods) or any(len(saved[n]) != mods[n].r for n in mods):
            raise DynatuneError("spsft: the checkpoint's row deltas do not match this model's (other targets or r); "
                                "resume with the run's own config.")
        with torch.no_grad():
            for n, m in mods.items():
                getattr(m, ROWS).copy_(torch.tensor(saved[n], dtype=torch.long))
        self.selection = {n: list(v) for n, v in saved.items()}
        self.r = sd["r"]

    # -- output ----------------------------------------------------------------------------------------
    def export(self, model, out_dir, tokenizer=None, merged=False):
        """`export=merged`: the deltas merged into their weights and the plain modules put back, saved
        with save_pretrained (safetensors). `export=deltas`: spsft_deltas.safetensors (each module's
        rows and W_f, and the fresh task head) with spsft_config.json naming the base model; `merged`
        also writes the merged model under out_dir/merged."""
        out_dir = Path(out_dir)
        if self.config.export == "merged":
            super().export(unwrap_all(model), out_dir, tokenizer)
            return
        from safetensors.torch import save_file

        inner = unwrap_peft(model)
        if not inner.name_or_path:
            raise DynatuneError("the deltas cannot name their base model: model.name_or_path is empty; set it to "
                                "the base model's directory before saving.")
        tensors, modules = {}, {}
        for name, mod in sorted(row_delta_modules(model).items()):
            tensors[f"{name}.{ROWS}"] = getattr(mod, ROWS)
            tensors[f"{name}.{DELTA}"] = getattr(mod, DELTA)
            if isinstance(mod, RowDeltaLinear) and mod.cols is not None:
                tensors[f"{name}.{COLS}"] = mod.cols
                tensors[f"{name}.{COL_DELTA}"] = getattr(mod, COL_DELTA)
            modules[name] = "linear" if isinstance(mod, RowDeltaLinear) else "vector"
        params = dict(model.named_parameters())
        for p in (p for u in self.units.fresh_heads for p in u.param_names):
            tensors[p] = params[p]
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out_dir / DELTAS_FILE,
                  metadata={"format": "pt"})
        (out_dir / DELTAS_CONFIG).write_text(json.dumps(
            {"base_model_name_or_path": inner.name_or_path, "modules": modules,
             "heads": sorted(p for u in self.units.fresh_heads for p in u.param_names),
             "config": inner.config.to_dict()}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        if merged:
            super().export(unwrap_all(model), out_dir / "merged", tokenizer)

