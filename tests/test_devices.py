"""Every method trains through the real loop on every device this machine has: the CPU in fp32,
and a CUDA GPU (where one is visible) under bf16 autocast. On each: the loss stays finite, a
parameter that no planned unit owns ends bit for bit where it started, and what the plans
trained did move. The CUDA cases are how the GPU session (benchmarks/gpu_session.sh) checks the
methods' device paths (calibration, importance forwards, offloaded state, row-sparse deltas)."""
import math

import pytest
import torch

from dynatune.loop import fit
from dynatune.methods import METHODS, build_method

from tiny import causal_lm, collate, lm_examples, loop_cfg

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])
# each method's quickest options on the tiny Llama; a method registered without an entry fails below
OPTIONS = {"full": {}, "topk": dict(k=1), "bottomk": dict(k=1), "lisa": dict(k=1, period=2), "random": {},
           "lora": dict(r=4), "dora": dict(r=4), "vera": dict(r=8), "trims": dict(tau=2),
           "gradselect": dict(k=0.5), "adagradselect": dict(k=0.3), "dynalora": dict(r=4, period=2),
           "dynavera": dict(r=8, period=2), "ist": dict(r=4, t_c=2), "spsft": dict(r=4)}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_on_the_device_and_moves_only_what_it_planned(name, device, one_thread):
    assert name in OPTIONS, f"add {name}'s quickest options to OPTIONS"
    model = causal_lm("llama").to(device)
    start = {id(p): p.detach().clone() for p in model.parameters()}  # the base weights as loaded
    after_first = {}

    def on_step(t, state):
        if not after_first:
            after_first.update({n: p.detach().clone() for n, p in t.params.items()})

    cfg = loop_cfg(max_steps=6, max_length=12, margin=0.03, precision="amp-bf16" if device == "cuda" else "fp32")
    # TriMS needs a budget: 80% of full fine-tuning's peak on the CPU; on a GPU the tiny model's
    # fixed CUDA workspace outweighs its weights, so the budget is one that every plan fits
    budget = {"trims": dict(budget=0.8 if device == "cpu" else "1GiB")}.get(name, {})
    t, _ = fit(model, build_method(name, seed=0, **OPTIONS[name], **budget), lm_examples(24), collate, cfg, on_step=on_step)
    t.close_hooks()
    trained = {u for h in t.history for u in h["update"]}
    assert all(math.isfinite(h["loss"]) for h in t.history if h.get("loss") is not None)
    assert {p.device.type for p in t.params.values()} == {device}
    owned = {id(t.params[n]) for u in trained for n in t.units[u].param_names}
    for n, p in t.params.items():
        if id(p) in start and id(p) not in owned:
            assert torch.equal(p, start[id(p)]), f"{n} moved although no planned unit owns it"
    moved = [n for u in trained for n in t.units[u].param_names if not torch.equal(t.params[n], after_first[n])]
    assert moved, "nothing the plans trained moved after the first step"
