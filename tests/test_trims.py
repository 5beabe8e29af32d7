"""TriMS: actions and filtering, Operation 1 and 2 by hand, decisions driven by signals, the budget,
exact resume, and end-to-end fits on tiny models.

Time and memory are injected so every decision is reproducible: a fake clock whose step time is
a function of the state (read by decisions only under time=measured; the default time=model prices
time by eq. 5's sums), and a fake memory model that prices a plan as
base + w * (blocks on the backward path) + g * (trainable blocks) - x * (exited blocks).
"""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dynatune import checkpoint
from dynatune.cli import main
from dynatune.engine import Tuner
from dynatune.errors import DynatuneError
from dynatune.loop import fit
from dynatune.methods import METHODS, build_method
from dynatune.methods.trims import ACTIONS, Trims, TrimsConfig, move_block, transition, valid

from tiny import VOCAB, causal_lm, classifier, collate, loop_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


# -- fakes ----------------------------------------------------------------------------------------
def _blocks(names):
    return [int(u.split(".")[1]) for u in names if u.startswith("block.")]


class FakeMemoryModel:
    """base + w*(blocks on the backward path) + g*(trainable blocks) - x*(exited blocks).

    The backward path runs from the lowest updated-or-probed block to the exit."""

    def __init__(self, n, base=40, w=5, g=10, x=2):
        self.n, self.base, self.w, self.g, self.x = n, base, w, g, x

    def price(self, plan):
        e = plan.exit_depth or self.n
        lo = min(_blocks(plan.update | plan.probe))
        return self.base + self.w * (e - lo) + self.g * len(_blocks(plan.update)) - self.x * (self.n - e)

    def predict(self, plan, kept_state=()):  # TriMS drops state: nothing is kept
        price = self.price(plan)  # one quantity: the fake prices counted and peak alike
        return SimpleNamespace(predicted_peak_bytes=price, predicted_counted_bytes=price)

    def full(self):
        return self.base + (self.w + self.g) * self.n


class FakeClock:
    """A step lasts speed * (base + e + gp (e - l + 1) + up (r - l + 1)) (forward, backward, update):
    TriMS reads the clock twice per step (plan and end_step), each read advances half of it."""

    def __init__(self, method, base=4.0, speed=1.0, gp=1.0, up=1.0):
        self.method, self.base, self.speed, self.gp, self.up, self.t = method, base, speed, gp, up, 0.0

    def __call__(self):
        l, r, e, n = self.method.state_tuple()
        self.t += 0.5 * self.speed * (self.base + e + self.gp * (e - l + 1) + self.up * (r - l + 1))
        return self.t


# Another machine: 20 times faster, and backward and updates weigh more against the forward pass,
# so the step times of the plans compare differently too.
FASTER = dict(speed=0.05, gp=2.0, up=4.0)


def make(n=8, budget=None, memory_model=True, count_memory=False, **cfg):
    """A TriMS method on a real tuner over a tiny llama with n blocks (plans are really applied)."""
    m = Trims(TrimsConfig(**{"start": "last", "con": "last", **cfg}))  # the paper's start unless a test says otherwise
    t = Tuner(causal_lm(num_hidden_layers=n), m, count_memory=count_memory)
    if memory_model:
        t.memory_model = FakeMemoryModel(n)
    if budget is not None:
        t.budget_bytes = budget
    m.clock = FakeClock(m)
    return t, m


def drive(t, m, steps, loss_fn, grad_fn):
    """Run the method against recorded traces: each step's plan is applied by the engine, the
    blocks on its backward path report grad_fn(step, j) (1-based j), and the loss is
    loss_fn(step, state). Returns the actions and the predicted peak of every step's plan."""
    preds = []
    for step in range(steps):
        plan = m.plan(step)
        t.apply(plan)
        if getattr(t, "memory_model", None) is not None:
            preds.append(t.memory_model.price(plan))
        e = plan.exit_depth or m.n
        lo = min(_blocks(plan.update | plan.probe))
        m.after_backward(step, {"act_grad_norm": {f"block.{i}": grad_fn(step, i + 1) for i in range(lo, e)}})
        m.end_step(step, loss_fn(step, m.state_tuple()))
    return [d["action"] for d in m.decisions], preds


