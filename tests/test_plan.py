"""Applying a plan: what updates, what holds a gradient, where backward stops, what runs."""
import pytest
import torch

from dynatune.errors import DynatuneError

from scripted import output_requires_grad_recorder, plan, snapshot, step, tuner
from tiny import causal_lm, classifier, cls_examples, collate, lm_examples


def lm_batches(n, seed=1):
    data = lm_examples(4 * n, seed=seed)
    return [collate(data[4 * i:4 * i + 4]) for i in range(n)]


def cls_batches(n, seed=1):
    data = cls_examples(4 * n, seed=seed)
    return [collate(data[4 * i:4 * i + 4]) for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_units_outside_plan_do_not_change_and_hold_no_grad(arch):
    if arch == "llama":
        model, batches, update = causal_lm("llama"), lm_batches(3), {"block.1", "norm"}
    else:
        model, batches, update = classifier("bert"), cls_batches(3), {"block.2", "head"}
    t = tuner(model, plan(*update))
    inside = set(t.units.param_names(update))
    before = snapshot(model)
    grads_seen = []

    def inspect(t):
        grads_seen.append({n for n, p in model.named_parameters() if p.grad is not None})

    for b in batches:
        step(t, b, inspect)
    assert grads_seen == [inside] * 3  # exactly the plan's parameters hold a gradient
    for n, p in model.named_parameters():
        if n in inside:
            assert not torch.equal(p, before[n]), f"{n} is in the plan but did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} is outside the plan but changed"
        assert p.grad is None


@pytest.mark.parametrize("policy", ["keep", "drop", "offload"])
def test_unit_first_selected_late_trains_at_that_step(policy):
    """Freezing before the optimizer exists would leave block.0 out of it: it must train at step 3."""
    model = causal_lm("llama")
    plans = [plan("block.2")] * 3 + [plan("block.0", "block.2"), plan("block.0")]
    t = tuner(model, plans, state_policy=policy)
    b0 = t.units.param_names(["block.0"])
    b2 = t.units.param_names(["block.2"])
    history = [snapshot(model)]
    for b in lm_batches(5):
        step(t, b)
        history.append(snapshot(model))
    for s in range(1, 4):  # steps 0, 1, 2: block.0 untouched
        assert all(torch.equal(history[s][n], history[0][n]) for n in b0)
    assert all(not torch.equal(history[4][n], history[3][n]) for n in b0), "block.0 did not train at step 3"
    assert all(not torch.equal(history[5][n], history[4][n]) for n in b0)
    assert all(not torch.equal(history[4][n], history[3][n]) for n in b2)
    assert all(torch.equal(history[5][n], history[4][n]) for n in b2)  # block.2 left at step 4
    assert all(p in t.optimizer.state for p in (t.params[n] for n in b0))
    # block.2 left the plan: its state follows the policy
    left = [t.params[n] for n in b2]
    assert all((p in t.optimizer.state) == (policy == "keep") for p in left)
    assert set(t.states.host) == (set(b2) if policy == "offload" else set())


@pytest.mark.parametrize("probe", [False, True])
def test_backward_stops_below_lowest_unit(probe):
    """The output of the block below the lowest updated (or probed) unit does not require grad, and the
    blocks below it save nothing for backward."""
    model = causal_lm("llama")
    p = plan("block.3", probe=["block.2"]) if probe else plan("block.2")
    t = tuner(model, p)
    seen, handles = output_requires_grad_recorder(model.model.layers)
    step(t, lm_batches(1)[0])
    for h in handles:
        h.remove()
    assert seen == {0: [False], 1: [False], 2: [True], 3: [True]}
    by_block = t.counter.by_block
    assert by_block.get("block.0", 0) == 0 and by_block.get("block.1", 0) == 0
    assert by_block["block.3"] > 0
    if probe:  # a probed block's weights are not on the path: its output is a leaf, it saves nothing
        assert by_block.get("block.2", 0) == 0
    else:
        assert by_block["block.2"] > 0
    assert t.record.activations == sum(by_block.values())


def test_backward_stops_below_lowest_module_unit():
    model = classifier("bert")
    t = tuner(model, plan("block.2.output.dense", "head"), granularity="module")
    seen, handles = output_requires_grad_recorder(model.bert.encoder.layer)
    before = snapshot(model)
    step(t, cls_batches(1)[0])
    assert seen == {0: [False], 1: [False], 2: [True], 3: [True]}
    assert t.counter.by_block.get("block.0", 0) == 0 and t.counter.by_block.get("block.1", 0) == 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"bert.encoder.layer.2.output.dense.weight", "bert.encoder.layer.2.output.dense.bias",
                       "classifier.weight", "classifier.bias"}


