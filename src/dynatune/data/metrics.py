"""Task metrics and the evaluation loop shared by every method (same numbers for all of them)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dynatune.data.tasks import column
from dynatune.errors import DynatuneError

# Which way each metric improves: model selection and early stopping need to know.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse"})
HIGHER_IS_BETTER = frozenset({"accuracy", "macro_f1", "mcc", "pearson", "exact_match"})


def higher_is_better(metric: str) -> bool:
    """True when larger values of `metric` are better; an unknown name is refused."""
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER:
        return False
    known = ", ".join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))
    raise DynatuneError(f"unknown metric '{metric}' for metric_for_best; choose one of: {known}.")


def improves(metric: str, value: float, best: float, threshold: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `threshold` in `metric`'s direction (NaN never does)."""
    return value > best + threshold if higher_is_better(metric) else value < best - threshold


def classification_metrics(preds, labels) -> dict[str, float]:
    """accuracy, macro-F1 over the classes that occur in preds or labels, Matthews correlation."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape or preds.size == 0:
        raise DynatuneError(f"need as many predictions as labels, and at least one "
                            f"(got {preds.size} and {labels.size}).")
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


def regression_metrics(preds, labels) -> dict[str, float]:
    """Pearson correlation and mean squared error."""
    from scipy.stats import pearsonr

    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if preds.shape != labels.shape or preds.size == 0:
        raise DynatuneError(f"need as many predictions as labels, and at least one "
                            f"(got {preds.size} and {labels.size}).")
    # Constant predictions (e.g. a collapsed head) carry no correlation; report 0 instead of NaN
    # so that model selection still works.
    if preds.size < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        pearson = 0.0
    else:
        pearson = float(pearsonr(preds, labels)[0])
    return {"pearson": pearson, "mse": float(np.mean((preds - labels) ** 2))}


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _batches(task_data, split: str, batch_size: int):
    """Length-sorted batches (less padding, same result): yields (row indices, collated batch)."""
    ds = task_data.split(split)
    order = np.argsort(np.asarray(column(ds, "length")), kind="stable")
    cols = ["input_ids", "attention_mask", "labels"]
    data = ds.with_format(None).select_columns(cols)[:]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [{c: data[c][i] for c in cols} for i in idx]
        yield idx, task_data.collate(rows)


@torch.no_grad()
def evaluate(model, task_data, split: str = "validation", batch_size: int = 32, device=None) -> dict[str, float]:
    """Run `model` over one split in eval mode and return the task's metrics plus loss.

    classification: accuracy, macro_f1, mcc; regression: pearson, mse; causal-lm: perplexity
    (token-weighted over label tokens) and, for SFT tasks with short answers, exact_match by
    greedy decoding. The model's train/eval mode is restored afterwards.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if task_data.kind == "causal-lm":
            result = _eval_causal(model, task_data, split, batch_size, device)
            if task_data.answers is not None:
                result["exact_match"] = exact_match(model, task_data, split, batch_size, device)
        else:
            result = _eval_heads(model, task_data, split, batch_size, device)
    finally:
        model.train(was_training)
    return {k: result[k] for k in task_data.metric_names if k in result} | result


def _eval_heads(model, task_data, split, batch_size, device):
    preds, labels, loss_sum, n = [], [], 0.0, 0
    for _, batch in _batches(task_data, split, batch_size):
        y = batch["labels"].to(device)
        logits = _logits(model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device))).float()
        if task_data.kind == "regression":
            p = logits.reshape(len(y), -1)[:, 0]
            loss_sum += F.mse_loss(p, y.float(), reduction="sum").item()
            preds.append(p.cpu())
        else:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(-1).cpu())
        labels.append(y.cpu())
        n += len(y)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    if task_data.kind == "regression":
        out = regression_metrics(preds, labels)
    else:
        out = classification_metrics(preds, labels)
    out["loss"] = loss_sum / max(n, 1)
    return out


def _eval_causal(model, task_data, split, batch_size, device):
    loss_sum, tokens = 0.0, 0
    for _, batch in _batches(task_data, split, batch_size):
        logits = _logits(model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)))
        # Position t predicts token t+1; -100 marks tokens that are not scored (prompt, padding).
        target = batch["labels"].to(device)[:, 1:]
        logits = logits[:, :-1]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                                    ignore_index=-100, reduction="sum").item()
        tokens += int((target != -100).sum())
    loss = loss_sum / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


def _answer_matches(generated: str, answer: str) -> bool:
    # The first line of the continuation is the answer; what follows it is not scored.
    text = generated.strip().split("\n")[0].strip()
    return text == answer.strip()


def exact_match(model, task_data, split: str, batch_size: int, device) -> float:
    """Share of examples whose greedy continuation of the prompt equals the answer."""
    prompts, answers = column(task_data.split(split), "prompt_ids"), task_data.answers[split]
    tok = task_data.tokenizer
    pad = tok.pad_token_id
    order = np.argsort([len(p) for p in prompts], kind="stable")
    hits = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = [prompts[i] for i in idx]
        width = max(len(p) for p in batch)
        # Left padding so that every prompt ends at the last position, where generation starts.
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        new = greedy_generate(model, ids.to(device), mask.to(device), task_data.max_new_tokens,
                              pad, tok.eos_token_id)
        for r, i in enumerate(idx):
            hits += _answer_matches(tok.decode(new[r].tolist(), skip_special_tokens=True), answers[i])
    return hits / max(len(order), 1)


def greedy_generate(model, ids, mask, max_new_tokens: int, pad_id: int, eos_id) -> torch.Tensor:
    """Greedy continuation of left-padded prompts; returns only the new tokens (B, <=max_new)."""
    if hasattr(model, "generate"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
        return out[:, ids.shape[1]:].cpu()
    # Wrappers without .generate (e.g. a truncated model): plain loop, no KV cache; answers are short.
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = _logits(model(input_ids=ids, attention_mask=mask, position_ids=pos))
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1).cpu()