# -- actions, plans, filtering ----------------------------------------------------------------------
def test_registered_with_paper_defaults():
    assert METHODS["trims"] is Trims
    c = build_method("trims").config
    assert (c.tau, c.alpha, c.beta, c.eta, c.lambda_m, c.lambda_t) == (10, 0.1, 0.9, 0.99, 0.1, 0.1)
    assert c.kappa_init == "text" and c.state_policy == "drop" and c.time == "model"
    with pytest.raises(DynatuneError, match="trims.time must be 'model' or 'measured'"):
        Trims(TrimsConfig(time="wall"))
    with pytest.raises(DynatuneError, match="kappa_init"):
        Trims(TrimsConfig(kappa_init="eq7"))
    with pytest.raises(DynatuneError, match="trims.exits must be 'auto', 'on' or 'off'"):
        Trims(TrimsConfig(exits="maybe"))


def test_each_action_transition():
    s = (3, 5, 6, 8)
    assert {a: transition(s, a) for a in ACTIONS} == {
        "LS": (4, 5, 6, 8), "LE": (2, 5, 6, 8), "RS": (3, 4, 6, 8), "RE": (3, 6, 6, 8),
        "PU": (3, 5, 7, 8), "PO": (3, 5, 5, 8), "CON": (3, 5, 6, 8)}


@pytest.mark.parametrize("state,impossible", [
    ((1, 3, 5, 8), {"LE"}),               # nothing below block 1
    ((4, 4, 6, 8), {"LS", "RS"}),         # a one-block window cannot shrink
    ((2, 6, 6, 8), {"RE", "PO"}),         # r = e: no room to expand right, nor to pop the exit
    ((2, 4, 8, 8), {"PU"}),               # nothing exits: no exit to push
    ((8, 8, 8, 8), {"LS", "RS", "RE", "PU", "PO"}),  # the initial state: only LE and CON
    ((1, 1, 1, 1), {"LS", "LE", "RS", "RE", "PU", "PO"}),
])
def test_structural_filtering(state, impossible):
    assert {a for a in ACTIONS if transition(state, a) is None} == impossible
    for a in ACTIONS:
        new = transition(state, a)
        assert new is None or valid(new)
    if state[3] == 8:  # the same filter inside a real selection
        t, m = make()
        m.state = state
        m.last_action = "CON"
        _, record = m.choose(2.0, 100.0, 10.0)
        assert {a for a, why in record["filtered"].items() if why == "structure"} == impossible
        assert set(record["candidates"]) == set(ACTIONS) - impossible


def test_plan_of_a_state():
    t, m = make()
    p = m.plan_for((3, 5, 6, 8))
    assert p.update == {"block.2", "block.3", "block.4", "norm"}  # tied lm head: no fresh head
    assert p.probe == {"block.1"}  # block l-1 = 2 (1-based) is probed at its output
    assert p.exit_depth == 6
    p = m.plan_for((8, 8, 8, 8))
    assert p.update == {"block.7", "norm"} and p.probe == {"block.6"} and p.exit_depth is None
    assert m.plan_for((1, 2, 8, 8)).probe == frozenset()
    t.apply(m.plan_for((3, 5, 6, 8)))  # the engine accepts it: exit in place, six blocks run
    assert len(t.model.model.layers) == 6

    m2 = Trims(TrimsConfig(train_norm=False))
    Tuner(classifier(), m2)
    p = m2.plan_for((2, 3, 4, 4))
    assert p.update == {"block.1", "block.2", "head"}  # the fresh head always trains
    m3 = Trims()
    Tuner(classifier(), m3)
    assert m3.plan_for((2, 3, 4, 4)).update == {"block.1", "block.2", "head", "pooler"}


def test_budget_filters_an_action_whose_predicted_peak_exceeds_it():
    # (7,8,8,8) costs 40 + 5*3 + 10*2 = 75; LE -> (6,8,8,8) costs 90; CON stays at 75
    t, m = make(budget=90 / 0.97 - 1)
    m.state, m.last_action = (7, 8, 8, 8), "CON"
    m.g = [0.0] + [100.0] * 8
    m.kappa, m.kappa_ready = {"exp": 1.0, "shr": 1.0, "ext": 1.0}, True
    action, record = m.choose(2.0, 75.0, 10.0)
    assert record["filtered"]["LE"] == "budget"
    assert record["candidates"]["LE"]["pred"] == 90 and record["candidates"]["LE"]["U"] > 10
    assert action != "LE"
    t.budget_bytes = 90 / 0.97 + 1  # just room for it: LE, hugely beneficial, is chosen
    assert m.choose(2.0, 75.0, 10.0)[0] == "LE"
    t.budget_margin = 0.2  # the tuner's margin applies: 90 > 0.8 * 93.8
    assert m.choose(2.0, 75.0, 10.0)[1]["filtered"]["LE"] == "budget"
    t.budget_bytes = None  # no budget: every action is admitted
    assert m.choose(2.0, 75.0, 10.0)[0] == "LE"
    t.memory_model = None  # nor without a memory model
    assert "budget" not in m.choose(2.0, m.memory_hat(m.state), 10.0)[1]["filtered"].values()