def test_no_hook_fires_in_exited_blocks():
    model = causal_lm("llama")
    t = tuner(model, plan("block.1", "norm", exit_depth=2))
    calls = {i: 0 for i in range(4)}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(t.block_stack.full)]
    before = snapshot(model)
    for b in lm_batches(2):
        step(t, b)
    assert calls == {0: 2, 1: 2, 2: 0, 3: 0}
    assert set(t.counter.by_block) <= {"block.0", "block.1", "outside"}
    assert t.counter.by_block.get("block.0", 0) == 0  # below block.1: nothing saved
    for n in t.units.param_names(["block.2", "block.3", "block.0", "embedding"]):
        assert torch.equal(t.params[n], before[n])
    for h in handles:
        h.remove()


def test_plan_validation():
    t = tuner(causal_lm("llama"), plan("block.1"))
    with pytest.raises(DynatuneError, match="past the exit depth"):
        t.apply(plan("block.3", exit_depth=2))
    with pytest.raises(DynatuneError, match="outside 1..4"):
        t.apply(plan("block.0", exit_depth=5))
    with pytest.raises(DynatuneError, match="unknown unit"):
        t.apply(plan("block.7"))
    # a plan must stay inside the method's candidates
    t2 = tuner(causal_lm("llama"), plan("block.1"), candidates=["block.1", "block.2"])
    with pytest.raises(DynatuneError, match="candidates"):
        t2.apply(plan("block.3"))


def test_probe_reads_output_gradients_without_touching_weights():
    """Plan(update={block.3}, probe={block.1}): act_grad_norm for blocks 1, 2, 3 only; block.1 gets no grad."""
    model = causal_lm("llama")
    t = tuner(model, plan("block.3", probe=["block.1"]), signals=["act_grad_norm", "grad_norm"])
    before = snapshot(model)
    grads = {}
    step(t, lm_batches(1)[0], lambda t: grads.update({n: p.grad is not None for n, p in t.params.items()}))
    values = t.signal_values()
    assert set(values["act_grad_norm"]) == {"block.1", "block.2", "block.3"}
    assert all(v > 0 for v in values["act_grad_norm"].values())
    assert set(values["grad_norm"]) == {"block.3"}
    inside3 = set(t.units.param_names(["block.3"]))
    assert {n for n, g in grads.items() if g} == inside3
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in inside3), n


def test_probe_params_read_gradients_but_do_not_update():
    model = causal_lm("llama")
    t = tuner(model, plan("block.3", probe_params=["block.1"]), signals=["grad_norm"])
    before = snapshot(model)
    grads = {}
    step(t, lm_batches(1)[0], lambda t: grads.update({n: p.grad is not None for n, p in t.params.items()}))
    assert set(t.signal_values()["grad_norm"]) == {"block.1", "block.3"}
    assert t.signal_values()["grad_norm"]["block.1"] > 0
    assert {n for n, g in grads.items() if g} == set(t.units.param_names(["block.3"]))  # freed before the step
    for n in t.units.param_names(["block.1"]):
        assert torch.equal(t.params[n], before[n])
        assert t.params[n] not in t.optimizer.state


def test_detach_tied_input_trains_embedding_from_head_side_only():
    """Tied llama, update={embedding}: without the flag backward runs through every block; with it, no
    block is on the backward path, yet the embedding still gets the head side's gradient."""
    batch = lm_batches(1)[0]

    # by hand: the head side only (input side's use of the weight is constant)
    ref = causal_lm("llama")
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"]).last_hidden_state
    w = ref.model.embed_tokens.weight
    logits = torch.nn.functional.linear(hidden, w)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                             batch["labels"][:, 1:].reshape(-1))
    expected = torch.autograd.grad(loss, w)[0]

    for detach in (False, True):
        model = causal_lm("llama")
        t = tuner(model, plan("embedding", detach_tied_input=detach))
        seen, handles = output_requires_grad_recorder(model.model.layers)
        t.begin_step()
        model(**batch).loss.backward()
        t.after_backward()
        g = model.model.embed_tokens.weight.grad
        assert g is not None and g.abs().sum() > 0
        assert all(p.grad is None for n, p in model.named_parameters() if ".layers." in n)
        blocks_saved = sum(v for k, v in t.counter.by_block.items() if k.startswith("block."))
        if detach:
            assert seen == {i: [False] for i in range(4)}
            assert blocks_saved == 0
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
        else:
            assert seen == {i: [True] for i in range(4)}
            assert blocks_saved > 0
            assert not torch.allclose(g, expected, rtol=1e-3, atol=1e-6)  # the input side adds to it
        for h in handles:
            h.remove()
        t.optimizer.zero_grad(set_to_none=True)
        t.end_step()
