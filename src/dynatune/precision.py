"""Training precisions, defined once for the config, the loop, the planner and the memory model.

fp32: everything in fp32; amp-bf16: fp32 weights, gradients and optimizer state, the forward under
bf16 autocast; bf16: pure bf16 (the model itself is cast).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import DynatuneError

PRECISIONS = ("fp32", "amp-bf16", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DynatuneError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")


def autocast_for(precision: str, device_type: str):
    """bf16 autocast on `device_type` under amp-bf16; a context that does nothing otherwise."""
    if precision == "amp-bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()
