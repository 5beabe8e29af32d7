"""Each signal equals a hand computation on a tiny model."""
import copy
from contextlib import contextmanager
import math

import pytest
import torch

from dynatune.signals import SIGNALS

from scripted import plan, tuner
from tiny import causal_lm, collate, lm_examples

ALL = ("act_grad_norm", "grad_norm", "taylor", "weight_norm", "act_norm")
UPDATE = ("block.2", "block.3", "norm")


def batch(seed=1, n=4):
    return collate(lm_examples(n, seed=seed))


def close(a, b, rel=1e-5):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def hand_run(model, b):
    """A plain forward/backward with every parameter trainable, block outputs kept with retain_grad."""
    outs = {}
    handles = []
    for i, blk in enumerate(model.model.layers):
        def hook(mod, args, out, i=i):
            t = out if isinstance(out, torch.Tensor) else out[0]
            t.retain_grad()
            outs[i] = t
        handles.append(blk.register_forward_hook(hook))
    model(**b).loss.backward()
    for h in handles:
        h.remove()
    return outs


def test_signals_are_registered_by_name():
    assert set(SIGNALS) == set(ALL)


def test_each_signal_equals_hand_computation():
    model = causal_lm("llama")
    ref = copy.deepcopy(model)
    b = batch()
    outs = hand_run(ref, b)
    ref_params = dict(ref.named_parameters())

    t = tuner(model, plan(*UPDATE), signals=ALL)
    t.begin_step()
    t.model(**b).loss.backward()
    t.after_backward()
    v = t.signal_values()

    # activation-gradient norm at each block output that backward reaches (blocks 2, 3; not 0, 1)
    assert set(v["act_grad_norm"]) == {"block.2", "block.3"}
    for i in (2, 3):
        assert close(v["act_grad_norm"][f"block.{i}"], outs[i].grad.norm().item())
    # parameter-gradient norm and Taylor |w*g| of each updated unit (only those)
    assert set(v["grad_norm"]) == set(UPDATE) and set(v["taylor"]) == set(UPDATE)
    for u in UPDATE:
        names = t.units[u].param_names
        gn = math.sqrt(sum(ref_params[n].grad.double().pow(2).sum().item() for n in names))
        ty = sum((ref_params[n].detach() * ref_params[n].grad).abs().double().sum().item() for n in names)
        assert close(v["grad_norm"][u], gn)
        assert close(v["taylor"][u], ty)
        # and the engine's own gradients agree with the hand run
        assert close(v["grad_norm"][u], math.sqrt(sum(t.params[n].grad.double().pow(2).sum().item()
                                                      for n in names)))
    # weight magnitude: every unit, frozen ones too, read at the start of the step
    assert set(v["weight_norm"]) == {u.name for u in t.units}
    for u in t.units:
        wn = math.sqrt(sum(ref_params[n].detach().double().pow(2).sum().item() for n in u.param_names))
        assert close(v["weight_norm"][u.name], wn)
    # forward activation norm: every block, frozen ones too
    assert set(v["act_norm"]) == {f"block.{i}" for i in range(4)}
    for i in range(4):
        assert close(v["act_norm"][f"block.{i}"], outs[i].detach().norm().item())
    t.abort_step()


def test_signals_reset_each_step_and_weight_norm_sees_the_update():
    model = causal_lm("llama")
    t = tuner(model, [plan("block.3"), plan("block.1")], signals=ALL)
    from scripted import step
    step(t, batch(1))
    w3_after = math.sqrt(sum(t.params[n].detach().double().pow(2).sum().item()
                             for n in t.units["block.3"].param_names))
    t.begin_step()  # plan block.1: block.3's gradient signals are gone, its new weight norm is read
    v = t.signal_values()
    assert v["grad_norm"] == {} and v["act_grad_norm"] == {} and v["act_norm"] == {}
    assert close(v["weight_norm"]["block.3"], w3_after)
    t.abort_step()


