"""TriMS (Train, Freeze or Exit): three-state block scheduling under a memory budget.

Every block is trainable (1), frozen (0) or exited (-1). Under the paper's contiguity constraint
the whole configuration is a state (l, r, e, n), 1 <= l <= r <= e <= n (1-based, as in the
paper): blocks l..r train, blocks below l are frozen, blocks l..e are on the backward path and
blocks after e are exited (e = n when nothing exits). Every `tau` steps one of seven actions moves
one boundary by one block:

    LS l+1   LE l-1   RS r-1   RE r+1   PU e+1   PO e-1   CON (stay)

Actions that break 1 <= l <= r <= e <= n are filtered (structure); with a budget, an action whose
plan the memory model prices above budget * (1 - margin) is filtered too. Each remaining action
is scored by eq. 8,

    U(s, a) = -v/L_i - lambda_M (m - m_i)/m_i - lambda_T (t - t_i)/t_i,

with the memory and time estimates (m, t) of eq. 4-5, memory calibrated against what the last
period measured (Operation 2), and the predicted loss change v from activation-gradient strengths
g(j) and sensitivities kappa (Operation 1). The best-scoring action is taken. Time is priced by
eq. 5's sums alone (option `time`, default 'model'), so no decision reads a clock and a resumed
run takes the straight run's actions; `time=measured` calibrates it against measured step times
as the paper does, at the price of reproducibility.

Mapping to a dynatune Plan (0-based unit names): update = block.{l-1} .. block.{r-1} + the final
norm/pooler (option `train_norm`) + a fresh task head; probe = block.{l-2} (the gradient at block
l-1's output, read without updating it); exit_depth = e (None when e = n). docs/methods/trims.md
records every reading of the paper made here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Optional

import torch

from ..errors import BudgetError, DynatuneError
from ..plan import Plan
from ..units import get_submodule, unwrap_peft
from .base import Method, MethodConfig, opt, register

ACTIONS = ("LS", "LE", "RS", "RE", "PU", "PO", "CON")
# Ties in the utility go to the first action in this order: no change without a reason.
TIE_ORDER = ("CON", "LE", "RE", "PU", "LS", "RS", "PO")
# Which sensitivity an action uses (Operation 1) and updates (Operation 2).
KAPPA_OF = {"LE": "exp", "RE": "exp", "LS": "shr", "RS": "shr", "PU": "ext", "PO": "ext"}
# Sign of the predicted loss change (Operation 1 as printed): expanding lowers the loss, shrinking
# raises it, pushing the exit back adds a frozen block between the trainable window and the head
# (raises it) and popping the exit removes one (lowers it).
SIGN_OF = {"LE": -1.0, "RE": -1.0, "LS": +1.0, "RS": +1.0, "PU": +1.0, "PO": -1.0}

State = tuple[int, int, int, int]


def valid(state: State) -> bool:
    """The contiguity constraint 1 <= l <= r <= e <= n."""
    l, r, e, n = state
    return 1 <= l <= r <= e <= n


def transition(state: State, action: str) -> State | None:
    """Table 1: the state an action leads to, or None where the result breaks the constraint."""
    l, r, e, n = state
    new = {"LS": (l + 1, r, e, n), "LE": (l - 1, r, e, n), "RS": (l, r - 1, e, n), "RE": (l, r + 1, e, n),
           "PU": (l, r, e + 1, n), "PO": (l, r, e - 1, n), "CON": (l, r, e, n)}[action]
    return new if valid(new) else None


def touched(state: State, action: str) -> int | None:
    """The (1-based) block an action changes; its gradient strength prices the action."""
    l, r, e, n = state
    return {"LS": l, "LE": l - 1, "RS": r, "RE": r + 1, "PU": e + 1, "PO": e, "CON": None}[action]


def ema(prev: float, new: float, beta: float) -> float:
    """Eq. 7: beta * prev + (1 - beta) * new."""
    return beta * prev + (1.0 - beta) * new


@dataclass
class TrimsConfig(MethodConfig):
    preset: str = opt("dynatune", "'dynatune': the defaults below; 'paper': the paper's settings exactly (start=last, "
                                  "con=last, exits=on, time=measured); an option set explicitly overrides either "
                                  "preset")
    start: Optional[str] = opt(None, "the first state: 'fit' (dynatune): the largest top window that the budget "
                                     "admits, held for two periods while the signals warm up; 'last' (paper): only "
                                     "the last block trains and the first action is LE")
    con: Optional[str] = opt(None, "CON's predicted loss change: 'last' (paper, and the default): L_i - L_{i-1}; "
                                   "'trend': the slope of the last trend_periods period losses (no measurable "
                                   "difference on validation: docs/methods/trims.md)")
    trend_periods: int = opt(4, "periods the CON trend is fitted over (con=trend)")
    tau: int = opt(10, "selection period: steps between two actions (the paper's tau)")
    alpha: float = opt(0.1, "sensitivity spread between expand, shrink and exit coefficients (alpha, eq. 6)")
    beta: float = opt(0.9, "EMA weight of the old value (beta, eq. 7): gradient strengths, alpha_m, alpha_t, kappa")
    eta: float = opt(0.99, "decay of the gradient strength of blocks outside [l-1, e], and of every kappa after CON")
    lambda_m: float = opt(0.1, "weight of the relative memory change in the utility (lambda_M, eq. 8)")
    lambda_t: float = opt(0.1, "weight of the relative time change in the utility (lambda_T, eq. 8)")
    kappa_init: str = opt("text", "'text': kappa_shr=(1+alpha)kappa_exp, kappa_ext=(1-alpha)kappa_exp (the paper's "
                                  "prose); 'eq6': kappa_shr=(1-alpha)kappa_exp, kappa_ext=(1+alpha)kappa_exp (eq. 6)")
    train_norm: bool = opt(True, "the final norm (and a BERT pooler) train with the trainable blocks")
    offload_exited: bool = opt(False, "keep exited blocks' weights in host memory (their weight leaves the device)")
    activation_ratio: float = opt(0.5, "M_A = ratio * M_P per block, used only when no memory model prices plans")
    state_policy: str = opt("drop", "optimizer state of blocks that freeze: drop (paper: frozen blocks hold none), "
                                    "keep or offload")
    exits: Optional[str] = opt(None, "exit actions PU/PO: 'on', 'off', or 'auto' (off when the task head reads the "
                                     "first token, as encoder classifiers do: see docs/methods/trims.md); dynatune "
                                     "preset: 'auto', paper: 'on'")
    time: Optional[str] = opt(None, "how eq. 8 prices time: 'model': eq. 5's sums in mean-block units (forward 1..e, "
                                    "gradient l..e, update l..r, by parameter count), a function of the state alone, "
                                    "so runs and resumes are reproducible; 'measured': the paper's calibration against "
                                    "measured step times (Operation 2), which makes decisions depend on wall-clock "
                                    "time: two runs with one seed, or a run and its resume, may then take different "
                                    "actions; dynatune preset: 'model', paper: 'measured'")


# What each preset sets for the options left unset (None).
PRESETS = {"dynatune": {"start": "fit", "con": "last", "exits": "auto", "time": "model"},
           "paper": {"start": "last", "con": "last", "exits": "on", "time": "measured"}}


@register
class Trims(Method):
    name = "trims"
    Config = TrimsConfig
    signals = ("act_grad_norm",)
    summary = ("TriMS: a contiguous window of trainable blocks and an early exit, moved every tau steps by the "
               "action with the best loss/memory/time utility that fits the budget")
    default_lr = 1e-4
    default_budget = "0.6"  # TriMS schedules under a budget: 60% of full fine-tuning's predicted peak
    schedules_under_budget = True

    def __init__(self, config=None, seed=0):
        super().__init__(config, seed)
        c = self.config
        if c.preset not in PRESETS:
            raise DynatuneError(f"trims.preset must be 'dynatune' or 'paper', got '{c.preset}'.")
        self.config = c = replace(c, **{k: v for k, v in PRESETS[c.preset].items() if getattr(c, k) is None})
        if c.start not in ("fit", "last"):
            raise DynatuneError(f"trims.start must be 'fit' or 'last', got '{c.start}'.")
        if c.con not in ("trend", "last"):
            raise DynatuneError(f"trims.con must be 'trend' or 'last', got '{c.con}'.")
        if c.trend_periods < 2:
            raise DynatuneError(f"trims.trend_periods must be at least 2, got {c.trend_periods}.")
        if c.tau < 1:
            raise DynatuneError(f"trims.tau must be at least 1, got {c.tau}.")
        if c.exits not in ("auto", "on", "off"):
            raise DynatuneError(f"trims.exits must be 'auto', 'on' or 'off', got '{c.exits}'.")
        if c.kappa_init not in ("text", "eq6"):
            raise DynatuneError(f"trims.kappa_init must be 'text' or 'eq6', got '{c.kappa_init}'.")
        if c.time not in ("model", "measured"):
            raise DynatuneError(f"trims.time must be 'model' or 'measured', got '{c.time}'.")
        for k in ("beta", "eta"):
            if not 0.0 <= getattr(c, k) <= 1.0:
                raise DynatuneError(f"trims.{k} must lie in [0, 1], got {getattr(c, k)}.")
        # The clock step times are measured with (None: the tuner's); tests inject a fake one here.
        # Decisions read it only under time=measured; otherwise the times go to the records only.
        self.clock = None
        self.decisions: list[dict] = []
        self.exits_allowed: bool | None = None  # decided in setup, from the model when exits='auto'
        self._ran: dict | None = None  # the state this step runs, and the decision it ended with (log_fields)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, tuner) -> None:
        super().setup(tuner)
        n = self.units.n_blocks
        self.n = n
        # every block, kept here before any exit truncates the model's list (offload moves them)
        self._blocks = list(get_submodule(tuner.model, self.units.blocks_path))
        params = dict(tuner.model.named_parameters())
        block_params = [[params[p] for p in self.units[f"block.{i}"].param_names] for i in range(n)]
        # index 1..n (index 0 unused): the paper's 1-based block numbers
        self.mp = [0.0] + [float(sum(p.numel() * p.element_size() for p in ps)) for ps in block_params]
        counts = [sum(p.numel() for p in ps) for ps in block_params]
        mean = sum(counts) / n
        self.tw = [0.0] + [c / mean for c in counts]  # time shape: parameters relative to a mean block
        top = self._top_units(self.units)
        outside = [p for u in self.units if not u.name.startswith("block.") for p in u.param_names]
        top_params = self.units.param_names(top)
        # eq. 4's M_B before the first measurement: the weights outside the blocks, plus gradient
        # and Adam state of what trains there (head, norm); measurements replace it (Operation 2)
        self.m_base0 = float(sum(params[p].numel() * params[p].element_size() for p in outside)
                             + 3 * sum(params[p].numel() * params[p].element_size() for p in top_params))
        self._top = top
        self.exits_allowed = exits_allowed(self.config.exits, tuner.model)
        self._reset()

    def _reset(self) -> None:
        n = self.n
        self.state: State = (n, n, n, n)  # only the last block trains (section 4.3)
        self.period = 0
        self.g = [0.0] * (n + 1)  # gradient strengths g(j), j = 1..n
        self.g_seen = [False] * (n + 1)
        self.kappa = {"exp": 0.0, "shr": 0.0, "ext": 0.0}
        self.kappa_ready = False
        self.alpha_m, self.m_base, self.mem_ready = 1.0, 0.0, False
        self.alpha_t, self.t_base, self.t_unit = 1.0, 0.0, None  # t_unit: seconds per mean block pass
        self.period_losses: list[float] = []  # L_1 .. L_i: loss_last, loss_prev and CON's trend read them
        self.last_action: str | None = None  # a_{i-1}: the action that led to the current state
        self.prev_state: State | None = None  # the state a_{i-1} was taken from
        self._new_period()
        self.decisions = []

    def _new_period(self) -> None:
        self.acc = {"loss_sum": 0.0, "loss_n": 0, "g_sum": {}, "g_n": {}, "mem": None, "times": []}
        self._t_start: float | None = None

    def candidates(self) -> list[str]:
        return sorted(self.block_units(range(self.n)) | self._top)

    # -- the memory-model interface (the only two ways in) ---------------------------------------
    def predict_peak(self, plan: Plan) -> int | None:
        """The predicted peak bytes of a plan as this run holds it; None when there is no model."""
        return self.tuner.predict_peak(plan)

    def budget_bytes(self) -> int | None:
        return self.tuner.budget_bytes

    def observe_memory(self) -> float | None:
        """This step's measured bytes: the CUDA allocator's peak when there is one, else the
        engine's counted live bytes (None when not counted)."""
        t = self.tuner
        if not t.count_memory:
            return None
        if t.record.measured:
            return float(t.record.measured)
        counted = t.record.counted
        return float(counted) if counted > 0 else None

    def _now(self) -> float:
        return (self.clock or self.tuner.clock)()

    # -- state and plans --------------------------------------------------------------------------
    def state_tuple(self) -> State:
        """(l, r, e, n), 1-based as in the paper."""
        return tuple(self.state)

    def _top_units(self, units) -> set[str]:
        """What trains with every window: the fresh head, and the final norm when train_norm."""
        norm = {u.name for u in units.of_kind("norm", "pooler")} if self.config.train_norm else set()
        return norm | self.fresh_heads(units)

    def smallest_plan(self, units) -> Plan:
        """The cheapest state: l = r = e = 1 (block 1 trains, every later block exited); without
        exits, l = r = e = n (only the last block trains: the paper's starting state)."""
        n = units.n_blocks
        if not self._exits_allowed(units):
            return Plan.of({f"block.{n - 1}"} | self._top_units(units))
        return Plan.of({"block.0"} | self._top_units(units), exit_depth=1 if n > 1 else None)

    def _exits_allowed(self, units) -> bool:
        """setup decides it from the model ('auto'); before setup only the option can say."""
        return self.exits_allowed if self.exits_allowed is not None else self.config.exits != "off"

    def plan_for(self, state: State, note: str = "") -> Plan:
        l, r, e, n = state
        update = self.block_units(range(l - 1, r)) | self._top
        probe = {f"block.{l - 2}"} if l >= 2 else set()
        return Plan.of(update, probe=probe, exit_depth=None if e == n else e, note=note)

    def plan(self, step: int) -> Plan:
        if self.period == 0 and not self.decisions and self._t_start is None and step == 0:
            self._start()
        self._place_blocks()
        p = self.plan_for(self.state, self._note())
        self._ran = {"state": self.state, "decided": None}  # what this step runs (for log_fields)
        self._t_start = self._now()
        return p

    def log_fields(self, step: int) -> dict:
        """Per-step log fields (the engine puts them under `method_log`): the state (l, r, e, n) that
        ran, the plan's predicted peak and the usable budget, and the action when a period ended."""
        ran = self._ran
        if ran is None:
            return {}
        l, r, e, n = ran["state"]
        out = {"l": l, "r": r, "e": e, "n": n}
        pred = self.predict_peak(self.plan_for(ran["state"]))
        if pred is not None:
            out["predicted_peak_bytes"] = pred
        budget = self.budget_bytes()
        if budget is not None:
            out["budget_bytes"] = int(budget)
            out["usable_budget_bytes"] = int(budget * (1.0 - self._margin()))
        d = ran["decided"]
        if d is not None:
            c = d["candidates"][d["action"]]
            out.update(action=d["action"], U=c["U"], v_hat=c["v"], m_hat=c["m"], t_hat=c["t"], next=c["next"])
        return out

    def _note(self) -> str:
        l, r, e, n = self.state
        s = f"l={l} r={r} e={e} n={n}"
        if self.decisions:
            d = self.decisions[-1]
            c = d["candidates"].get(d["action"], {})
            s += f" | {d['action']} U={c.get('U', 0.0):.4g} v={c.get('v', 0.0):.4g} m={c.get('m')} t={c.get('t')}"
            if c.get("pred") is not None:
                s += f" pred={c['pred']}"
        return s

    def _start(self) -> None:
        """The first state. Only the last block training must fit; start=fit then widens the window
        downwards while the budget admits it: a static top-k that fits trains those blocks from the
        first step, and growing one block per period from the last gives away the run's first
        periods (docs/methods/trims.md, "Where the start state comes from")."""
        n = self.n
        budget = self.budget_bytes()
        if budget is not None:
            pred = self.predict_peak(self.plan_for((n, n, n, n)))
            limit = budget * (1.0 - self._margin())
            if pred is not None and pred > limit:
                raise BudgetError(
                    f"TriMS needs at least the last block training, and even that plan is predicted at {pred} "
                    f"bytes, above the budget's usable {int(limit)} bytes; raise the budget.",
                    predicted_bytes=pred, budget_bytes=int(budget))
        self.state = (n, n, n, n)
        if self.config.start == "fit":
            while self.state[0] > 1 and self.admitted((self.state[0] - 1, n, n, n))[0]:
                self.state = (self.state[0] - 1, n, n, n)

    def _margin(self) -> float:
        return float(self.tuner.budget_margin)

    # -- observations -----------------------------------------------------------------------------
    def after_backward(self, step, signals):
        a = self.acc
        for label, v in signals.get("act_grad_norm", {}).items():
            j = self.units[label].depth + 1  # the paper's 1-based block number
            a["g_sum"][j] = a["g_sum"].get(j, 0.0) + float(v)
            a["g_n"][j] = a["g_n"].get(j, 0) + 1
        return None

    def end_step(self, step, loss):
        if loss is None:
            raise DynatuneError("TriMS needs each step's loss: pass it to tuner.end_step(loss).")
        a = self.acc
        a["loss_sum"] += float(loss)
        a["loss_n"] += 1
        if self._t_start is not None:
            # rank 0's clock on every rank: time=measured decisions read it
            a["times"].append(self.tuner.from_main_rank(self._now() - self._t_start))
            self._t_start = None
        m = self.observe_memory()
        if m is not None:
            a["mem"] = m if a["mem"] is None else max(a["mem"], m)
        if (step + 1) % self.config.tau == 0:
            self.end_period(step)

    # -- estimators -------------------------------------------------------------------------------
    def raw_memory(self, state: State) -> float:
        """Eq. 4 without M_B and alpha_m: the memory model's price of the plan, or eq. 4's sums."""
        pred = self.predict_peak(self.plan_for(state))
        if pred is not None:
            return float(pred)
        l, r, e, n = state
        mp = self.mp
        weights = sum(mp[1:(e if self.config.offload_exited else n) + 1])
        acts = self.config.activation_ratio * sum(mp[l:e + 1])
        grads_states = 3.0 * sum(mp[l:r + 1])  # M_G = M_P, M_O = 2 M_P (Adam's two moments)
        return weights + acts + grads_states

    def raw_time(self, state: State) -> float:
        """Eq. 5's sums in mean-block units: forward 1..e, gradient propagation l..e, update l..r."""
        l, r, e, n = state
        tw = self.tw
        return sum(tw[1:e + 1]) + sum(tw[l:e + 1]) + sum(tw[l:r + 1])

    def memory_hat(self, state: State) -> float:
        """M^(s) = M_B + alpha_m * (eq. 4 sums)."""
        if self.mem_ready:
            base = self.m_base
        else:  # the memory model's price includes its own base; eq. 4's sums do not
            base = 0.0 if self.predict_peak_available() else self.m_base0
        return base + self.alpha_m * self.raw_memory(state)

    def predict_peak_available(self) -> bool:
        return self.tuner.has_memory_model

    def time_hat(self, state: State) -> float | None:
        """T^(s). time=model: eq. 5's sums in mean-block units (T_B = 0, alpha_t = 1), a function of
        the state alone. time=measured: T_B + alpha_t * t_unit * (eq. 5 sums) in seconds, None before
        the first period sets the time scale."""
        if self.config.time == "model":
            return self.raw_time(state)
        if self.t_unit is None:
            return None
        return self.t_base + self.alpha_t * self.t_unit * self.raw_time(state)

    def estimate(self, action: str, state: State | None = None) -> tuple[float, float | None, float]:
        """Operation 1: (m^, t^, v^) of taking `action` from `state` (default: the current one)."""
        s = self.state if state is None else state
        new = transition(s, action)
        if new is None:
            raise DynatuneError(f"action {action} is not possible from state {s}.")
        m_hat, t_hat = self.memory_hat(new), self.time_hat(new)
        if action == "CON":
            v_hat = self.loss_trend()
        else:
            v_hat = SIGN_OF[action] * self.kappa[KAPPA_OF[action]] * self.g[touched(s, action)]
        return m_hat, t_hat, v_hat

    @property
    def loss_last(self) -> float | None:
        """L_i, the mean loss of the period that just ended."""
        return self.period_losses[-1] if self.period_losses else None

    @property
    def loss_prev(self) -> float | None:
        """L_{i-1}."""
        return self.period_losses[-2] if len(self.period_losses) > 1 else None

    def loss_trend(self) -> float:
        """CON's predicted loss change: L_i - L_{i-1} (con=last, the paper), or the least-squares slope
        of the last `trend_periods` period losses (con=trend), which damps one noisy period; on the
        TriMS table's validation splits it changed nothing measurable, so the paper's form is the default."""
        if self.loss_prev is None:
            return 0.0
        if self.config.con == "last":
            return self.loss_last - self.loss_prev
        ys = self.period_losses[-self.config.trend_periods:]
        xm, ym = (len(ys) - 1) / 2, sum(ys) / len(ys)
        return sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / sum((x - xm) ** 2 for x in range(len(ys)))

    def update_estimators(self, L: float, m: float | None, t: float | None) -> None:
        """Operation 2 for the period that ran in self.state (observations L_i, m_i, t_i)."""
        s, c = self.state, self.config
        # memory: alpha_m <- EMA(alpha_m, (m_i - M_B) / raw(s_i)), then M_B <- m_i - alpha_m raw(s_i)
        if m is not None:
            raw = self.raw_memory(s)
            if not self.mem_ready:  # first period: alpha_m = 1, M_B = m_1 - m^_1
                self.alpha_m, self.m_base, self.mem_ready = 1.0, m - raw, True
            elif raw > 0:
                self.alpha_m = ema(self.alpha_m, (m - self.m_base) / raw, c.beta)
                self.m_base = m - self.alpha_m * raw
        # time (time=measured only): the first period sets the unit (T_B = 0, alpha_t = 1); later
        # ones as for memory. time=model has nothing to calibrate: its estimate is the model itself.
        if t is not None and t > 0 and c.time == "measured":
            raw = self.raw_time(s)
            if self.t_unit is None:
                self.t_unit, self.t_base, self.alpha_t = t / raw, 0.0, 1.0
            else:
                self.alpha_t = ema(self.alpha_t, (t - self.t_base) / (self.t_unit * raw), c.beta)
                self.t_base = t - self.alpha_t * self.t_unit * raw
        # benefit: the sensitivity of the last action's kind, from |L_i - L_{i-1}| / g(touched block)
        a = self.last_action
        if a is None or self.loss_last is None:
            return
        if a != "CON":
            g = self.g[touched(self.prev_state, a)]
        elif self.kappa_ready:
            self.kappa = {k: c.eta * v for k, v in self.kappa.items()}
            return
        elif c.start == "fit":  # the warm-up: the window's loss change over its gradient strength
            g = sum(self.g[j] for j in range(s[0], s[1] + 1) if self.g_seen[j])
        else:  # the paper sets kappa from its first action, never from CON
            return
        if g <= 0:
            return
        ratio = abs(L - self.loss_last) / g
        if not self.kappa_ready:  # eq. 6, from the first action (LE from the initial state, or the warm-up)
            spread = (1 + c.alpha, 1 - c.alpha) if c.kappa_init == "text" else (1 - c.alpha, 1 + c.alpha)
            self.kappa = {"exp": ratio, "shr": spread[0] * ratio, "ext": spread[1] * ratio}
            self.kappa_ready = True
        else:
            k = KAPPA_OF[a]
            self.kappa[k] = ema(self.kappa[k], ratio, c.beta)

    def update_gradients(self, observed: dict[int, float]) -> None:
        """Eq. 7 over [l-1, e] where observed; every other block decays by eta."""
        l, r, e, n = self.state
        c = self.config
        for j in range(1, n + 1):
            if j in observed and max(1, l - 1) <= j <= e:
                self.g[j] = observed[j] if not self.g_seen[j] else ema(self.g[j], observed[j], c.beta)
                self.g_seen[j] = True
            else:
                self.g[j] *= c.eta

    def utility(self, m_hat, t_hat, v_hat, L, m_i, t_i) -> float:
        """Eq. 8."""
        c = self.config
        u = -v_hat / L if L else 0.0
        if m_i:
            u -= c.lambda_m * (m_hat - m_i) / m_i
        if t_i and t_hat is not None:
            u -= c.lambda_t * (t_hat - t_i) / t_i
        return u

    # -- a period ends: observe, calibrate, choose ------------------------------------------------
    def end_period(self, step: int) -> str:
        a = self.acc
        L = a["loss_sum"] / a["loss_n"] if a["loss_n"] else self.loss_last
        m = a["mem"]
        t = median(a["times"]) if a["times"] else None  # a step time robust to one-off stalls
        # time=model: the measured time is recorded, never used (a resume on another machine, or
        # the same run twice, would see other times); eq. 8's t_i is then the model's T^(s_i)
        measured = self.config.time == "measured"
        self.update_gradients({j: a["g_sum"][j] / a["g_n"][j] for j in a["g_sum"]})
        self.update_estimators(L, m, t if measured else None)
        self.period_losses.append(L)  # now L_i: loss_last; the previous one is loss_prev
        m_i = m if m is not None else self.memory_hat(self.state)
        t_i = t if (measured and t is not None) else self.time_hat(self.state)
        action, record = self.choose(L, m_i, t_i)
        record.update(step=step, period=self.period, L=L, m=m, t=t, t_i=t_i, kappa=dict(self.kappa),
                      alpha_m=self.alpha_m, m_base=self.m_base, alpha_t=self.alpha_t, t_base=self.t_base)
        self.decisions.append(record)
        if self._ran is not None:
            self._ran["decided"] = record
        self.prev_state, self.last_action = self.state, action
        self.state = transition(self.state, action)
        self.period += 1
        self._new_period()
        return action

    def admitted(self, state: State) -> tuple[bool, int | None]:
        """Budget filtering: the plan's predicted peak must stay under budget * (1 - margin)."""
        plan = self.plan_for(state)
        pred = self.predict_peak(plan)
        budget = self.budget_bytes()
        if budget is None:
            return True, pred
        price = pred if pred is not None else self.memory_hat(state)
        return price <= budget * (1.0 - self._margin()), pred

    def choose(self, L: float, m_i: float | None, t_i: float | None) -> tuple[str, dict]:
        """Step 1 (filter) and step 2 (argmax of eq. 8). The first action is LE (section 4.3)."""
        s = self.state
        admitted, over, filtered = {}, {}, {}
        for act in TIE_ORDER:
            new = transition(s, act)
            if new is None:
                filtered[act] = "structure"
                continue
            if act in ("PU", "PO") and not self.exits_allowed:
                filtered[act] = "exits off"
                continue
            ok, pred = self.admitted(new)
            m_hat, t_hat, v_hat = self.estimate(act)
            entry = {"U": self.utility(m_hat, t_hat, v_hat, L, m_i, t_i), "v": v_hat, "m": m_hat, "t": t_hat,
                     "pred": pred, "next": list(new)}
            if ok:
                admitted[act] = entry
            else:
                over[act] = entry
                filtered[act] = "budget"
        record = {"state": list(s), "candidates": {**admitted, **over}, "filtered": filtered}
        if self.config.start == "last" and self.last_action is None:  # the first selection: Left Expand, if it fits
            action = "LE" if "LE" in admitted else "CON" if "CON" in admitted else None
            record["forced"] = True
        elif self.config.start == "fit" and not self.kappa_ready:  # warm-up: hold until kappa is known
            action = "CON" if "CON" in admitted else None
            record["forced"] = True
        else:  # max keeps the first of equal utilities: TIE_ORDER
            action = max(admitted, key=lambda k: admitted[k]["U"]) if admitted else None
        if action is None:  # nothing fits: the smallest predicted plan, so the run gets back under
            action = min(over, key=lambda k: over[k]["pred"] if over[k]["pred"] is not None else over[k]["m"])
            record["over_budget"] = True
        record["action"] = action
        return action, record

    # -- exited blocks in host memory -------------------------------------------------------------
    def _place_blocks(self) -> None:
        """With offload_exited, blocks after e live in host memory; the others on the device."""
        if not self.config.offload_exited:
            return
        device = self.tuner.device
        if device.type == "cpu":
            return
        e = self.state[2]
        for j, blk in enumerate(self._blocks):
            move_block(blk, torch.device("cpu") if j >= e else device)

    def restore_blocks(self) -> None:
        """Bring every offloaded block back to the device (before restoring the full block list)."""
        for blk in self._blocks:
            move_block(blk, self.tuner.device)

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "state": list(self.state), "period": self.period, "g": list(self.g),
                "g_seen": list(self.g_seen), "kappa": dict(self.kappa), "kappa_ready": self.kappa_ready,
                "alpha_m": self.alpha_m, "m_base": self.m_base, "mem_ready": self.mem_ready,
                "alpha_t": self.alpha_t, "t_base": self.t_base, "t_unit": self.t_unit,
                "period_losses": list(self.period_losses), "last_action": self.last_action,
                "prev_state": list(self.prev_state) if self.prev_state else None,
                "acc": {**self.acc, "g_sum": dict(self.acc["g_sum"]), "g_n": dict(self.acc["g_n"]),
                        "times": list(self.acc["times"])},
                "decisions": list(self.decisions)}

    @classmethod
    def plots(cls, run_dir, log):
        return [plot_trims(run_dir, log)]

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        if len(sd["g"]) != self.n + 1:
            raise DynatuneError(f"this TriMS checkpoint is for {len(sd['g']) - 1} blocks, the model has {self.n}.")
        self.state = tuple(sd["state"])
        self.period = sd["period"]
        self.g, self.g_seen = list(sd["g"]), list(sd["g_seen"])
        self.kappa, self.kappa_ready = dict(sd["kappa"]), sd["kappa_ready"]
        self.alpha_m, self.m_base, self.mem_ready = sd["alpha_m"], sd["m_base"], sd["mem_ready"]
        self.alpha_t, self.t_base, self.t_unit = sd["alpha_t"], sd["t_base"], sd["t_unit"]
        self.period_losses = list(sd["period_losses"])
        self.last_action = sd["last_action"]
        self.prev_state = tuple(sd["prev_state"]) if sd["prev_state"] else None
        acc = sd["acc"]
        self.acc = {**acc, "g_sum": {int(k): v for k, v in acc["g_sum"].items()},
                    "g_n": {int(k): v for k, v in acc["g_n"].items()}, "times": list(acc["times"])}
        self._t_start = None
        self.decisions = list(sd["decisions"])