def test_when_nothing_fits_the_smallest_plan_is_taken():
    t, m = make(budget=70)  # (6,8,8,8) costs 40 + 5*4 + 10*3 = 90; LS -> 75 still over 67.9
    m.state, m.last_action = (6, 8, 8, 8), "CON"
    action, record = m.choose(2.0, 90.0, 10.0)
    assert set(record["filtered"].values()) == {"structure", "budget"} and record["over_budget"]
    assert action == "LS" and record["candidates"]["LS"]["pred"] == 75


@pytest.mark.parametrize("time", ["model", "measured"])
def test_time_comes_from_the_tuners_clock_unless_one_is_injected(time):
    ticks = iter(range(0, 1000, 3))
    m = Trims(TrimsConfig(tau=2, time=time, start="last", con="last"))
    t = Tuner(causal_lm(), m, clock=lambda: float(next(ticks)), count_memory=False)
    drive(t, m, 2, steady_loss, lambda s, j: 1.0)
    assert m.decisions[0]["t"] == 3.0  # one read at plan, one at end_step: 3 apart
    # eq. 8's t_i: the measured time, or under time=model the model's time of (4, 4, 4, 4), 4 + 1 + 1
    assert m.decisions[0]["t_i"] == (3.0 if time == "measured" else 6.0)


def test_start_plan_over_budget_is_a_clear_error():
    t, m = make(budget=50)  # (8,8,8,8) is priced 40 + 5*2 + 10 = 60
    with pytest.raises(DynatuneError, match="raise the budget"):
        m.plan(0)


# -- Operation 1 and 2 ----------------------------------------------------------------------------
def hand_made(m):
    m.state = (3, 5, 6, 8)
    m.g = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    m.kappa, m.kappa_ready = {"exp": 0.2, "shr": 0.3, "ext": 0.1}, True
    m.alpha_m, m.m_base, m.mem_ready = 2.0, 5.0, True
    m.t_unit, m.alpha_t, m.t_base = 0.5, 1.5, 1.0
    m.period_losses = [2.0, 1.8]  # L_{i-1}, L_i


def test_operation1_on_a_hand_made_state():
    t, m = make(time="measured")  # the calibrated time estimate: T_B + alpha_t * t_unit * units
    hand_made(m)
    # m^ = 5 + 2 * price(s');  t^ = 1 + 1.5 * 0.5 * (e + (e-l+1) + (r-l+1));  v^ from Operation 1
    expected = {
        "LE": (5 + 2 * 106, 1 + 0.75 * 15, -0.2 * 2.0),   # g(l-1) = g(2)
        "RE": (5 + 2 * 101, 1 + 0.75 * 14, -0.2 * 6.0),   # g(r+1) = g(6)
        "LS": (5 + 2 * 76, 1 + 0.75 * 11, +0.3 * 3.0),    # g(l) = g(3)
        "RS": (5 + 2 * 81, 1 + 0.75 * 12, +0.3 * 5.0),    # g(r) = g(5)
        "PU": (5 + 2 * 98, 1 + 0.75 * 15, +0.1 * 7.0),    # g(e+1) = g(7)
        "PO": (5 + 2 * 84, 1 + 0.75 * 11, -0.1 * 6.0),    # g(e) = g(6)
        "CON": (5 + 2 * 91, 1 + 0.75 * 13, 1.8 - 2.0),    # the last period's loss change
    }
    for a, want in expected.items():
        assert m.estimate(a) == pytest.approx(want), a
    # eq. 8 with L_i = 1.8, m_i = 187, t_i = 10.75
    m_hat, t_hat, v_hat = m.estimate("LE")
    want = 0.4 / 1.8 - 0.1 * (217 - 187) / 187 - 0.1 * (12.25 - 10.75) / 10.75
    assert m.utility(m_hat, t_hat, v_hat, 1.8, 187.0, 10.75) == pytest.approx(want)
    with pytest.raises(DynatuneError):
        m.estimate("LE", (1, 5, 6, 8))
    # time=model (the default): t^ is eq. 5's sums in block units, whatever calibration says
    t, m = make()
    hand_made(m)
    for a, (m_hat, t_hat, v_hat) in expected.items():
        assert m.estimate(a) == pytest.approx((m_hat, (t_hat - 1) / 0.75, v_hat)), a