def test_module_granularity_activation_norm_and_grad_norm():
    model = causal_lm("llama")
    ref = copy.deepcopy(model)
    b = batch()
    mods = {"block.1.mlp.down_proj": ref.model.layers[1].mlp.down_proj,
            "block.3.self_attn.q_proj": ref.model.layers[3].self_attn.q_proj}
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, k=k: outs.__setitem__(k, o.detach()))
               for k, m in mods.items()]
    ref(**b).loss.backward()
    for h in handles:
        h.remove()

    t = tuner(model, plan("block.3.self_attn.q_proj"), granularity="module", signals=["act_norm", "grad_norm"])
    t.begin_step()
    t.model(**b).loss.backward()
    t.after_backward()
    v = t.signal_values()
    for k in mods:
        assert close(v["act_norm"][k], outs[k].norm().item())
    assert set(v["grad_norm"]) == {"block.3.self_attn.q_proj"}
    assert close(v["grad_norm"]["block.3.self_attn.q_proj"], ref.model.layers[3].self_attn.q_proj.weight.grad.norm().item())
    t.abort_step()


def test_grad_norm_under_accumulation_is_the_norm_of_the_accumulated_gradient():
    model = causal_lm("llama")
    t = tuner(model, plan(*UPDATE), signals=["grad_norm", "taylor"])
    t.begin_step()
    first = {}
    for k, b in enumerate((batch(1, 2), batch(2, 2))):
        (t.model(**b).loss * 0.5).backward()
        if k == 0:
            first = {n: t.params[n].grad.clone() for n in t.units.param_names(UPDATE)}
    t.after_backward()
    v = t.signal_values()
    for u in UPDATE:
        names = t.units[u].param_names
        acc = math.sqrt(sum(t.params[n].grad.double().pow(2).sum().item() for n in names))
        assert close(v["grad_norm"][u], acc)
        ty = sum((t.params[n].detach() * t.params[n].grad).abs().double().sum().item() for n in names)
        assert close(v["taylor"][u], ty)
        # not the last micro-batch alone, nor a sum of per-micro-batch norms
        last = math.sqrt(sum((t.params[n].grad - first[n]).double().pow(2).sum().item() for n in names))
        sep = math.sqrt(sum(first[n].double().pow(2).sum().item() for n in names) + last ** 2)
        assert not close(v["grad_norm"][u], last, 1e-3) and not close(v["grad_norm"][u], sep, 1e-3)
    t.abort_step()


@pytest.mark.parametrize("name", ["grad_norm", "taylor", "act_grad_norm", "act_norm"])
def test_detached_signal_stops_reading(name):
    model = causal_lm("llama")
    t = tuner(model, plan(*UPDATE), signals=[name])
    t.close_hooks()
    t.begin_step()
    t.model(**batch()).loss.backward()
    assert t.signal_values()[name] == {}
    t.abort_step()


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


@contextmanager
def host_syncs():
    """Counts the Tensor calls that read a value back to the host (a device sync on CUDA)."""
    calls = []
    originals = {n: getattr(torch.Tensor, n) for n in SYNCS}

    def counting(n, f):
        def wrapper(self, *a, **kw):
            calls.append(n)
            return f(self, *a, **kw)
        return wrapper
    for n, f in originals.items():
        setattr(torch.Tensor, n, counting(n, f))
    try:
        yield calls
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def syncs_per_phase(signals):
    """Host syncs in each phase of one engine step (two micro-batches, a probed block)."""
    t = tuner(causal_lm("llama"), plan(*UPDATE, probe=("block.1",)), signals=signals)
    counts = {}
    with host_syncs() as c:
        t.begin_step()
    counts["begin_step"] = len(c)
    losses, counts["forward"], counts["backward"] = [], 0, 0
    for b in (batch(1, 2), batch(2, 2)):
        with host_syncs() as c:
            loss = t.model(**b).loss
        counts["forward"] += len(c)
        with host_syncs() as c:
            (loss * 0.5).backward()
        counts["backward"] += len(c)
        losses.append(loss.detach())
    with host_syncs() as c:
        t.after_backward()
        t.optimizer.step()
        t.after_optimizer_step()
        t.optimizer.zero_grad(set_to_none=True)
        t.end_step(None)
    counts["rest"] = len(c)
    return counts


def test_signals_sync_once_per_step_and_never_in_backward():
    with_signals, without = syncs_per_phase(ALL), syncs_per_phase(())
    assert with_signals["backward"] == 0
    # forward hooks (act_norm) and the weight norms at begin_step read nothing back either
    assert with_signals["forward"] == without["forward"]
    assert with_signals["begin_step"] == without["begin_step"] == 0
    # every signal's readings come back in one transfer, when after_backward reads them
    assert with_signals["rest"] == without["rest"] + 1
