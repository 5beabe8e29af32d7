"""Counted bytes are exact for weights, gradients and optimizer state, and follow the plan."""
import pytest
import torch
from torch import nn

from scripted import adam_state_bytes, plan, step, tuner
from tiny import causal_lm, collate, lm_examples

CPU = torch.device("cpu")
A = plan("embedding", "block.0", "block.1", "norm")   # LISA-style: embeddings + 2 blocks + norm
B = plan("embedding", "block.2", "block.3", "norm")


def batches(n, seed=1):
    data = lm_examples(4 * n, seed=seed)
    return [collate(data[4 * i:4 * i + 4]) for i in range(n)]


def params_of(t, units):
    return [t.params[n] for n in t.units.param_names(units)]


@pytest.mark.parametrize("policy", ["drop", "offload"])
def test_optimizer_bytes_drop_by_the_evicted_state_at_a_switch(policy):
    model = causal_lm("llama")
    t = tuner(model, [A, A, B], state_policy=policy)
    data = batches(3)
    for b in data[:2]:
        step(t, b)
    # after steps under A: exactly A's AdamW state, by hand (exp_avg + exp_avg_sq + 4-byte step)
    in_a = params_of(t, A.update)
    assert t.record.optimizer == adam_state_bytes(in_a)
    assert t.record.offloaded == 0
    resident_before = t.states.resident_bytes(CPU)
    evicted = adam_state_bytes(params_of(t, ["block.0", "block.1"]))

    t.begin_step()  # switch to B: block.0/1 leave
    assert t.states.resident_bytes(CPU) == resident_before - evicted
    if policy == "drop":
        assert t.states.offloaded_bytes() == 0
    else:
        assert t.states.offloaded_bytes() == evicted
    t.model(**data[2]).loss.backward()
    t.after_backward()
    t.optimizer.step()
    t.after_optimizer_step()
    # B's state now exists; A's left blocks are gone from the device
    assert t.record.optimizer == adam_state_bytes(params_of(t, B.update))
    assert t.record.offloaded == (evicted if policy == "offload" else 0)
    t.optimizer.zero_grad(set_to_none=True)
    t.end_step()


def test_keep_policy_grows_to_the_union():
    t = tuner(causal_lm("llama"), [A, B], state_policy="keep")
    for b in batches(2):
        step(t, b)
    assert t.record.optimizer == adam_state_bytes(params_of(t, A.update | B.update))


def test_lisa_with_drop_holds_only_the_current_plans_state():
    from dynatune.loop import fit
    from dynatune.methods import build_method
    from dynatune.methods.baselines import LisaConfig
    from tiny import loop_cfg
    seen_plans = set()

    def check(tuner, state):
        seen_plans.add(tuple(tuner.plan.update))
        assert tuner.record.optimizer == adam_state_bytes(params_of(tuner, tuner.plan.update))

    t, _ = fit(causal_lm("llama"), build_method("lisa", LisaConfig(k=1, period=1, state_policy="drop"), seed=3),
               lm_examples(24), collate, loop_cfg(max_steps=6, batch_size=4), on_step=check)
    assert len(seen_plans) > 1  # it really switched


def test_gradient_bytes_are_the_updated_parameters():
    model = causal_lm("llama")
    update = {"block.1", "norm"}
    t = tuner(model, plan(*update, probe_params=["block.3"], probe=["block.0"]))
    step(t, batches(1)[0])
    # probed parameters lent their gradient to a signal and freed it before the step
    assert t.record.gradients == sum(p.numel() * p.element_size() for p in params_of(t, update))


def test_weight_bytes_count_every_parameter_once_tied_included_even_after_exit():
    model = causal_lm("llama")
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once
    with_dup = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    emb = model.model.embed_tokens.weight
    assert with_dup - expected == emb.numel() * emb.element_size()
    t = tuner(model, [plan("block.1"), plan("block.1", exit_depth=2)])
    data = batches(2)
    step(t, data[0])
    assert t.record.weights == expected
    step(t, data[1])  # the exited blocks are still resident: their weights still count
    assert t.record.weights == expected
    assert t.record.counted == t.record.weights + t.record.gradients + t.record.optimizer + t.record.activations