def test_operation2_updates_against_hand_computed_numbers():
    t, m = make(time="measured")  # time is calibrated only under time=measured (checked at the end)
    m.state, m.prev_state, m.last_action = (3, 5, 6, 8), (4, 5, 6, 8), "LE"
    m.g = [0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    m.kappa, m.kappa_ready = {"exp": 0.2, "shr": 0.22, "ext": 0.18}, True
    m.alpha_m, m.m_base, m.mem_ready = 1.0, 10.0, True
    m.t_unit, m.alpha_t, m.t_base = 0.5, 1.0, 1.0
    m.period_losses = [2.0]  # L_i
    # price(3,5,6,8) = 40 + 5*5 + 10*3 - 2*2 = 91; time units 6 + 4 + 3 = 13
    m.update_estimators(L=1.8, m=130.0, t=9.0)
    assert m.alpha_m == pytest.approx(0.9 * 1.0 + 0.1 * (130 - 10) / 91)   # 1.031868
    assert m.m_base == pytest.approx(130 - 1.0318681318681318 * 91)          # 36.1
    assert m.alpha_t == pytest.approx(0.9 * 1.0 + 0.1 * (9 - 1) / 6.5)      # 1.023077
    assert m.t_base == pytest.approx(9 - 1.023076923076923 * 6.5)            # 2.35
    # LE touched block 3: kappa_exp <- 0.9 * 0.2 + 0.1 * |1.8 - 2.0| / g(3) = 0.18 + 0.1 * 0.4
    assert m.kappa == pytest.approx({"exp": 0.22, "shr": 0.22, "ext": 0.18})
    assert m.memory_hat(m.state) == pytest.approx(130.0)  # calibrated on what was measured

    m.period_losses, m.prev_state, m.last_action = [2.0], (3, 5, 7, 8), "PO"  # PO touched block 7
    m.update_estimators(L=2.5, m=None, t=None)
    assert m.kappa["ext"] == pytest.approx(0.9 * 0.18 + 0.1 * 0.5 / 1.0)
    m.period_losses, m.prev_state, m.last_action = [2.0], (2, 5, 6, 8), "LS"  # LS froze block 2
    m.update_estimators(L=2.1, m=None, t=None)
    assert m.kappa["shr"] == pytest.approx(0.9 * 0.22 + 0.1 * 0.1 / 1.0)
    before = dict(m.kappa)
    m.last_action = "CON"
    m.update_estimators(L=2.0, m=None, t=None)
    assert m.kappa == pytest.approx({k: 0.99 * v for k, v in before.items()})

    # time=model: a measured time calibrates nothing, the estimate stays the state's block units
    t, m = make()
    m.state, m.mem_ready = (3, 5, 6, 8), True
    m.update_estimators(L=1.8, m=130.0, t=9.0)
    assert (m.t_unit, m.alpha_t, m.t_base) == (None, 1.0, 0.0)
    assert m.time_hat(m.state) == 13.0


def test_gradient_strengths_ema_over_l_minus_1_to_e_and_decay_elsewhere():
    t, m = make()
    m.state = (3, 5, 6, 8)
    m.g, m.g_seen = [0.0] + [1.0] * 8, [False] + [True] * 7 + [False]
    m.update_gradients({1: 9.0, 2: 2.0, 3: 3.0, 4: 1.0, 5: 1.0, 6: 4.0})
    assert m.g == pytest.approx([0.0, 0.99, 1.1, 1.2, 1.0, 1.0, 1.3, 0.99, 0.99])
    m.state = (8, 8, 8, 8)
    m.update_gradients({7: 5.0, 8: 2.0})  # block 8 never seen: its first value is taken as it is
    assert m.g[7] == pytest.approx(0.9 * 0.99 + 0.5) and m.g[8] == 2.0


@pytest.mark.parametrize("reading,shr,ext", [("text", 1.1, 0.9), ("eq6", 0.9, 1.1)])
def test_kappa_initialised_by_eq6_after_the_first_left_expand(reading, shr, ext):
    t, m = make(tau=1, kappa_init=reading)
    drive(t, m, 2, lambda s, st: [3.0, 2.5][s], lambda s, j: {7: 2.0, 8: 1.0}.get(j, 0.0))
    assert [d["action"] for d in m.decisions][0] == "LE" and m.decisions[0].get("forced")
    # kappa_exp = |L_1 - L_0| / g(n-1) = 0.5 / 2.0
    assert m.kappa == pytest.approx({"exp": 0.25, "shr": shr * 0.25, "ext": ext * 0.25})


# -- dynatune's start (start=fit), CON's trend and the presets ----------------------------------------
def test_start_fit_begins_at_the_largest_top_window_the_budget_admits():
    # the fake prices a top window of k blocks at 40 + 5 k + 10 k (no exit, nothing probed at l = 1;
    # a probe below the window adds one block to the path): usable budget 100 admits k = 3 with its
    # probe (40 + 5*4 + 10*3 = 90) and not k = 4 (40 + 25 + 40 = 105)
    t, m = make(budget=100 / (1 - 0.1), start="fit")
    t.budget_margin = 0.1
    m.plan(0)
    assert m.state_tuple() == (6, 8, 8, 8)
    assert t.memory_model.price(m.plan_for((6, 8, 8, 8))) == 90
    assert t.memory_model.price(m.plan_for((5, 8, 8, 8))) == 105
    # without a budget every block trains from the first step
    _, m2 = make(start="fit")
    m2.plan(0)
    assert m2.state_tuple() == (1, 8, 8, 8)


def test_start_fit_holds_two_periods_then_sets_kappa_from_the_windows_loss_change():
    t, m = make(tau=1, start="fit", con="last", budget=100 / (1 - 0.1))
    t.budget_margin = 0.1
    grads = {5: 4.0, 6: 1.0, 7: 2.0, 8: 1.0}
    drive(t, m, 2, lambda s, st: [3.0, 2.2][s], lambda s, j: grads.get(j, 0.0))
    assert m.decisions[0]["action"] == "CON" and m.decisions[0]["forced"]  # no loss change yet: hold
    assert "forced" not in m.decisions[1]  # kappa known: the utility chooses
    # eq. 6 from the warm-up: kappa_exp = |L_1 - L_0| / (g(6) + g(7) + g(8)) = 0.8 / 4.0
    assert m.kappa == pytest.approx({"exp": 0.2, "shr": 1.1 * 0.2, "ext": 0.9 * 0.2})


def test_con_trend_is_the_least_squares_slope_of_the_last_period_losses():
    t, m = make(tau=1, start="fit", con="trend", trend_periods=4)
    losses = [3.0, 2.0, 2.5, 1.5, 1.9]
    drive(t, m, 5, lambda s, st: losses[s], lambda s, j: 1.0)
    # the last four period losses 2.0, 2.5, 1.5, 1.9 at x = 0..3: slope = sum (x - 1.5)(y - 1.975) / 5
    slope = sum((x - 1.5) * (y - 1.975) for x, y in enumerate(losses[1:])) / 5.0
    assert m.loss_trend() == pytest.approx(slope) and slope == pytest.approx(-0.13)
    assert m.decisions[-1]["candidates"]["CON"]["v"] == pytest.approx(slope)
    m.config.con = "last"
    assert m.loss_trend() == pytest.approx(1.9 - 1.5)


def test_presets_fill_only_the_options_left_unset():
    c = Trims(TrimsConfig()).config
    assert (c.start, c.con, c.exits, c.time) == ("fit", "last", "auto", "model")
    p = Trims(TrimsConfig(preset="paper")).config
    assert (p.start, p.con, p.exits, p.time) == ("last", "last", "on", "measured")
    assert (p.tau, p.lambda_m, p.lambda_t, p.alpha, p.beta, p.eta) == (10, 0.1, 0.1, 0.1, 0.9, 0.99)
    mixed = Trims(TrimsConfig(preset="paper", exits="auto", time="model")).config
    assert (mixed.start, mixed.con, mixed.exits, mixed.time) == ("last", "last", "auto", "model")
    with pytest.raises(DynatuneError, match="trims.preset"):
        Trims(TrimsConfig(preset="fast"))
    with pytest.raises(DynatuneError, match="trims.start"):
        Trims(TrimsConfig(start="middle"))


# -- decisions follow the signals ---------------------------------------------------------------------
def steady_loss(step, state):
    return 3.0 - 0.05 * step


def rising_loss(step, state):
    return 3.0 - 0.05 * step if step < 8 else 2.6 + 0.05 * (step - 8)


TRACES = {
    # same loss, flat gradients: after the forced LE, continuing is always worth more
    "flat": (steady_loss, lambda s, j: 1.0,
             ["LE"] + ["CON"] * 14),
    # same loss, gradients four times larger at each lower block: expanding left pays every time
    "steep": (steady_loss, lambda s, j: 4.0 ** (8 - j),
              ["LE"] * 7 + ["CON"] * 8),
    # the loss turns up: the window grows, then shrinks from the right and the exit pops
    "rising": (rising_loss, lambda s, j: 10.0 / j,
               ["LE", "CON", "CON", "CON", "CON", "LE", "LE", "LE", "LE", "LE", "LE", "RS", "PO", "RS", "PO"]),
}


@pytest.mark.parametrize("time", ["model", "measured"])
def test_recorded_traces_give_different_asserted_action_sequences(time):
    seen = {}
    for name, (loss_fn, grad_fn, want) in TRACES.items():
        t, m = make(tau=2, time=time)
        actions, _ = drive(t, m, 30, loss_fn, grad_fn)
        assert actions == want, name
        seen[name] = tuple(actions)
    assert len(set(seen.values())) == len(TRACES)
    t, m = make(tau=2)
    drive(t, m, 30, *TRACES["rising"][:2])
    assert m.state_tuple() == (1, 6, 6, 8)  # two blocks exited


class PlateauEnv:
    """The loss relaxes towards a floor that falls with the number of trainable blocks, so a
    bigger window is worth it once the current one has converged."""

    def __init__(self):
        self.L = 3.0

    def __call__(self, step, state):
        l, r, e, n = state
        floor = 0.5 + 2.0 / (r - l + 1)
        self.L = floor + (self.L - floor) * 0.8
        return self.L


@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_run_fills_but_never_exceeds_the_budget(fraction):
    budget = fraction * FakeMemoryModel(8).full()
    t, m = make(tau=2, budget=budget)
    _, preds = drive(t, m, 120, PlateauEnv(), lambda s, j: 1.0)
    assert max(preds) <= budget * 0.97
    assert max(preds) >= 0.85 * budget
    assert any(d["filtered"].get("LE") == "budget" for d in m.decisions)  # the budget did stop it


# -- checkpoint and resume ---------------------------------------------------------------------------
def cls_data(n=64, seq=10, seed=1):
    """A learnable task: the label is the first token mod 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r[0] % 3} for r in ids]


def lm_data(n=64, seq=10, seed=1):
    """A learnable language: arithmetic progressions of token ids."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % (VOCAB - 1) + 1
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def trims(**cfg):
    m = Trims(TrimsConfig(**{"tau": 2, "lambda_m": 0.01, "lambda_t": 0.01, "start": "last", "con": "last", **cfg}))
    m.clock = FakeClock(m)
    return m


def test_state_dict_round_trip_mid_period():
    t, m = make(tau=3)
    drive(t, m, 7, rising_loss, lambda s, j: 10.0 / j)  # 7 steps: mid-period
    t2, m2 = make(tau=3)
    m2.load_state_dict(m.state_dict())
    strip = lambda sd: {k: v for k, v in sd.items() if k != "generator"}  # noqa: E731
    assert strip(m2.state_dict()) == strip(m.state_dict())
    for tt, mm in ((t, m), (t2, m2)):  # both continue identically
        for step in range(7, 20):
            tt.apply(mm.plan(step))
            mm.after_backward(step, {"act_grad_norm": {"block.5": 1.0, "block.6": 2.0, "block.7": 1.5}})
            mm.end_step(step, rising_loss(step, None))
    assert m2.decisions == m.decisions and m2.state_tuple() == m.state_tuple()


def test_resume_mid_run_gives_the_same_actions_and_weights(tmp_path):
    steps = 24
    cfg = loop_cfg(max_steps=steps, lr=3e-3, warmup_ratio=0.0, checkpoint_every=5, keep_checkpoints=10)
    data = cls_data()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    m_a = trims()
    tuner_a, _ = fit(classifier("llama", seed=0), m_a, data, collate, cfg, out_dir=tmp_path / "a")
    assert len({d["action"] for d in m_a.decisions}) >= 3  # a run with decisions worth resuming

    # step-5 is mid-period (tau = 2): the period's partial observations must come back too
    m_b = trims()
    cfg_b = loop_cfg(**{**vars(cfg), "resume": str(tmp_path / "a" / "checkpoints" / "step-5")})
    tuner_b, _ = fit(classifier("llama", seed=1), m_b, data, collate, cfg_b, out_dir=tmp_path / "b")
    assert m_b.decisions == m_a.decisions
    assert [h["loss"] for h in tuner_b.history] == [h["loss"] for h in tuner_a.history]
    for n, p in tuner_a.params.items():
        assert torch.equal(p, tuner_b.params[n]), n
    assert checkpoint.resolve(tmp_path / "b").name == f"step-{steps}"


def resume_on_another_machine(tmp_path, steps=30, at=10, **cfg):
    """A straight run under the FakeClock, and the same run resumed from its step-`at` checkpoint
    (right after a decision: tau = 5) under the FASTER clock. Returns both (tuner, method)."""
    cfg_a = loop_cfg(max_steps=steps, lr=3e-3, warmup_ratio=0.0, checkpoint_every=at, keep_checkpoints=10)
    cfg_b = loop_cfg(**{**vars(cfg_a), "resume": str(tmp_path / "a" / "checkpoints" / f"step-{at}")})
    runs = []
    for name, c, clock, seed in (("a", cfg_a, {}, 0), ("b", cfg_b, FASTER, 1)):
        (tmp_path / name).mkdir(parents=True)
        m = trims(tau=5, **cfg)
        m.clock = FakeClock(m, **clock)
        tuner, _ = fit(classifier("llama", seed=seed), m, cls_data(), collate, c, out_dir=tmp_path / name)
        runs.append((tuner, m))
    return runs


def test_resume_at_a_decision_step_on_a_faster_machine_takes_the_straight_runs_actions(tmp_path):
    (ta, ma), (tb, mb) = resume_on_another_machine(tmp_path / "model")
    assert ma.decisions[1]["step"] == 9  # the checkpoint at step 10 comes right after a decision
    assert len({d["action"] for d in ma.decisions[2:]}) >= 2  # decisions after the resume, not just CON
    # every decision's terms are the straight run's; only the measured step time ("t") differs
    untimed = lambda ds: [{k: v for k, v in d.items() if k != "t"} for d in ds]  # noqa: E731
    assert untimed(mb.decisions) == untimed(ma.decisions)
    assert all(b["t"] < a["t"] / 4 for a, b in zip(ma.decisions[2:], mb.decisions[2:]))  # and it was faster
    assert [h["method_log"] for h in tb.history] == [h["method_log"] for h in ta.history]
    assert [h["loss"] for h in tb.history] == [h["loss"] for h in ta.history]
    for n, p in ta.params.items():
        assert torch.equal(p, tb.params[n]), n
    # the scenario is one where time matters: under time=measured the faster clock changes an action
    (ta, ma), (tb, mb) = resume_on_another_machine(tmp_path / "measured", time="measured")
    assert [d["action"] for d in mb.decisions] != [d["action"] for d in ma.decisions]


def test_cli_resume_at_a_decision_step_on_a_faster_machine_equals_the_straight_run(tiny_bert_dir, tmp_path,
                                                                                    monkeypatch):
    # a BERT classifier (dropout on) under TriMS's default budget: the memory model prices plans
    # lazily, and the resumed run's fresh one must not shift the dropout masks either
    common = [f"model={tiny_bert_dir}", "task=trec", "data.max_train=120", "data.max_eval=16", "batch_size=4",
              "max_length=32", "max_steps=30", "progress=false", "save_model=false", "lr=3e-3",
              "method=trims", "trims.tau=5", "trims.lambda_m=0.001", "trims.lambda_t=0.01", "trims.start=last",
              "trims.con=last"]
    setup = Trims.setup

    def on_clock(**clock):  # every TriMS the CLI builds from now on measures time with this clock
        def timed_setup(self, tuner):
            setup(self, tuner)
            self.clock = FakeClock(self, **clock)
        monkeypatch.setattr(Trims, "setup", timed_setup)

    straight, split = tmp_path / "straight", tmp_path / "split"
    on_clock()
    assert main(["train", *common, f"output_dir={straight}", "checkpoint_every=10"]) == 0
    assert main(["train", *common, f"output_dir={split}", "stop_after=10"]) == 0
    on_clock(**FASTER)  # the second half on another machine
    assert main(["train", "--resume", str(split), *common, f"output_dir={split}", "checkpoint_every=10"]) == 0

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    a, b = log(straight), log(split)
    assert [r["step"] for r in b] == list(range(30))
    assert a[9]["method_log"]["action"]  # the checkpoint at step 10 comes right after a decision
    assert {r["method_log"].get("action") for r in a[10:]} - {None, "CON"}  # and one after it moves the window
    assert [r["method_log"] for r in b] == [r["method_log"] for r in a]  # states, actions, U, v, m, t terms
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["update"] for r in b] == [r["update"] for r in a]
    wa = load_file(straight / "checkpoints" / "step-30" / "weights.safetensors")
    wb = load_file(split / "checkpoints" / "step-30" / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (straight, split))
    assert mb["test"] == ma["test"] and mb["final_state"] == ma["final_state"]


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,make_model,data", [
    ("llama-causal-lm", lambda: causal_lm(seed=3), lm_data(seed=4)),
    ("bert-classifier", lambda: classifier(seed=3), cls_data(seed=4)),
    ("llama-classifier", lambda: classifier("llama", seed=3), cls_data(seed=4)),
])
def test_end_to_end_window_and_exit_move_and_untrained_blocks_stay_put(arch, make_model, data):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = trims(exits="on")  # on: a BERT classifier's default (auto) is no exits, tested below
    tuner, _ = fit(model, m, data, collate, loop_cfg(max_steps=60, lr=3e-3, warmup_ratio=0.0))
    # every step's log says which state ran (l, r, e, n); the step's plan is that state's
    ran = [tuple(h["method_log"][k] for k in "lren") for h in tuner.history]
    for h, s in zip(tuner.history, ran):
        assert h["update"] == sorted(m.plan_for(s).update)
        assert h["exit_depth"] == (None if s[2] == s[3] else s[2])
    for i, what in enumerate("lre"):
        assert len({s[i] for s in ran}) > 1, f"{what} never moved: {sorted(set(ran))}"
    assert sum("action" in h["method_log"] for h in tuner.history) == len(m.decisions) == 30
    # units never in the trainable set are bitwise unchanged (the embedding at least)
    trained = {u for h in tuner.history for u in h["update"]}
    untouched = [u for u in tuner.units if u.name not in trained]
    assert any(u.kind == "embedding" for u in untouched)
    for u in untouched:
        for p in u.param_names:
            assert torch.equal(before[p], tuner.params[p]), p
    # the exit of the last step stays in place: evaluation and the saved model use e blocks
    e = ran[-1][2]
    assert len(tuner.block_stack.running) == e
    assert tuner.model.config.num_hidden_layers == e
    tuner.close_hooks()
    with torch.no_grad():
        assert torch.isfinite(tuner.model(**collate(data[:4])).loss)


