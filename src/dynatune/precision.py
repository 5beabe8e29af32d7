"""Training precisions, defined once for the config, the loop, the planner and the memory model.

fp32: everything in fp32; amp-bf16: fp32 weights, gradients and optimizer state, the forward under
bf16 autocast; amp-fp16: the same under fp16 autocast, with dynamic loss scaling
(torch.amp.GradScaler) because fp16 gradients underflow; a CUDA device only; bf16: pure bf16 (the
model itself is cast).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import DynatuneError

PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16")
AUTOCAST = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DynatuneError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")


def check_device(precision: str, device_type: str) -> None:
    """amp-fp16 trains on a CUDA device only: one sentence before anything trains elsewhere."""
    if precision == "amp-fp16" and device_type != "cuda":
        raise DynatuneError(f"precision=amp-fp16 (fp16 autocast with loss scaling) needs a CUDA device, and this run "
                            f"is on the {device_type.upper()}; use precision=amp-bf16 or fp32 there.")


def autocast_for(precision: str, device_type: str):
    """bf16 / fp16 autocast on `device_type` under amp-bf16 / amp-fp16; a context that does nothing otherwise."""
    if precision in AUTOCAST:
        return torch.autocast(device_type, dtype=AUTOCAST[precision])
    return nullcontext()


def priced_as(precision: str) -> str:
    """The precision the memory model measures for `precision`: amp-fp16 saves and casts exactly the
    bytes amp-bf16 does (two-byte autocast over fp32 weights), and the probe runs on the CPU, where
    bf16 autocast is the measured one."""
    return "amp-bf16" if precision == "amp-fp16" else precision


def grad_scaler(precision: str, device_type: str):
    """A GradScaler for amp-fp16 (dynamic loss scaling), None for every other precision."""
    if precision != "amp-fp16":
        return None
    check_device(precision, device_type)
    return torch.amp.GradScaler(device_type)