def test_saved_activations_full_more_than_top1_more_than_zero():
    batch = batches(1)[0]
    acts = {}
    for name, p in {"full": None, "top1": plan("block.3", "norm"), "none-below-head": plan("norm")}.items():
        model = causal_lm("llama")
        if p is None:
            from dynatune.methods import build_method
            from dynatune.engine import Tuner
            t = Tuner(model, build_method("full"))
        else:
            t = tuner(model, p)
        step(t, batch)
        acts[name] = (t.record.activations, dict(t.counter.by_block))
    full, top1, norm_only = acts["full"][0], acts["top1"][0], acts["none-below-head"][0]
    assert full > top1 > norm_only > 0
    assert set(k for k, v in acts["top1"][1].items() if v > 0) == {"block.3", "outside"}
    assert set(k for k, v in acts["none-below-head"][1].items() if v > 0) == {"outside"}
    assert all(acts["full"][1][f"block.{i}"] > 0 for i in range(4))
    # with the whole model trainable, each block saves at least what it saves when frozen-on-path
    assert acts["full"][1]["block.3"] >= acts["top1"][1]["block.3"]


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)])

    def forward(self, x):
        for layer in self.stack:
            x = layer(x)
        return x


def test_autocast_bf16_copy_of_a_frozen_weight_is_counted():
    """A frozen linear on the backward path saves no input, and under fp32 nothing at all (its weight
    is a parameter); under bf16 autocast it saves a bf16 copy of its weight: new memory, counted."""
    torch.manual_seed(0)
    net = TwoLinears()
    t = tuner(net, plan("block.0"), layers="stack")  # block.1 frozen, on the backward path
    x = torch.randn(3, 8)
    counted = {}
    for amp in (False, True):
        t.begin_step()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = net(x)
        y.float().pow(2).sum().backward()
        t.after_backward()
        counted[amp] = dict(t.counter.by_block)
        t.optimizer.zero_grad(set_to_none=True)
        t.end_step()
    assert counted[False].get("block.1", 0) == 0
    assert counted[False]["block.0"] == 3 * 8 * 4  # the trainable linear saves its fp32 input
    assert counted[True]["block.1"] == 16 * 4 * 2  # bf16 copy of the frozen 16x4 weight
    assert counted[True]["block.0"] == 3 * 8 * 2   # bf16 copy of its input


def test_autocast_bf16_llama_counts_weight_copies_of_frozen_blocks_on_the_path():
    """block.2 updates, block.3 is frozen on the backward path: under bf16 autocast its counted bytes
    include at least the bf16 copies of its seven linear weights."""
    batch = batches(1)[0]
    model = causal_lm("llama")
    t = tuner(model, plan("block.2", "norm"))
    t.begin_step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    t.after_backward()
    linears = [m for m in model.model.layers[3].modules() if isinstance(m, nn.Linear)]
    bf16_weights = sum(m.weight.numel() * 2 for m in linears)
    assert t.counter.by_block["block.3"] >= bf16_weights
    t.abort_step()


def test_counting_a_forward_without_backward_frees_its_graph():
    # the memory model's probes run forward only; a saved output kept with its grad_fn would be a
    # reference cycle through C++ that no gc.collect() breaks
    import gc
    import weakref

    from dynatune.memory import SavedTensorCounter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid())
    counter = SavedTensorCounter(torch.device("cpu"))
    with counter.counting():
        out = net(torch.randn(4, 8))
    assert counter.total > 0  # the forward did save activations
    alive = weakref.ref(out)
    del out
    gc.collect()
    assert alive() is None


def test_only_saved_tensors_backward_can_use_are_counted():
    # peft DoRA builds lora_B(lora_A(eye)) with grad and uses it only detached: that graph, and what
    # it saved, is freed during the forward; a tensor saved later at the address it left still counts
    from dynatune.memory import SavedTensorCounter

    counter = SavedTensorCounter(torch.device("cpu"))
    a = torch.randn(256, requires_grad=True)
    with counter.counting():
        kept = torch.tanh(a)            # tanh saves its 1 KiB output for backward
        dropped = torch.tanh(2 * a)
        del dropped                     # its graph goes, and the output it saved
        assert counter.total == 1024
        again = torch.tanh(3 * a)
        assert counter.total == 2048
        (kept + again).sum().backward()
    assert counter.total == 2048        # what the backward held when it started
    # several backward passes (gradient accumulation): the largest one's saved bytes, not their sum
    with counter.counting():
        for _ in range(2):
            torch.tanh(a).sum().backward()
    assert counter.total == 1024
