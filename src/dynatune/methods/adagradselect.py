"""AdaGradSelect (shared/papers/003) and its gradient-guided selection (the paper's Algorithm 1).

Blocks, as the paper counts them: every transformer block, the embeddings and the final norm
(where the model has one). A pretrained unit outside the blocks that the paper's tied-embedding
models do not have (an untied LM head, a BERT pooler) is one more block of its own. A freshly
initialised task head is outside the count and always trains. With B blocks and a fraction k,
m = max(1, round(k * B)) blocks update per step; k < 1/B is refused (the paper's min% >= 1/B).

- `gradselect` (Algorithm 1): every step, the m blocks with the largest gradient norm update.
  The score of a block is the paper's cumulative norm, the sum of its parameters' L2 gradient
  norms. All blocks receive gradients (they are the plan's `probe_params`), but a streaming
  top-m in post-accumulate-grad hooks keeps at most m+1 blocks' gradients: a block's score is
  known once all its parameters' gradients have arrived; a heap holds the m best complete
  blocks, and the loser (the heap's worst or the newcomer) has its `.grad` freed at once.
- `adagradselect` (Algorithm 2): update counts f per block; p ~ Dirichlet(f + delta); m blocks
  drawn from p without replacement. During epoch 1 a step explores with probability
  eps_t = eps0 * exp(-lambda * t) and then uses gradselect's streaming top-m; from epoch 2 on
  it only exploits. Counts grow with every selection, explored or exploited.

Sampling uses only the method's own CPU Generator in float64 (the global RNG, which dropout
uses, is never touched): Dirichlet = normalised Gamma(alpha_i, 1) draws, with the Gamma drawn
by Marsaglia-Tsang from `torch.randn`/`torch.rand(generator=...)` (alpha < 1 via the boost
Gamma(a) = Gamma(a+1) * U^(1/a), done in log space so small alphas cannot underflow), then
`torch.multinomial(p, m, replacement=False, generator=...)`.

Optimizer state defaults to the `offload` policy (paper §3.3, optim.py + offload.py): every
block's state has a host copy, selected blocks' state is prefetched at plan time on a side
stream, blocks that stay keep theirs resident, blocks that leave are evicted. An exploration
step learns its selection only after backward; the engine fetches the promoted blocks' state
then, and the optimizer step waits for it (`OptimizerStates.ready`).

Per-step fields for plots (`plot_adagradselect`) come from `log_fields`, which the engine
stores as the record's `method_log`: eps, explore, fallback, selected (and block scores on
exploration steps).
"""
from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import BudgetError, DynatuneError
from ..plan import Plan
from ..units import unit_sort_key
from .base import Method, MethodConfig, opt, register

log = logging.getLogger(__name__)


# -- sampling -------------------------------------------------------------------------------------
def log_gamma(alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """log of Gamma(alpha, 1) draws (float64), Marsaglia-Tsang with the given generator only."""
    a = alpha.to(torch.float64).reshape(-1)
    boost = a < 1
    a1 = torch.where(boost, a + 1, a)
    d = a1 - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel())
    while todo.numel():  # acceptance > 95% per round: a few rounds at most
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        dd, cc = d[todo], c[todo]
        v = (1.0 + cc * x) ** 3
        ok = v > 0
        logv = torch.log(torch.where(ok, v, torch.ones_like(v)))
        accept = ok & (torch.log(u) < 0.5 * x * x + dd - dd * v + dd * logv)
        out[todo[accept]] = torch.log(dd[accept]) + logv[accept]
        todo = todo[~accept]
    if bool(boost.any()):
        u = torch.rand(a.numel(), generator=generator, dtype=torch.float64)
        out = torch.where(boost, out + torch.log(u) / a, out)
    return out.reshape(alpha.shape)


