"""Memory: what a step holds, counted while it runs and predicted before it runs (docs/memory.md).

- counting.py: live bytes by term (weights, gradients, optimizer state, saved activations by block);
- budget.py: budget values (bytes or a fraction of full fine-tuning), the margin, BudgetError;
- probe.py: saved activations per block state, measured on a small CPU model of the architecture;
- model.py: MemoryModel, a plan's predicted counted bytes and CUDA peak, per term;
- install.py: a budget put on a run (resolved, checked against the smallest plan, given to the tuner).
"""
from .budget import (BUDGET_FORMS, BYTE_UNITS, DEFAULT_MARGIN, BudgetError, check_margin, fmt_bytes, parse_budget,
                     resolve_budget, usable_budget)
from .counting import (MemoryRecord, SavedTensorCounter, grad_bytes, optimizer_bytes, optimizer_state_tensors,
                       storage_key, unique_bytes, weight_bytes)
from .install import check_budget_floor, full_finetuning_peak, install_budget, largest_prediction, smallest_plan
from .model import CUDA_WORKSPACE_BYTES, DEVICE_TYPES, LOSSES, MemoryModel, OptimizerSpec, Prediction
from .probe import PROBE_LAYERS, PROBE_SEQ_LENS, ActivationProbe, ProbeResult, block_states, build_small_like

__all__ = [
    "BUDGET_FORMS", "BYTE_UNITS", "DEFAULT_MARGIN", "BudgetError", "check_margin", "fmt_bytes", "parse_budget",
    "resolve_budget", "usable_budget",
    "MemoryRecord", "SavedTensorCounter", "grad_bytes", "optimizer_bytes", "optimizer_state_tensors", "storage_key",
    "unique_bytes", "weight_bytes",
    "check_budget_floor", "full_finetuning_peak", "install_budget", "largest_prediction", "smallest_plan",
    "CUDA_WORKSPACE_BYTES", "DEVICE_TYPES", "LOSSES", "MemoryModel", "OptimizerSpec", "Prediction",
    "PROBE_LAYERS", "PROBE_SEQ_LENS", "ActivationProbe", "ProbeResult", "block_states", "build_small_like",
]
