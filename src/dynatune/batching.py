"""Cutting a batch into smaller micro-batches, as an out-of-memory retry does (the plain loop and
DynatuneTrainer alike): tensors are sliced on their first dimension, everything else is kept."""
from __future__ import annotations

import torch


def n_examples(batch: dict) -> int | None:
    """Examples in `batch`: the first dimension of input_ids (else labels, else the first tensor
    that has one); None when no tensor has a first dimension."""
    t = batch.get("input_ids", batch.get("labels"))
    if not isinstance(t, torch.Tensor):
        t = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return None if t is None or not t.dim() else t.shape[0]


def split_batch(batch: dict, size: int) -> list[dict]:
    """`batch` as pieces of at most `size` examples."""
    n = n_examples(batch)
    return [{k: v[j:j + size] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
             for k, v in batch.items()} for j in range(0, n, size)]


def split_batches(batches: list[dict], size: int) -> list[dict]:
    """Each batch cut into pieces of at most `size` examples, in order."""
    return [piece for batch in batches for piece in split_batch(batch, size)]


def largest_shape(batches: list[dict]) -> tuple[int, int] | None:
    """(examples, tokens) of the largest batch, for calibrating the memory model; None unless every
    batch has 2-D input_ids."""
    ids = [b.get("input_ids") for b in batches]
    if any(not isinstance(t, torch.Tensor) or t.dim() != 2 for t in ids):
        return None
    return max(t.shape[0] for t in ids), max(t.shape[1] for t in ids)