def dirichlet(alpha: torch.Tensor, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """n draws p ~ Dirichlet(alpha), shape (n, len(alpha)), float64, rows summing to 1."""
    lg = log_gamma(alpha.to(torch.float64).expand(n, -1).contiguous(), generator)
    return torch.softmax(lg, dim=-1)


def draw_blocks(alpha: torch.Tensor, m: int, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """n independent selections (n, m): p ~ Dirichlet(alpha), then m indices drawn without replacement."""
    p = dirichlet(alpha, generator, n)
    # an underflowed probability must stay drawable (multinomial refuses fewer than m nonzero)
    p = p.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.multinomial(p, m, replacement=False, generator=generator)


# -- streaming top-m over block gradient norms ----------------------------------------------------
class StreamingTopM:
    """Top-m blocks by the sum of their parameters' gradient norms, freeing losers during backward.

    `blocks`: block name -> its parameters, in pool order (ties go to the earlier block).
    `on_grad(name, p)` is called from each parameter's post-accumulate-grad hook. A block is
    complete once every parameter has had its last gradient (`micro_batches` arrivals each; until
    the last micro-batch nothing can be ranked, so nothing is freed). Live gradient bytes of the
    pool are tracked incrementally (`live_bytes`, `peak_live_bytes`, `peak_live_blocks`).
    """

    def __init__(self, blocks: dict[str, list[torch.nn.Parameter]], m: int, micro_batches: int = 1):
        self.blocks = blocks
        self.m = m
        self.micro_batches = max(1, int(micro_batches))
        self.index = {name: i for i, name in enumerate(blocks)}
        self.remaining = {name: len(ps) for name, ps in blocks.items()}
        self.arrivals: dict[int, int] = {}
        self.partial: dict[str, torch.Tensor] = {}
        self.scores: dict[str, float] = {}
        self.heap: list[tuple[float, int, str]] = []  # (score, -index, name): heap[0] is the worst kept
        self.freed: set[str] = set()
        self.overflow = False
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self.live: set[str] = set()
        self.peak_live_blocks = 0

    def on_grad(self, name: str, p: torch.nn.Parameter) -> None:
        n = self.arrivals.get(id(p), 0) + 1
        self.arrivals[id(p)] = n
        if n == 1:
            self.live_bytes += p.grad.numel() * p.grad.element_size()
            self.live.add(name)
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
            self.peak_live_blocks = max(self.peak_live_blocks, len(self.live))
        if name in self.freed or n > self.micro_batches:
            self.overflow = True  # more backward passes than announced: ranking was premature
            return
        if n < self.micro_batches:
            return
        norm = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        self.partial[name] = self.partial[name] + norm if name in self.partial else norm
        self.remaining[name] -= 1
        if self.remaining[name] == 0:
            self._complete(name)

    def _complete(self, name: str) -> None:
        self.rank(name, float(self.partial.pop(name)))  # one host sync per block

    def rank(self, name: str, score: float) -> None:
        self.scores[name] = score
        item = (score, -self.index[name], name)
        if len(self.heap) < self.m:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            self._free(heapq.heapreplace(self.heap, item)[2])
        else:
            self._free(name)

    def _free(self, name: str) -> None:
        for p in self.blocks[name]:
            if p.grad is not None:
                self.live_bytes -= p.grad.numel() * p.grad.element_size()
                p.grad = None
        self.live.discard(name)
        self.freed.add(name)

    def finish(self) -> list[str]:
        """Rank the blocks the hooks could not (a parameter that got no gradient, or fewer backward
        passes than announced) from the gradients they hold now; returns the top m, best first."""
        self.partial.clear()
        for name, ps in self.blocks.items():
            if name not in self.scores:
                self.rank(name, sum(float(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32))
                                     for p in ps if p.grad is not None))
        return [name for _, _, name in sorted(self.heap, reverse=True)]


# -- gradselect -----------------------------------------------------------------------------------
@dataclass
class GradSelectConfig(MethodConfig):
    k: Optional[float] = opt(0.3, "fraction of the blocks updated per step, m = max(1, round(k*B)); at least 1/B "
                                  "(the paper's min% >= 1/B); null = the largest that fits the memory budget")
    state_policy: str = opt("offload", "optimizer state of blocks that leave: offload (default: host copies, "
                                       "prefetched when selected, paper §3.3), keep or drop")


@register
class GradSelect(Method):
    name = "gradselect"
    reads_gradients_in_backward = True  # StreamingTopM ranks (and frees) gradients as they accumulate
    reads_sharded_gradients_after_backward = True  # FSDP2: ranked from the shards once backward is done
    Config = GradSelectConfig
    summary = "the m blocks with the largest gradient norm this step (AdaGradSelect's Algorithm 1), streaming top-m"
    # each block updates only on the steps that select it: the validation sweeps in the README chose
    # 3e-4 to 1e-3 (MiniLM) and 5e-4 (SmolLM2) where full fine-tuning's rate barely moved the loss
    default_lr = 3e-4
    schedules_under_budget = True  # m is checked against (or derived from) the budget at the first plan

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        k = self.config.k
        if k is not None and not (0 < k <= 1):
            raise DynatuneError(f"{self.name}.k={k} must be a fraction in (0, 1] (0.3 = 30% of the blocks), "
                                "or null to derive it from the memory budget.")
        # micro-batches per optimizer step: the loop sets this (cfg.grad_accum) before training
        self.micro_batches = 1
        self.m: int | None = None
        self.last_tracker: StreamingTopM | None = None  # the last exploration's (scores, live bytes)
        self._tracker: StreamingTopM | None = None
        self._step_info: dict = {}
        self._logged: dict = {}  # the last finished step's fields, for log_fields
        self._selected: list[str] | None = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, tuner) -> None:
        super().setup(tuner)
        self.pool = [u.name for u in self.units if not u.fresh]
        B = len(self.pool)
        if B == 0:
            raise DynatuneError(f"{self.name} found no blocks to select from.")
        self.pool_params = {name: [tuner.params[p] for p in self.units[name].param_names] for name in self.pool}
        # FSDP2 hands gradients over as shards after backward: no streaming, every block is ranked then
        self.streaming = not tuner.shards_gradients
        # post-accumulate-grad hooks, registered once (a hook needs requires_grad at registration, and
        # plans toggle it); they forward to this step's StreamingTopM and do nothing on other steps
        self._handles = []
        for name, ps in (self.pool_params.items() if self.streaming else ()):
            for p in ps:
                was = p.requires_grad
                p.requires_grad_(True)
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
                p.requires_grad_(was)
        k = self.config.k
        if k is not None:
            if k < 1.0 / B - 1e-12:
                raise DynatuneError(
                    f"{self.name}.k={k} is below 1/B = 1/{B} = {1.0 / B:.4g}: the model has B={B} blocks "
                    f"(transformer blocks, embeddings, final norm), and AdaGradSelect's rule min% >= 1/B x 100 "
                    f"= {100.0 / B:.2f}% makes every step update at least one block; use k >= {1.0 / B:.4g}.")
            self.m = max(1, round(k * B))
        self._resolved = False

    def configure_loop(self, micro_batches: int, steps_per_epoch: int) -> None:
        self.micro_batches = micro_batches

    def _grad_hook(self, name):
        def hook(p):
            if self._tracker is not None:
                self._tracker.on_grad(name, p)
        return hook

    def close_hooks(self) -> None:
        """Remove the gradient hooks (the engine's close_hooks calls this)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def n_blocks(self) -> int:
        return len(self.pool)

    # -- the memory model (reached only through the tuner's pricing API) -------------------------
    def predict(self, plan: Plan):
        """The memory model's prediction for `plan`, kept optimizer state included (None without a
        memory model). Not tuner.predict_peak: that asks plan_peak, which asks this."""
        return self.tuner.predict(plan)

    def predict_peak(self, plan: Plan) -> int | None:
        pred = self.predict(plan)
        return None if pred is None else pred.predicted_peak_bytes

    def _budget(self) -> int | None:
        """The bytes a plan may be predicted at: budget * (1 - margin); None without a budget."""
        return self.tuner.usable_budget

    def _sizes(self) -> dict[str, int]:
        return {n: sum(p.numel() * p.element_size() for p in ps) for n, ps in self.pool_params.items()}

    def exploration_peak(self, m: int) -> int | None:
        """Predicted peak of a streaming top-m step, at its worst.

        The plan priced: update = fresh head + the m largest blocks (their gradients and optimizer
        state), probe_params = every other block (so all blocks' weights require grad: every block
        is on the backward path and saves its activations as a trainable block does). Streaming
        keeps only one more block's gradient than m, so the gradient bytes of all probed blocks but
        the largest are taken off where the memory model holds every path gradient: its
        `backward_end` phase when the prediction has phases (memory.Prediction), else its
        total (an additive model). Exact for gradients: numel x element size of the parameter.
        With several micro-batches every probed gradient lives until the last one, and under FSDP2
        every probed block's gradient shard lives until backward ends (ranking waits for it): nothing
        is taken off.
        """
        sizes = self._sizes()
        order = sorted(self.pool, key=lambda n: (-sizes[n], self.pool.index(n)))
        pred = self.predict(Plan.of(self.with_head(order[:m]), probe_params=order[m:]))
        if pred is None:
            return None
        freed = sum(sizes[n] for n in order[m + 1:]) if self.micro_batches <= 1 and self.streaming else 0
        phases = pred.phases
        if phases:
            return int(max(v - (freed if name == "backward_end" else 0) for name, v in phases.items()))
        return pred.predicted_peak_bytes - freed

    def exploitation_peak(self, m: int) -> int | None:
        """Predicted peak of the worst m-block plan: for each lowest block (how far backward runs),
        that block plus the m-1 largest blocks above it; the largest prediction."""
        sizes = self._sizes()
        by_depth = sorted(self.pool, key=lambda n: (self.units[n].depth, self.pool.index(n)))
        worst = None
        for i, low in enumerate(by_depth):
            above = sorted(by_depth[i + 1:], key=lambda n: -sizes[n])[:m - 1]
            if len(above) < m - 1:
                break
            peak = self.predict_peak(Plan.of(self.with_head([low, *above])))
            if peak is None:
                return None
            worst = peak if worst is None else max(worst, peak)
        return worst

    def step_peak(self, m: int) -> int | None:
        """The peak that decides whether m blocks fit (gradselect: every step explores)."""
        return self.exploration_peak(m)

    def plan_peak(self, plan: Plan) -> int | None:
        """The engine's budget check asks this first: an exploration plan (every block probed) is
        priced as a streaming step; any other plan is left to the memory model (None)."""
        if self.m is not None and plan.probe_params and plan.probe_params == frozenset(self.pool):
            return self.exploration_peak(self.m)
        return None

    def _resolve(self) -> None:
        """Derive m from the budget (k=null) or check k against it; once, at the first plan."""
        if self._resolved:
            return
        self._resolved = True
        budget = self._budget()
        have_model = self.tuner.has_memory_model
        if self.m is None:
            if budget is None or not have_model:
                raise DynatuneError(f"{self.name}.k=null derives k from the memory budget, but this run has "
                                    f"{'no budget' if budget is None else 'no memory model'}; set k (e.g. 0.3) "
                                    "or give a budget.")
            peak = self.step_peak(1)
            if peak > budget:
                raise BudgetError(f"{self.name}: even one block does not fit the usable budget of {budget} "
                                  f"bytes (predicted {peak} bytes); raise the budget.",
                                  predicted_bytes=peak, budget_bytes=self.tuner.budget_bytes)
            m = 1  # peaks grow with m: the largest m whose prediction fits
            while m < self.n_blocks and self.step_peak(m + 1) <= budget:
                m += 1
            self.m = m
            log.info("%s: k derived from the budget: m=%d of B=%d blocks", self.name, self.m, self.n_blocks)
        elif budget is not None and not have_model:
            log.warning("%s: a budget but no memory model: k=%s is not checked against it", self.name, self.config.k)
        elif budget is not None:
            peak = self.step_peak(self.m)
            if peak > budget:
                raise BudgetError(f"{self.name}.k={self.config.k} updates m={self.m} blocks, predicted to peak at "
                                  f"{peak} bytes, over the usable budget of {budget} bytes; lower k, or k=null "
                                  "to derive it from the budget.", predicted_bytes=peak, budget_bytes=self.tuner.budget_bytes)

    # -- per step --------------------------------------------------------------------------------
    def _explore_plan(self, note: str) -> Plan:
        self._drop_tracker()
        self._tracker = StreamingTopM(self.pool_params, self.m, self.micro_batches)
        return Plan.of(self.with_head(()), probe_params=self.pool, note=note)

    def _drop_tracker(self) -> None:
        self._tracker = None

    def retry_step(self, step: int, micro_batches: int) -> None:
        """An out-of-memory retry splits the step into more micro-batches: rank anew over all of them."""
        if self._tracker is not None:
            self._tracker = StreamingTopM(self.pool_params, self.m, micro_batches)

    def plan(self, step: int) -> Plan:
        self._resolve()
        self._selected = None
        self._step_info = {"explore": True}
        return self._explore_plan(f"explore: top {self.m} of {self.n_blocks} blocks by gradient norm")

    def after_backward(self, step, signals):
        tr = self._tracker
        if tr is None:
            return None
        self._drop_tracker()
        if tr.overflow:
            raise DynatuneError(
                f"{self.name}: a block received gradients from more backward passes than the "
                f"{tr.micro_batches} announced, after its ranking freed some of them; set "
                f"method.configure_loop(micro_batches=grad_accum, ...) before training.")
        if not self.streaming:
            self._rank_shards(tr)
        self._selected = tr.finish()
        self._step_info["scores"] = {n: round(s, 6) for n, s in tr.scores.items()}
        self.last_tracker = tr  # peak live gradient bytes of this step, for inspection
        return frozenset(self._selected)

    def _rank_shards(self, tr: StreamingTopM) -> None:
        """FSDP2: every block's score from its gradient shards, after backward (one all-reduce of
        the squared norms, one host read); the losers' gradients are freed as streaming frees them."""
        held = [(name, p) for name, ps in self.pool_params.items() for p in ps if p.grad is not None]
        norms = self.tuner.squared_norms([p.grad for _, p in held]).sqrt().tolist() if held else []
        scores = dict.fromkeys(self.pool, 0.0)
        for (name, _), norm in zip(held, norms):
            scores[name] += norm
        for name, score in scores.items():
            tr.rank(name, score)

    def end_step(self, step, loss):
        self._drop_tracker()
        if self._selected is not None:
            self._count(self._selected)
        self._step_info["selected"] = sorted(self._selected or ())
        self._logged = self._step_info

    def _count(self, selected) -> None:
        pass

    def log_fields(self, step) -> dict:
        return dict(self._logged)

    @classmethod
    def plots(cls, run_dir, log):
        return [plot_adagradselect(run_dir, log)]

    def state_dict(self):
        return {**super().state_dict(), "m": self.m}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if sd.get("m") is not None:
            self.m = sd["m"]
            self._resolved = True


