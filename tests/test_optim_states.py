"""Optimizer state that follows the plan: keep, drop, offload; state dicts by name."""
import pytest
import torch

from dynatune.errors import DynatuneError
from dynatune.optim import OptimizerStates

from scripted import plan, snapshot, step, tuner
from tiny import causal_lm, collate, lm_examples

A = plan("block.0", "block.1", "norm")
B = plan("block.2", "block.3", "norm")


def batches(n, seed=1):
    data = lm_examples(4 * n, seed=seed)
    return [collate(data[4 * i:4 * i + 4]) for i in range(n)]


def run_abab(policy, plans=(A, A, B, B, A, A)):
    model = causal_lm("llama")
    t = tuner(model, list(plans), state_policy=policy)
    losses = [step(t, b) for b in batches(len(plans))]
    return model, t, losses


def test_offload_then_restore_equals_never_offloading_bitwise():
    keep_model, _, keep_losses = run_abab("keep")
    off_model, off_t, off_losses = run_abab("offload")
    drop_model, _, drop_losses = run_abab("drop")
    assert off_losses == keep_losses
    for (n, a), (_, b) in zip(keep_model.named_parameters(), off_model.named_parameters()):
        assert torch.equal(a, b), n
    # the switches' host<->device traffic is logged on the steps that made them
    moved = [h["bytes_moved"] for h in off_t.history]
    b01 = sum(off_t.params[n].numel() * 4 * 2 for n in off_t.units.param_names(["block.0", "block.1"]))
    b23 = sum(off_t.params[n].numel() * 4 * 2 for n in off_t.units.param_names(["block.2", "block.3"]))
    assert moved == [0, 0, b01, 0, b23 + b01, 0]
    # drop restarts block.0/1's moments when A returns: the comparison above can tell the difference
    assert drop_losses[:5] == keep_losses[:5] and drop_losses[5] != keep_losses[5]
    assert not torch.equal(drop_model.model.layers[0].mlp.up_proj.weight, keep_model.model.layers[0].mlp.up_proj.weight)


def test_offload_moves_storage_out_of_the_optimizer_and_back():
    model = causal_lm("llama")
    t = tuner(model, [A, B, A], state_policy="offload")
    data = batches(3)
    step(t, data[0])
    names = t.units.param_names(["block.0", "block.1"])
    held = {n: dict(t.optimizer.state[t.params[n]]) for n in names}  # references keep old storage alive
    ptrs = {n: held[n]["exp_avg"].data_ptr() for n in names}

    step(t, data[1])  # B: block.0/1 evicted at begin_step
    resident_ptrs = {v.data_ptr() for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    for n in names:
        p = t.params[n]
        assert p not in t.optimizer.state
        host = t.states.host[n]
        for k in ("exp_avg", "exp_avg_sq"):
            assert host[k].data_ptr() != held[n][k].data_ptr()
            assert host[k].data_ptr() not in resident_ptrs
            assert torch.equal(host[k], held[n][k])
            assert host[k].device.type == "cpu"
        assert host["step"].item() == 1.0

    t.begin_step()  # A again: state comes back into the optimizer, in fresh device storage
    for n in names:
        s = t.optimizer.state[t.params[n]]
        assert s["exp_avg"].data_ptr() != ptrs[n]
        assert torch.equal(s["exp_avg"], held[n]["exp_avg"]) and torch.equal(s["exp_avg_sq"], held[n]["exp_avg_sq"])
    assert not (set(names) & set(t.states.host))
    assert set(t.states.host) == set(t.units.param_names(["block.2", "block.3"]))
    t.abort_step()


def test_drop_frees_state_and_keep_keeps_it():
    for policy in ("drop", "keep"):
        model = causal_lm("llama")
        t = tuner(model, [A, B], state_policy=policy)
        for b in batches(2):
            step(t, b)
        left = [t.params[n] for n in t.units.param_names(["block.0", "block.1"])]
        assert all((p in t.optimizer.state) == (policy == "keep") for p in left)
        assert t.states.host == {}
        # norm stayed in the plan: its state survived the switch (2 steps)
        assert t.optimizer.state[t.params["model.norm.weight"]]["step"].item() == 2.0


def test_state_dict_is_keyed_by_names_and_round_trips_offloaded_state():
    plans = [A, B, A, B]
    model = causal_lm("llama")
    t = tuner(model, plans, state_policy="offload")
    data = batches(4)
    for b in data[:2]:
        step(t, b)
    sd = t.states.state_dict()
    assert set(sd["state"]) == set(t.units.param_names(["block.0", "block.1", "block.2", "block.3", "norm"]))
    assert all(sd["state"][n].get("__offloaded__") for n in t.units.param_names(["block.0", "block.1"]))
    assert sd["groups"][0]["params"] == list(t.candidate_params)

    # resume in a fresh model/tuner from the state dict: the next two steps match the original's
    resumed_model = causal_lm("llama")
    resumed_model.load_state_dict(model.state_dict())
    t2 = tuner(resumed_model, plans, state_policy="offload")
    t2.step = 2
    t2.apply(B)
    t2.states.load_state_dict(sd)
    for b in data[2:]:
        assert step(t2, b) == step(t, b)
    for (n, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n


def test_unknown_policy():
    with pytest.raises(DynatuneError, match="keep, drop, offload"):
        OptimizerStates(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), {}, "evict")


def test_user_optimizer_missing_a_late_unit_gets_it():
    """A Trainer-made optimizer holds only what required grad at creation: the late unit is added."""
    from dynatune.engine import Tuner
    from scripted import Scripted
    model = causal_lm("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[3].parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t = Tuner(model, Scripted([plan("block.3"), plan("block.0")]), optimizer=opt)
    before = snapshot(model)
    for b in batches(2):
        step(t, b)
    b0 = t.units.param_names(["block.0"])
    assert all(not torch.equal(t.params[n], before[n]) for n in b0)
