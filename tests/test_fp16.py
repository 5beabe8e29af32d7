"""amp-fp16 (fp16 autocast with dynamic loss scaling): refused on the CPU in one sentence, priced by
the memory model as amp-bf16 byte for byte. Training in fp16 needs a CUDA device and is not tested
here (the test machines have none); the loop's loss-scaling plumbing is tested on the CPU with a
CPU GradScaler in an fp32 run, and the signals' unscaling directly."""
import pytest

from dynatune.cli import main
from dynatune.config import load_config
from dynatune.errors import DynatuneError
from dynatune.loop import fit
from dynatune.memory import MemoryModel
from dynatune.methods import build_method
from dynatune.precision import autocast_for, grad_scaler

from scripted import plan
from tiny import causal_lm, collate, config, lm_examples, loop_cfg


def test_cpu_refuses_amp_fp16_in_one_sentence(tmp_path, capsys):
    assert load_config(None, ["precision=amp-fp16"]).precision == "amp-fp16"   # a valid setting
    with pytest.raises(DynatuneError) as err:
        fit(causal_lm("llama"), build_method("full"), lm_examples(8), collate, loop_cfg(precision="amp-fp16"))
    assert str(err.value) == ("precision=amp-fp16 (fp16 autocast with loss scaling) needs a CUDA device, and this run "
                              "is on the CPU; use precision=amp-bf16 or fp32 there.")
    # the CLI says it before loading anything, and writes nothing
    run = tmp_path / "run"
    assert main(["train", "precision=amp-fp16", "device=cpu", f"output_dir={run}"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not run.exists()
    assert grad_scaler("fp32", "cpu") is None and grad_scaler("amp-bf16", "cuda") is None
    with pytest.raises(DynatuneError, match="needs a CUDA device"):
        grad_scaler("amp-fp16", "cpu")


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_amp_fp16_is_priced_like_amp_bf16(device_type):
    kw = dict(device_type=device_type, batch_shape=(4, 16))
    p = plan("block.2", "block.3", "norm", "embedding")
    fp16 = MemoryModel.from_config(config("llama"), precision="amp-fp16", **kw).predict(p)
    bf16 = MemoryModel.from_config(config("llama"), precision="amp-bf16", **kw).predict(p)
    fp32 = MemoryModel.from_config(config("llama"), precision="fp32", **kw).predict(p)
    assert fp16.terms == bf16.terms and fp16.phases == bf16.phases
    assert fp16.predicted_peak_bytes == bf16.predicted_peak_bytes
    assert (fp16.weights, fp16.gradients, fp16.optimizer) == (fp32.weights, fp32.gradients, fp32.optimizer)
    assert fp16.activations < fp32.activations   # two-byte saved activations


def test_amp_fp16_autocast_is_fp16():
    import torch
    with autocast_for("amp-fp16", "cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float16


def test_gradient_signals_are_read_unscaled(one_thread):
    """Backward on a loss scaled by 1024 (what GradScaler does) reads the same signal values once the
    tuner knows the scale; forward-only signals are left alone."""
    from scripted import tuner
    batch = collate(lm_examples(4, seq=12))
    seen = []
    for scale in (1.0, 1024.0):
        t = tuner(causal_lm("llama"), plan("block.2", "block.3", "norm"),
                  signals=("act_grad_norm", "grad_norm", "act_norm"))
        t.begin_step()
        (t.model(**batch).loss * scale).backward()
        t.grad_scale = scale
        seen.append(t.signal_values())
        t.abort_step()
        t.close_hooks()
    plain, scaled = seen
    for name in ("act_grad_norm", "grad_norm", "act_norm"):
        assert plain[name] and set(plain[name]) == set(scaled[name])
        for u in plain[name]:
            assert scaled[name][u] == pytest.approx(plain[name][u], rel=1e-6), (name, u)


@pytest.mark.parametrize("method,options", [("topk", dict(k=2)), ("trims", {})])
def test_the_loops_loss_scaling_path_equals_no_scaling(one_thread, tmp_path, monkeypatch, method, options):
    """The loop's GradScaler plumbing, exercised on the CPU: a scaler with a power-of-two scale in an
    fp32 run (scaling and unscaling by 2**10 is exact) gives the same losses, plans and weights as no
    scaler, so gradients are unscaled before clipping (grad_clip=0.5 clips these steps: a scaled
    norm would clip differently) and the scaler steps the optimizer. The scaler's state goes into
    the checkpoint. (test_gradient_signals_are_read_unscaled pins the signals.)"""
    import torch
    import dynatune.loop as loop

    def run(scaled, out):
        if scaled:
            monkeypatch.setattr(loop, "grad_scaler", lambda p, d: torch.amp.GradScaler("cpu", init_scale=1024.0))
        out.mkdir()
        cfg = loop_cfg(max_steps=6, max_length=12, grad_clip=0.5, checkpoint_every=6)
        t, state = fit(causal_lm("llama"), build_method(method, seed=0, **options), lm_examples(24, seq=12), collate,
                       cfg, out_dir=out)
        t.close_hooks()
        monkeypatch.undo()
        return t, state

    (a, sa), (b, sb) = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    assert [h["update"] for h in a.history] == [h["update"] for h in b.history]
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    assert sa.grad_scaler is None and sb.grad_scaler["scale"] == 1024.0  # 6 steps < growth_interval: no growth
    saved = torch.load(tmp_path / "b" / "checkpoints" / "step-6" / "state.pt", weights_only=False)
    assert saved["loop"]["grad_scaler"]["scale"] == 1024.0