# -- adagradselect --------------------------------------------------------------------------------
@dataclass
class AdaGradSelectConfig(GradSelectConfig):
    delta: float = opt(1.0, "Dirichlet smoothing: alpha = update counts + delta (> 0); the paper gives no value")
    eps0: float = opt(1.0, "initial exploration probability (step 0 always explores at 1.0, as the paper's Fig. 2)")
    decay: Optional[float] = opt(None, "lambda in eps_t = eps0 * exp(-lambda * t); null = 5 / steps_per_epoch "
                                       "(eps falls to e^-5 ~ 0.7% by the end of epoch 1)")
    steps_per_epoch: int = opt(0, "optimizer steps in one epoch (epoch 1 explores, later epochs only exploit); "
                                  "0 = set by the training loop")


@register
class AdaGradSelect(GradSelect):
    name = "adagradselect"
    Config = AdaGradSelectConfig
    summary = ("m blocks drawn from Dirichlet(update counts + delta); eps-greedy gradient top-m in epoch 1; "
               "optimizer state offloaded to host and prefetched")

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        c = self.config
        if not c.delta > 0:
            raise DynatuneError(f"adagradselect.delta={c.delta} must be > 0 (it keeps every block drawable).")
        if not 0 <= c.eps0 <= 1:
            raise DynatuneError(f"adagradselect.eps0={c.eps0} must be a probability in [0, 1].")
        if c.decay is not None and c.decay < 0:
            raise DynatuneError(f"adagradselect.decay={c.decay} must be >= 0.")
        if c.steps_per_epoch < 0:
            raise DynatuneError(f"adagradselect.steps_per_epoch={c.steps_per_epoch} must be >= 0.")
        # optimizer steps in epoch 1: from the config, or set by the training loop when that is 0
        self.steps_per_epoch = c.steps_per_epoch
        self.counts: dict[str, int] = {}
        self._explore_fits: bool | None = None

    def setup(self, tuner) -> None:
        super().setup(tuner)
        self.counts = {n: 0 for n in self.pool}

    def configure_loop(self, micro_batches: int, steps_per_epoch: int) -> None:
        super().configure_loop(micro_batches, steps_per_epoch)
        if self.config.steps_per_epoch == 0:  # the config's value wins when it sets one
            self.steps_per_epoch = steps_per_epoch

    def step_peak(self, m: int) -> int | None:
        return self.exploitation_peak(m)  # exploration steps that would not fit fall back

    def explore_fits(self) -> bool:
        """Whether a streaming top-m step fits the budget (True without a budget or memory model)."""
        if self._explore_fits is None:
            budget = self._budget()
            peak = self.exploration_peak(self.m) if budget is not None else None
            self._explore_fits = peak is None or peak <= budget
            if not self._explore_fits:
                log.info("adagradselect: an exploration step (m=%d) is predicted at %d bytes, over the budget "
                         "of %d; exploration steps fall back to exploitation", self.m, peak, budget)
        return self._explore_fits

    def epsilon(self, step: int) -> float:
        """Exploration probability of `step` (0 from epoch 2 on)."""
        spe = self.steps_per_epoch
        if not spe or spe <= 0:
            raise DynatuneError("adagradselect needs the number of steps in an epoch: set "
                                "adagradselect.steps_per_epoch, or train through dynatune's loop or Trainer callback (they set it).")
        if step >= spe:
            return 0.0
        lam = self.config.decay if self.config.decay is not None else 5.0 / spe
        return self.config.eps0 * math.exp(-lam * step)

    def alpha(self) -> torch.Tensor:
        return torch.tensor([self.counts[n] + self.config.delta for n in self.pool], dtype=torch.float64)

    def plan(self, step: int) -> Plan:
        self._resolve()
        self._drop_tracker()
        self._selected = None
        eps = self.epsilon(step)
        explore = fallback = False
        if step < self.steps_per_epoch:  # epoch 1: one uniform draw per step, explored or not
            explore = bool(torch.rand((), generator=self.generator, dtype=torch.float64) < eps)
            if explore and not self.explore_fits():
                explore, fallback = False, True
                log.info("adagradselect step %d: exploration over budget, exploiting instead", step)
        self._step_info = {"eps": eps, "explore": explore, "fallback": fallback}
        if explore:
            return self._explore_plan(f"explore eps={eps:.4g}: top {self.m} of {self.n_blocks} by gradient norm")
        idx = draw_blocks(self.alpha(), self.m, self.generator)[0].tolist()
        self._selected = [self.pool[i] for i in idx]
        note = ("explore over budget -> exploit" if fallback else "exploit") + f" eps={eps:.4g}"
        return Plan.of(self.with_head(self._selected), note=f"{note}: {sorted(self._selected)}")

    def _count(self, selected) -> None:
        for n in selected:
            self.counts[n] += 1

    def state_dict(self):
        return {**super().state_dict(), "counts": dict(self.counts), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if set(sd["counts"]) != set(self.counts):
            raise DynatuneError("the checkpoint's adagradselect counts name other blocks than this model has; "
                                "resume with the same model and method.")
        self.counts = {n: int(sd["counts"][n]) for n in self.pool}
        if not self.steps_per_epoch:
            self.steps_per_epoch = sd.get("steps_per_epoch", 0)


# -- plots ----------------------------------------------------------------------------------------
def plot_adagradselect(run_dir, recs: list[dict], out: str | Path | None = None) -> Path:
    """Per-block update frequency, epsilon over steps (explored steps marked), and device-resident
    optimizer bytes with host<->device traffic per step, from the run's log records (report.read_log);
    one PNG (default run_dir/adagradselect.png)."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    if not recs:
        raise DynatuneError(f"log.jsonl in '{run_dir}' has no records yet.")
    steps = [r["step"] for r in recs]
    freq: dict[str, int] = {}
    for r in recs:
        sel = (r.get("method_log") or {}).get("selected")
        for n in (sel if sel is not None else r.get("update", ())):
            freq[n] = freq.get(n, 0) + 1
    names = sorted(freq, key=unit_sort_key)

    fig = Figure(figsize=(8, 9), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1)
    ax1.bar(range(len(names)), [freq[n] for n in names])
    ax1.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax1.set(ylabel="steps updated", title=f"per-block update frequency ({len(recs)} steps)")

    eps = [(r.get("method_log") or {}).get("eps") for r in recs]
    if any(e is not None for e in eps):
        ax2.plot(steps, [e if e is not None else float("nan") for e in eps], lw=1, label="epsilon")
    xs = [r["step"] for r in recs if (r.get("method_log") or {}).get("explore")]
    ax2.scatter(xs, [1.02] * len(xs), marker="|", color="C3", label="explored")
    fb = [r["step"] for r in recs if (r.get("method_log") or {}).get("fallback")]
    if fb:
        ax2.scatter(fb, [1.06] * len(fb), marker="x", color="C1", label="explore over budget -> exploit")
    ax2.set(ylabel="epsilon", title="exploration probability", ylim=(-0.02, 1.1))
    ax2.legend(loc="upper right", fontsize=8)

    counted = all(r.get("memory") for r in recs)  # count_memory=false (and FSDP2) logs no counted bytes
    if counted:
        ax3.plot(steps, [r["memory"]["optimizer"] / 2**20 for r in recs], lw=1, label="device optimizer state")
    ax3.set(xlabel="step", ylabel="MiB resident", title="optimizer state on the device, and traffic")
    tw = ax3.twinx()
    tw.bar(steps, [r.get("bytes_moved", 0) / 2**20 for r in recs], color="C2", alpha=0.4, label="bytes moved")
    tw.set_ylabel("MiB moved host<->device")
    if counted:
        ax3.legend(loc="upper left", fontsize=8)
    tw.legend(loc="upper right", fontsize=8)
    path = Path(out) if out is not None else run_dir / "adagradselect.png"
    fig.savefig(path, dpi=110)
    return path
