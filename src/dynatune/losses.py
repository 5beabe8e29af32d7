"""Chunked causal-LM loss: cross-entropy over a large vocabulary without full fp32 logits.

Hugging Face's causal-LM loss materialises the logits of every token (`B*S*V`, in the compute
dtype), an fp32 copy of them, and the fp32 log-softmax that cross-entropy saves for backward;
backward then holds the log-softmax, its gradient and the gradient of the logits at once, about
12 bytes per logit. For Qwen2-0.5B at 16 x 256 tokens that is 7 GiB, more than the weights, the
gradients and the AdamW state together. Here the tokens are cut into chunks of `chunk_tokens`:
each chunk's logits live only while that chunk is processed, forward and backward alike (backward
recomputes them), and only the per-token log-sum-exp (4 bytes a token) is kept in between.

What it saves for backward (priced by memory/model.py): the hidden states of the tokens that have
a label (a gathered copy), their targets and log-sum-exps. Transient, per chunk: the chunk's
logits in the compute dtype and in fp32 (plus the exp inside logsumexp in forward), and, in
backward, the fp32 gradient of the head weight (it becomes `.grad`) and a compute-dtype copy of
the head weight when the compute dtype differs from the weight's (autocast).

    loss = chunked_causal_lm_loss(model, batch, chunk_tokens=1024)   # instead of model(**batch).loss

Values and gradients equal the full cross-entropy within rounding (tests/test_losses.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DynatuneError
from .units import unwrap_peft

DEFAULT_CHUNK_TOKENS = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in here: autocast's when it is on, else the input's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(h W^T + b)[target], computed chunk by chunk.

    forward saves h, W, b, targets and the per-row log-sum-exp; backward recomputes each chunk's
    logits and returns dL/dh, dL/dW (accumulated in fp32) and dL/db.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, cdtype):
        dev = h.device.type
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            n = h.shape[0]
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                logits = F.linear(h[s:s + chunk].to(cdtype), w, b).float()
                lse_c = torch.logsumexp(logits, dim=-1)
                lse[s:s + chunk] = lse_c
                total += (lse_c - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
                del logits
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk, ctx.cdtype = chunk, cdtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, targets, lse = ctx.saved_tensors
        chunk, cdtype = ctx.chunk, ctx.cdtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev = h.device.type
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
            g = grad_total.float()
            for s in range(0, h.shape[0], chunk):
                h_c = h[s:s + chunk]
                p = F.linear(h_c.to(cdtype), w, b).float()
                # softmax - one_hot, scaled by the incoming gradient: d(sum of losses)/d logits
                p.sub_(lse[s:s + chunk, None]).exp_()
                rows = torch.arange(p.shape[0], device=p.device)
                p[rows, targets[s:s + chunk]] -= 1.0
                p.mul_(g)
                if need_h:
                    grad_h[s:s + chunk] = (p.to(cdtype) @ w).to(h.dtype)
                if need_w:  # fp32 accumulation, and no V x H temporary per chunk
                    grad_w.addmm_(p.t(), h_c.float())
                if need_b:
                    grad_b += p.sum(0)
                del p
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def causal_lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                               ignore_index: int = -100, num_items_in_batch=None) -> torch.Tensor:
    """Causal-LM cross-entropy from the last hidden states and the output head, in chunks.

    hidden: (B, S, H) final hidden states (after the final norm); weight: (V, H) head weight;
    labels: (B, S) token ids, `ignore_index` where no loss is taken. The shift is done here, as
    Hugging Face does: the hidden state at position t predicts labels[t + 1]. Reduction: mean over
    the tokens that have a label, or sum / num_items_in_batch when that is given (HF's convention
    for gradient accumulation).
    """
    if chunk_tokens < 1:
        raise DynatuneError(f"chunk_tokens must be at least 1, got {chunk_tokens}.")
    if hidden.shape[:-1] != labels.shape:
        raise DynatuneError(f"labels of shape {tuple(labels.shape)} do not match hidden states of shape "
                            f"{tuple(hidden.shape)} (need labels of shape (batch, seq)).")
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    valid = (targets != ignore_index).nonzero().squeeze(1)
    h = flat.index_select(0, valid)
    t = targets.index_select(0, valid).to(torch.long)
    total = _ChunkedCrossEntropy.apply(h, weight, bias, t, int(chunk_tokens), _compute_dtype(flat))
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / valid.numel()


def check_chunkable(model) -> None:
    """Raise unless the model's logits are a plain linear map of its last hidden states."""
    model = unwrap_peft(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise DynatuneError(f"chunked_loss needs a causal-LM model with a linear output head; "
                            f"{type(model).__name__} has none (use chunked_loss=0).")
    cfg = getattr(model, "config", None)
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0)):
        v = getattr(cfg, key, neutral)
        if v is not None and v != neutral and not (key == "logit_scale" and v == 1.0):
            raise DynatuneError(f"chunked_loss does not apply {key}={v} of {type(model).__name__}; "
                                "use chunked_loss=0 for this model.")


def chunked_causal_lm_loss(model, batch: dict, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           ignore_index: int = -100) -> torch.Tensor:
    """`model(**batch).loss` for a causal LM, without materialising the full logits.

    Runs the model's backbone (`model.base_model`: the blocks and the final norm, truncated by an
    early exit like the full forward) for the last hidden states, then the head and the loss in
    chunks of `chunk_tokens` tokens.
    """
    check_chunkable(model)
    inner = unwrap_peft(model)
    if "labels" not in batch:
        raise DynatuneError("chunked_causal_lm_loss needs 'labels' in the batch.")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
    backbone = inner.base_model
    if backbone is inner:
        raise DynatuneError(f"{type(inner).__name__} exposes no backbone (base_model); chunked_loss needs a "
                            "Hugging Face *ForCausalLM model.")
    out = backbone(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = inner.get_output_embeddings()
    return causal_lm_loss_from_hidden(hidden, head.weight, batch["labels"], bias=head.bias,
                                      chunk_tokens=chunk_tokens, ignore_index=ignore_index,
                                      num_items_in_batch=batch.get("num_items_in_batch"))
