"""The chunked causal-LM loss equals full cross-entropy: values and gradients (fp32 rounding)."""
import pytest
import torch
import torch.nn.functional as F

from dynatune.errors import DynatuneError
from dynatune.losses import causal_lm_loss_from_hidden, chunked_causal_lm_loss

from tiny import causal_lm, collate, lm_examples


def reference(hidden, weight, labels, bias=None):
    """Hugging Face's ForCausalLMLoss, written out: fp32 logits, pad-shift labels, mean CE."""
    logits = F.linear(hidden, weight, bias).float()
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)


def grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_full_cross_entropy_values_and_gradients(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    B, S, H, V = 3, 11, 16, 50
    hidden = torch.randn(B, S, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g).mul_(0.3).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = -100  # prompt tokens without a loss
    labels[2, 7] = -100
    ts = [hidden, weight] + ([bias] if with_bias else [])
    ref, ref_g = grads(lambda: reference(hidden, weight, labels, bias), *ts)
    got, got_g = grads(lambda: causal_lm_loss_from_hidden(hidden, weight, labels, bias=bias, chunk_tokens=chunk), *ts)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_model_level_loss_equals_hf_loss_and_gradients():
    torch.manual_seed(0)
    model = causal_lm("llama")  # tied embeddings: the head weight is the embedding too
    batch = collate(lm_examples(4, seq=12))
    batch["labels"][:, :3] = -100
    hf_loss = model(**batch).loss
    hf_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = chunked_causal_lm_loss(model, batch, chunk_tokens=5)
    loss.backward()
    assert torch.allclose(loss, hf_loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-6), n


def test_under_autocast_close_to_hf_loss():
    model = causal_lm("qwen2")  # untied head
    batch = collate(lm_examples(4, seq=12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**batch).loss
        got = chunked_causal_lm_loss(model, batch, chunk_tokens=8)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_bad_inputs_are_clear():
    with pytest.raises(DynatuneError, match="chunk_tokens"):
        causal_lm_loss_from_hidden(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long),
                                   chunk_tokens=0)
    with pytest.raises(DynatuneError, match="labels"):
        chunked_causal_lm_loss(causal_lm("llama"), {"input_ids": torch.ones(1, 4, dtype=torch.long)})