@pytest.mark.parametrize("arch,exits,allowed", [("bert", "auto", False), ("llama", "auto", True),
                                                  ("bert", "on", True), ("llama", "off", False)])
def test_exits_auto_turns_exits_off_for_first_token_classifiers(arch, exits, allowed):
    model = classifier(arch, seed=3)
    m = trims(exits=exits)
    tuner, _ = fit(model, m, cls_data(seed=4), collate, loop_cfg(max_steps=40, lr=3e-3, warmup_ratio=0.0))
    assert m.exits_allowed is allowed
    es = {h["method_log"]["e"] for h in tuner.history}
    if allowed:
        assert min(es) < 4  # the same run with exits allowed does exit (the filter is what stops it)
    else:
        assert es == {4}
        assert all(d["filtered"].get("PO") in ("exits off", "structure") for d in m.decisions)
        assert any(d["filtered"].get("PO") == "exits off" for d in m.decisions)
    # the smallest plan (the budget floor) follows: without exits it is the starting state
    small = m.smallest_plan(tuner.units)
    assert (small.exit_depth is None) is (not allowed)
    assert ("block.3" in small.update) is (not allowed) and ("block.0" in small.update) is allowed


def test_untrained_bottom_blocks_are_bitwise_unchanged_under_a_budget():
    model = causal_lm(num_hidden_layers=6, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = trims(lambda_m=0.1, lambda_t=0.1)
    tuner = Tuner(model, m, lr=3e-3)
    tuner.memory_model = FakeMemoryModel(6)
    tuner.budget_bytes = 0.6 * tuner.memory_model.full()
    fit(model, m, lm_data(seed=4), collate, loop_cfg(max_steps=30, lr=3e-3, warmup_ratio=0.0), tuner=tuner)
    preds = [h["method_log"]["predicted_peak_bytes"] for h in tuner.history]
    assert max(preds) <= tuner.history[0]["method_log"]["usable_budget_bytes"]
    trained = {u for h in tuner.history for u in h["update"]}
    never = [f"block.{i}" for i in range(6) if f"block.{i}" not in trained]
    assert len(never) >= 3
    for name in never:
        for p in tuner.units[name].param_names:
            assert torch.equal(before[p], tuner.params[p]), p


# -- exited blocks in host memory ------------------------------------------------------------------
def test_offload_prices_and_moves_exited_blocks():
    t, m = make(memory_model=False, offload_exited=True)
    t_off, m_off = t, m
    t, m = make(memory_model=False)
    mp = m.mp[1]
    # eq. 4 without a memory model: offloaded exited blocks leave the weight term
    assert m.raw_memory((3, 5, 6, 8)) - m_off.raw_memory((3, 5, 6, 8)) == pytest.approx(2 * mp)
    # on a CPU run there is no host memory to move to: placing blocks changes nothing
    params = {n: p for n, p in t_off.model.named_parameters()}
    t_off.apply(m_off.plan_for((5, 6, 6, 8)))
    m_off.state = (5, 6, 6, 8)
    m_off.plan(1)
    move_block(m_off._blocks[7], torch.device("cpu"))
    assert all(params[n] is p for n, p in t_off.model.named_parameters())