# Model types whose sequence-classification head reads the first token ([CLS] / <s>), pooled or not.
FIRST_TOKEN_HEADS = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "mpnet",
                     "deberta", "deberta-v2", "ernie", "megatron-bert", "nezha", "xlm", "funnel", "modernbert"}


def exits_allowed(mode: str, model) -> bool:
    """'auto' turns exits off for encoder classifiers whose head reads the first token: below the
    last block that token may carry almost nothing (sentence encoders trained with mean pooling),
    and an exit then starves the head (docs/methods/trims.md, "Exits and first-token heads")."""
    if mode != "auto":
        return mode == "on"
    base = unwrap_peft(model)  # a peft model: look at what it wraps
    cfg = getattr(base, "config", None)
    is_classifier = type(base).__name__.endswith("ForSequenceClassification")
    return not (is_classifier and getattr(cfg, "model_type", None) in FIRST_TOKEN_HEADS)


def move_block(block: torch.nn.Module, device: torch.device) -> None:
    """Move a block's parameters and buffers in place (the Parameter objects stay the same)."""
    for p in block.parameters():
        if p.device != device:
            p.data = p.data.to(device, non_blocking=device.type != "cpu")
    for mod in block.modules():
        for k, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[k] = b.to(device)


def plot_trims(run_dir, log: list[dict]) -> Path:
    """TriMS's state over steps (figure 3b/c): the trainable window [l, r] shaded, the exit depth e,
    and the action chosen at each period's end; written to run_dir/trims.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in log if (r.get("method_log") or {}).get("l") is not None]
    if not recs:
        raise DynatuneError(f"log.jsonl in '{run_dir}' holds no TriMS state; is it a trims run?")
    steps = [r["step"] + 1 for r in recs]
    l = [r["method_log"]["l"] for r in recs]
    r_ = [r["method_log"]["r"] for r in recs]
    e = [r["method_log"]["e"] for r in recs]
    n = recs[0]["method_log"]["n"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(steps, [x - 0.5 for x in l], [x + 0.5 for x in r_], step="mid", alpha=0.4, label="trainable [l, r]")
    ax.step(steps, e, where="mid", color="black", lw=1.2, label="exit depth e")
    for rec in recs:
        action = rec["method_log"].get("action")
        if action:
            ax.annotate(action, (rec["step"] + 1, rec["method_log"]["e"] + 0.3), fontsize=6, rotation=90)
    ax.set(xlabel="step", ylabel="block (1-based)", ylim=(0.3, n + 1.5), title="TriMS state over steps")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(run_dir) / "trims.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
