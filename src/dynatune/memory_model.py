"""The memory model: what a plan will cost, per term, before it runs (docs/memory.md).

TriMS's memory model (paper 000, eq. 1 and 4) made exact where it can be:

    M(plan) = M_B + sum_j M_P(j) + sum_{j on the backward path} M_A(j) + sum_{j updated} (M_G(j) + M_O(j))

- weights M_P: every parameter resident on the device (exited blocks too, unless offloaded), from
  parameter shapes and dtypes. A full-size model built on the meta device gives them exactly,
  with no memory.
- gradients M_G and optimizer state M_O: of the units that update, from the same shapes and the
  optimizer's state layout (AdamW: two moments; SGD with momentum: one buffer; Adafactor: row and
  column factors). Offloaded state is reported apart.
- saved activations M_A: *measured*, not guessed. A probe builds the same architecture with 4
  blocks on the CPU, applies a small plan that puts its blocks in the states the real plan needs
  (lowest updated block, updated, frozen on the backward path, adapter-trained, ...), runs forwards
  at four small shapes under saved_tensors_hooks (memory.SavedTensorCounter, deduplicated by
  storage, attributed to blocks), and fits per state bytes = a*B*S + c*B*S^2 + e*S + k.
  Blocks are identical, so the real model's blocks cost the sum of their states' fits.
- M_B: what lives outside the blocks (embedding outputs, final norm, the head's saved input, the
  loss's saved log-softmax: also measured by the probe) plus the transients a CUDA allocator sees
  at the step's high-water marks (logits and their fp32 copy, the loss gradient, optimizer
  scratch, cuBLAS workspaces), from the loss implementation's known allocations.

Two numbers come out of `predict`:
- `predicted_counted_bytes`: what memory.py counts (weights + gradients + optimizer + saved
  activations), comparable on any device;
- `predicted_peak_bytes`: what torch.cuda.max_memory_allocated would report for the target device
  (`device_type`): the largest of the step's phases (forward at the loss, backward at the loss,
  the head's backward, the end of backward, the optimizer step).

CPU and CUDA attention differ: CUDA's flash and memory-efficient kernels save O(S) per head
(q, k, v, the output and a log-sum-exp), CPU's math fallback saves S x S probabilities. When a CPU
probe sees the math kernel and the target is CUDA, the probe is rerun with an attention that saves
exactly what the fused CUDA kernels save, so a CPU estimates a GPU.
"""
from __future__ import annotations

import copy
import math
import re
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch import nn

from .errors import DynatuneError
from .memory import SavedTensorCounter
from .plan import Plan
from .units import Units, get_submodule, partition

PRECISIONS = ("fp32", "amp-bf16", "bf16")
LOSSES = ("hf", "chunked", "sliced")
DEFAULT_MARGIN = 0.03
# cuBLAS workspaces on Hopper: 32 MiB per (handle, stream); forward runs on the main thread's
# handle and backward on the autograd device thread's, so two are live at the peak.
CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20
PROBE_SEQ_LENS = (16, 24, 32)
PROBE_LAYERS = 4
GiB = 2**30


class BudgetError(DynatuneError):
    """A plan (or every plan a method could choose) is predicted above the memory budget."""

    def __init__(self, message: str, *, predicted_bytes: int | None = None, budget_bytes: int | None = None,
                 required_budget_bytes: int | None = None):
        super().__init__(message)
        self.predicted_bytes = predicted_bytes
        self.minimum_bytes = predicted_bytes  # for the smallest plan: the minimum that any plan needs
        self.budget_bytes = budget_bytes
        self.required_budget_bytes = required_budget_bytes


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Optimizers: state layout and step scratch
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer facts the memory model needs (state per parameter, scratch in the step).

    name: adamw | adam | sgd | adafactor. `foreach=None` is torch's default: the multi-tensor path
    on CUDA (its scratch holds one temporary per updated parameter at once), the per-parameter
    loop on the CPU (scratch of the largest parameter only). AdamW/Adafactor keep a 4-byte `step`
    tensor per parameter on the CPU (on the device when fused or capturable).
    """

    name: str = "adamw"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    amsgrad: bool = False
    foreach: bool | None = None
    fused: bool = False
    capturable: bool = False

    NAMES = ("adamw", "adam", "sgd", "adafactor")

    @staticmethod
    def parse(spec) -> "OptimizerSpec":
        if isinstance(spec, OptimizerSpec):
            return spec
        if spec is None:
            return OptimizerSpec()
        if isinstance(spec, torch.optim.Optimizer):
            d = spec.defaults
            name = type(spec).__name__.lower()
            if name not in OptimizerSpec.NAMES:
                raise DynatuneError(f"the memory model knows the state of {', '.join(OptimizerSpec.NAMES)}, not "
                                    f"{type(spec).__name__}; price it as the closest one (e.g. optimizer='adamw').")
            return OptimizerSpec(name, float(d.get("momentum", 0.0) or 0.0), bool(d.get("nesterov", False)),
                                 float(d.get("weight_decay", 0.0) or 0.0), bool(d.get("amsgrad", False)),
                                 d.get("foreach"), bool(d.get("fused") or False), bool(d.get("capturable", False)))
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s in ("sgd-momentum", "sgdm"):
                return OptimizerSpec("sgd", momentum=0.9)
            if s in OptimizerSpec.NAMES:
                return OptimizerSpec(s)
        raise DynatuneError(f"unknown optimizer {spec!r}; use one of adamw, adam, sgd, sgd-momentum, adafactor.")

    def state_bytes(self, shape: tuple, elem: int, device_type: str) -> int:
        """Device bytes of one parameter's state (a CPU-resident `step` counts only on a CPU target)."""
        numel = math.prod(shape)
        step_here = 4 if (device_type == "cpu" or self.fused or self.capturable) else 0
        if self.name in ("adamw", "adam"):
            return numel * elem * (3 if self.amsgrad else 2) + step_here
        if self.name == "sgd":
            return numel * elem if self.momentum else 0
        if self.name == "adafactor":
            cpu_step = 4 if device_type == "cpu" else 0  # always a CPU tensor
            if len(shape) > 1:
                rows = math.prod(shape[:-1])
                cols = math.prod(shape[:-2]) * shape[-1]
                return (rows + cols) * elem + cpu_step
            return numel * elem + cpu_step
        raise DynatuneError(f"unknown optimizer {self.name!r}.")

    def multi_tensor(self, device_type: str) -> bool:
        if self.fused:
            return False
        return self.foreach if self.foreach is not None else device_type == "cuda"

    def scratch_bytes(self, sizes: list[int], device_type: str) -> int:
        """Temporaries inside `step()` for parameters of these byte sizes."""
        if not sizes or self.fused:
            return 0
        multi = self.multi_tensor(device_type)
        if self.name in ("adamw", "adam"):
            # foreach: _foreach_sqrt(exp_avg_sq) for all at once (plus the grads + wd copy of
            # non-decoupled Adam); per-tensor: sqrt() and the division both allocate
            extra = sum(sizes) if (self.name == "adam" and self.weight_decay) else 0
            return (sum(sizes) + extra) if multi else 2 * max(sizes)
        if self.name == "sgd":
            copies = int(bool(self.weight_decay)) + int(bool(self.nesterov))
            return copies * (sum(sizes) if multi else max(sizes))
        if self.name == "adafactor":
            return sum(sizes) if multi else max(sizes)
        return 0


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------
BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
BUDGET_FORMS = ("give bytes with a unit and no space (e.g. 12GiB, 500MiB, 12GB, 1.5e9B; units B, KB, MB, GB, "
                "TB, KiB, MiB, GiB, TiB) or a fraction of full fine-tuning's predicted peak in (0, 1] (e.g. 0.6 or 60%)")
_BUDGET_RE = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)(?P<unit>[A-Za-z]*)$")


def _budget_error(value, why: str) -> DynatuneError:
    return DynatuneError(f"budget {value!r} {why}: {BUDGET_FORMS}.")


def parse_budget(value) -> tuple[str, float]:
    """('bytes', n) or ('fraction', f) from a budget value; raises with the accepted forms."""
    if isinstance(value, bool) or value is None:
        raise _budget_error(value, "is not a budget")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise _budget_error(value, "must be positive")
        if value > 1:
            raise _budget_error(value, "is a fraction above 1 (a byte count needs a unit)")
        return "fraction", float(value)
    if not isinstance(value, str):
        raise _budget_error(value, "is not a budget")
    s = value
    if s != s.strip() or " " in s or "\t" in s:
        raise _budget_error(value, "has a space in it")
    if s.endswith("%") and s.count("%") == 1:  # "60%": a percentage of full fine-tuning's peak
        m = _BUDGET_RE.match(s[:-1])
        pct = float(m.group("num")) if m and not m.group("unit") else float("nan")
        if not 0 < pct <= 100:
            raise _budget_error(value, "is not a percentage in (0, 100]")
        return "fraction", pct / 100
    if "%" in s:
        raise _budget_error(value, "uses a percent sign")
    if s.startswith("-"):
        raise _budget_error(value, "is negative")
    if s.startswith("+"):
        s = s[1:]
    m = _BUDGET_RE.match(s)
    if not m:
        raise _budget_error(value, "is not understood")
    num, unit = float(m.group("num")), m.group("unit")
    if not math.isfinite(num) or num <= 0:
        raise _budget_error(value, "must be positive")
    if unit == "":
        if num > 1:
            raise _budget_error(value, "is a fraction above 1 (a byte count needs a unit)")
        return "fraction", num
    if unit not in BYTE_UNITS:
        raise _budget_error(value, f"has an unknown unit {unit!r}")
    n = num * BYTE_UNITS[unit]
    if n < 1:
        raise _budget_error(value, "is less than one byte")
    return "bytes", n


def resolve_budget(value, full_peak_bytes: int | None = None) -> int:
    """A budget in bytes from "12GiB", "500MB", 0.6 (a fraction of full fine-tuning's predicted peak)...

    Accepted: a number with one of the units B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB,
    TiB (powers of 1024), written without a space; or a fraction in (0, 1] (a float, or a string
    such as "0.6"), which needs `full_peak_bytes`. Rejected, each with one sentence that gives the
    accepted forms: spaces ("12 GB"), negative values ("-1"), fractions above 1 ("1.5"), percent
    signs ("200%"), unknown units ("12G") and bare byte counts without a unit.
    """
    kind, x = parse_budget(value)
    if kind == "bytes":
        return int(x)
    if full_peak_bytes is None:
        raise DynatuneError(f"budget {value!r} is a fraction of full fine-tuning, which needs the memory "
                            "model's prediction of full fine-tuning; give bytes (e.g. 12GiB) instead.")
    return int(x * full_peak_bytes)


def usable_budget(budget_bytes: int, margin: float = DEFAULT_MARGIN) -> int:
    """What a plan may be predicted at: budget x (1 - margin)."""
    return int(budget_bytes * (1.0 - margin))


def check_margin(margin: float) -> float:
    if not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise DynatuneError(f"margin must be a fraction in [0, 1) of the budget kept free (default 0.03), "
                            f"got {margin!r}.")
    return float(margin)


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A plan's predicted bytes, per term.

    `counted_terms` sum to `predicted_counted_bytes` (what memory.py counts); `terms` sum to
    `predicted_peak_bytes` (torch.cuda.max_memory_allocated on the target device) at the phase
    where the step peaks (`peak_phase`); `phases` gives every phase's total.
    """

    batch_shape: tuple[int, int]
    weights: int
    gradients: int
    optimizer: int
    activations: int          # saved by the blocks (probe-measured, uncalibrated)
    activations_outside: int  # saved outside the blocks: embeddings, final norm, head input, loss
    offloaded: int
    predicted_counted_bytes: int
    predicted_peak_bytes: int
    peak_phase: str
    terms: dict
    phases: dict
    block_states: list
    kernel: str = ""
    trainable_params: int = 0

    @property
    def counted_terms(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations + self.activations_outside}

    def to_dict(self) -> dict:
        return {"predicted_peak_bytes": self.predicted_peak_bytes,
                "predicted_counted_bytes": self.predicted_counted_bytes,
                "peak_phase": self.peak_phase, "terms": dict(self.terms), "counted_terms": self.counted_terms,
                "activations_blocks": self.activations, "activations_outside": self.activations_outside,
                "offloaded": self.offloaded, "phases": dict(self.phases), "batch_shape": list(self.batch_shape),
                "attention_kernel": self.kernel, "trainable_params": self.trainable_params}


@dataclass
class _Fit:
    """bytes(B, S) = B*(d + a*S + c*S^2) + (k + e*S + q*S^2): a per-sample part and a part the
    batch shares (weight copies, rotary tables, masks), fitted exactly from B in {1, 2} at three
    sequence lengths."""

    a: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 0.0
    k: float = 0.0
    q: float = 0.0

    def per_sample(self, S: int) -> float:
        return self.d + self.a * S + self.c * S * S

    def __call__(self, B: int, S: int) -> int:
        return max(0, int(round(B * self.per_sample(S) + self.k + self.e * S + self.q * S * S)))

    @staticmethod
    def from_points(pts: dict, seq_lens) -> "_Fit":
        import numpy as np
        ss = list(seq_lens)
        V = np.array([[1.0, s, s * s] for s in ss])
        g = np.array([pts[(2, s)] - pts[(1, s)] for s in ss], dtype=np.float64)
        h = np.array([pts[(1, s)] for s in ss], dtype=np.float64) - g
        d, a, c = np.linalg.solve(V, g)
        k, e, q = np.linalg.solve(V, h)
        return _Fit(float(a), float(c), float(d), float(e), float(k), float(q))

    def minus(self, o: "_Fit") -> "_Fit":
        return _Fit(self.a - o.a, self.c - o.c, self.d - o.d, self.e - o.e, self.k - o.k, self.q - o.q)

    def to_dict(self) -> dict:
        return {"per_sample": self.d, "per_token": self.a, "per_token_x_seq": self.c,
                "shared_const": self.k, "shared_per_seq": self.e, "shared_per_seq2": self.q}


@dataclass
class ProbeResult:
    states: dict          # state -> _Fit
    outside: _Fit
    kernel: str           # the attention kernel seen (and the reading used for the target)
    small_plan: dict
    shared: _Fit = None   # saved once per forward by the lowest block (tensors all blocks share)


# ---------------------------------------------------------------------------------------------
# Attention: record the kernel; emulate the fused kernels' saved tensors for a CUDA target
# ---------------------------------------------------------------------------------------------
_ORIG_SDPA = F.scaled_dot_product_attention
_BACKENDS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class _FusedAttention(torch.autograd.Function):
    """Attention that saves what CUDA's flash / memory-efficient kernels save for backward.

    q, k, v (as given: GQA keys are not repeated), the output in (B, S, H, D) storage, the fp32
    log-sum-exp (B, H, S), and the mask when there is one. No S x S probabilities. The values are
    computed by the real sdpa; backward recomputes them (a probe never needs it, but it is right).
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa):
        with torch.no_grad():
            out = _ORIG_SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        b, h, s, _ = q.shape
        o = out.new_empty((b, s, h, out.shape[-1])).transpose(1, 2)
        o.copy_(out)
        del out
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        ctx.has_mask = attn_mask is not None
        ctx.save_for_backward(q, k, v, o, lse, *([attn_mask] if attn_mask is not None else []))
        ctx.is_causal, ctx.scale, ctx.enable_gqa = is_causal, scale, enable_gqa
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _, *mask = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            out = _ORIG_SDPA(*ins, attn_mask=mask[0] if mask else None, is_causal=ctx.is_causal,
                             scale=ctx.scale, enable_gqa=ctx.enable_gqa)
            wanted = [t for t in ins if t.requires_grad]
            got = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
        return tuple(next(got) if t.requires_grad else None for t in ins) + (None, None, None, None)


@contextmanager
def _attention_patch(seen: set, emulate_fused: bool):
    """Within: F.scaled_dot_product_attention records the backend torch would pick, and (when
    `emulate_fused`) runs _FusedAttention instead of the CPU's math fallback."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        dev = query.device.type
        if torch.is_autocast_enabled(dev):  # autocast casts sdpa's inputs: do it here, as it would
            dt = torch.get_autocast_dtype(dev)
            query, key, value = (t.to(dt) if t.is_floating_point() else t for t in (query, key, value))
        try:
            choice = _BACKENDS.get(int(torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                                               scale=scale, enable_gqa=enable_gqa)), "unknown")
        except Exception:  # noqa: BLE001 - a private selector; recording is best effort
            choice = "unknown"
        seen.add(choice)
        if emulate_fused and choice == "math":
            return _FusedAttention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIG_SDPA


class _ZeroMatmul(torch.utils._python_dispatch.TorchDispatchMode):
    """Below autograd and autocast: matrix products return zeros of the right shape and dtype, and
    large dtype casts return uninitialised tensors of the right shape, dtype and strides.

    What autograd saves, and every tensor's size, are decided above this mode, so the probe's
    counts do not change; the CPU's bf16 GEMMs and weight casts (nearly all of a probe's time) are
    skipped. Values are meaningless, so a model whose memory depends on values (mixture-of-experts
    routing) must be probed with `fast_probe=False`.
    """

    _OPS = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.bmm.default):
            a, b = args[0], args[1]
            return torch.zeros((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)
        if func in (aten.addmm.default, aten.baddbmm.default):
            a, b = args[1], args[2]
            return torch.zeros((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)
        if func is aten._to_copy.default and args[0].numel() >= 2**16:
            x, dtype = args[0], kwargs.get("dtype")
            if dtype is not None and dtype != x.dtype and kwargs.get("device") in (None, x.device) \
                    and kwargs.get("memory_format") in (None, torch.preserve_format):
                return torch.empty_like(x, dtype=dtype)  # a large cast (autocast's weight copies)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Losses the probe runs (the same code the training step runs)
# ---------------------------------------------------------------------------------------------
def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hf_loss(model, batch):
    """`model(**batch).loss` (the loop's loss), or the output itself for models without labels."""
    out = model(**batch)
    return out.loss if getattr(out, "loss", None) is not None else out


def sliced_logits_loss(model, batch):
    """User code that keeps fp32 logits and slices the shift: shared/anchors/anchors_gpu.py's
    early-exit rows (`logits = lm_head(norm(h)).float(); CE(logits[:, :-1].reshape(...), ids[:, 1:])`)."""
    inner = _unwrap(model)
    out = inner.base_model(input_ids=batch["input_ids"], use_cache=False)
    logits = inner.get_output_embeddings()(out.last_hidden_state).float()
    ids = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def _is_causal_lm(model) -> bool:
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    name = type(inner).__name__
    return isinstance(head, nn.Linear) and ("CausalLM" in name or "LMHead" in name)


# ---------------------------------------------------------------------------------------------
# Plans -> per-block states
# ---------------------------------------------------------------------------------------------
FIRST_STATES = ("first_update", "first_adapter", "first_probe")
MID_STATES = ("update", "adapter", "frozen")


def block_states(units: Units, plan: Plan) -> tuple[list[str], bool, frozenset]:
    """What each block does under `plan`, for pricing its saved activations.

    Returns (states by depth, embedding lookup on the backward path, non-block units with grads).
    States: none (past the exit: does not run), idle (runs below the backward path: saves nothing,
    except its input under gradient checkpointing), first_update /
    first_adapter (the lowest block backward reaches, which trains: its input needs no gradient),
    first_probe (the lowest block is only probed at its output: saves nothing), update / adapter
    (trains, input needs a gradient), frozen (on the backward path without training). Module-level
    units make their block an `update` block (an upper bound); adapter units an `adapter` block.
    """
    n = units.n_blocks
    e = plan.exit_depth or n
    grad_units = plan.update | plan.probe_params
    need = grad_units | plan.probe
    outside = frozenset(u for u in grad_units if not 0 <= units[u].depth < n)
    embed_on_path = any(units[u].kind == "embedding" for u in need) and not plan.detach_tied_input
    trained_depths = {units[u].depth for u in grad_units if 0 <= units[u].depth < n}
    adapter_depths = {units[u].depth for u in grad_units if 0 <= units[u].depth < n and units[u].kind == "adapter"}
    depths = [units[u].depth for u in need if 0 <= units[u].depth < n]
    lowest = -1 if embed_on_path else (min(depths) if depths else None)
    states = []
    for i in range(n):
        if i >= e:
            states.append("none")
            continue
        if lowest is None or i < lowest:
            states.append("idle")
            continue
        kind = "adapter" if i in adapter_depths else "update"
        if i == lowest:
            states.append(f"first_{kind}" if i in trained_depths else "first_probe")
        else:
            states.append(kind if i in trained_depths else "frozen")
    return states, embed_on_path, outside


# ---------------------------------------------------------------------------------------------
# The probe: a small model of the same architecture, measured under small plans
# ---------------------------------------------------------------------------------------------
def _set_num_layers(cfg, n: int) -> None:
    cfg.num_hidden_layers = n
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = list(types)[:n]


def _default_prepare(target: nn.Module):
    """Mirror the target's adapters on a fresh model: re-inject the same peft config."""
    if hasattr(target, "peft_config") and hasattr(target, "get_base_model"):  # PeftModel wrapper
        from peft import get_peft_model
        cfg = copy.deepcopy(target.peft_config[target.active_adapter])
        return lambda m: get_peft_model(m, cfg)
    if hasattr(target, "peft_config"):  # inject_adapter_in_model
        from peft import inject_adapter_in_model
        cfgs = copy.deepcopy(target.peft_config)

        def prepare(m):
            for name, c in cfgs.items():
                m = inject_adapter_in_model(copy.deepcopy(c), m, adapter_name=name)
            return m
        return prepare
    return None


class ActivationProbe:
    """Measures saved activations per block state and outside the blocks, on a small CPU model.

    `build_small(n_layers)` returns a fresh small model of the target's architecture, dtype and
    adapters, in train mode; the probe partitions it with the target's granularity.
    """

    def __init__(self, build_small: Callable[[int], nn.Module], n_blocks: int, *, granularity="block",
                 layers=None, precision="fp32", device_type="cuda", loss="hf", chunk_tokens=1024,
                 gradient_checkpointing=False, seq_lens=PROBE_SEQ_LENS, n_layers=PROBE_LAYERS, seed=0,
                 fast="auto"):
        self.build_small = build_small
        self.fast = fast
        self.n_layers = max(1, min(n_blocks, n_layers + (1 if gradient_checkpointing else 0)))
        self.granularity, self.layers = granularity, layers
        self.precision, self.device_type = precision, device_type
        self.loss, self.chunk_tokens = loss, chunk_tokens
        self.gradient_checkpointing = gradient_checkpointing
        self.seq_lens = tuple(seq_lens)
        if len(self.seq_lens) != 3 or len(set(self.seq_lens)) != 3:
            raise DynatuneError("the activation probe needs three different sequence lengths, e.g. (16, 24, 32).")
        self.seed = seed
        self._model = None
        self._cache: dict = {}
        self.kv_bytes_per_token_layer: int | None = None

    # -- the small model -----------------------------------------------------------------------
    def _setup(self):
        if self._model is not None:
            return
        m = self.build_small(self.n_layers)
        if self.gradient_checkpointing:
            _unwrap(m).gradient_checkpointing_enable()
        m.train()
        units = partition(m, self.granularity, self.layers)
        parent_path, _, attr = units.blocks_path.rpartition(".")
        parent = get_submodule(m, parent_path) if parent_path else m
        blocks = getattr(parent, attr)
        counter = SavedTensorCounter(torch.device("cpu"))
        counter.attach({f"block.{i}": b for i, b in enumerate(blocks)}, list(m.parameters()))
        self._model, self._units, self._parent, self._attr, self._blocks = m, units, parent, attr, blocks
        self._counter = counter
        # skipping GEMMs pays off on real-size layers; on tiny models the Python dispatch costs more
        n_params = sum(p.numel() for p in m.parameters())
        self._fast = self.fast is True or (self.fast == "auto" and n_params >= 5_000_000)
        cfg0 = getattr(_unwrap(m), "config", None)
        types = getattr(cfg0, "layer_types", None)
        self._layer_types = list(types) if types is not None else None
        self._is_causal_lm = _is_causal_lm(m)
        cfg = getattr(_unwrap(m), "config", None)
        self._vocab = int(getattr(cfg, "vocab_size", 1000) or 1000)
        self._num_labels = int(getattr(cfg, "num_labels", 2) or 2)
        self._regression = getattr(cfg, "problem_type", None) == "regression" or self._num_labels == 1

    def _batch(self, B: int, S: int, gen: torch.Generator) -> dict:
        ids = torch.randint(min(3, self._vocab - 1), min(self._vocab, 1000), (B, S), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self._is_causal_lm:
            batch["labels"] = ids.clone()
        elif self._regression:
            batch["labels"] = torch.zeros(B)
        else:
            batch["labels"] = torch.zeros(B, dtype=torch.long)
        return batch

    def _loss_fn(self):
        if self.loss == "chunked":
            from .losses import chunked_causal_lm_loss
            return lambda m, b: chunked_causal_lm_loss(m, b, self.chunk_tokens)
        if self.loss == "sliced":
            return sliced_logits_loss
        return hf_loss

    def _precision_ctx(self):
        if self.precision == "amp-bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    # -- small plans ---------------------------------------------------------------------------
    def small_plan(self, states: list[str], embed_on_path: bool, outside: frozenset, detach: bool) -> tuple:
        """A plan on the small model whose blocks take each needed state, lowest first: idle blocks
        (only under gradient checkpointing, which saves every block's input), the lowest block on
        the backward path (first_*), then each distinct mid state.

        Tensors all blocks share (rotary cos/sin) are saved once, by the lowest block that saves
        anything. When the target has several blocks in that block's state, the state takes two
        probe blocks: the second gives the per-block cost, the difference the shared part
        (counted once)."""
        idle = ["idle"] if (self.gradient_checkpointing and "idle" in states) else []
        path = [s for s in states if s not in ("none", "idle")]
        first = [s for s in path if s in FIRST_STATES][:1]
        mids = sorted({s for s in path if s in MID_STATES})
        layout = idle + first + mids
        if layout:
            h = 1 if (layout[0] == "first_probe" and len(layout) > 1) else 0
            holder = layout[h]
            if states.count(holder) > 1 and len(layout) < self.n_layers:
                layout.insert(h + 1, holder)
        if len(layout) > self.n_layers:
            raise DynatuneError(f"the probe needs {len(layout)} blocks for states {layout}; build it with more layers.")
        return tuple(layout), embed_on_path, outside, detach

    def measure(self, sig: tuple) -> ProbeResult:
        if sig in self._cache:
            return self._cache[sig]
        # The probe runs lazily, the first time a plan's shape is priced, and its forward passes
        # draw dropout masks: on the run's global RNG that would shift the run's own dropout by
        # when pricing happened, which differs between a straight run and one resumed with a
        # fresh memory model. The probe draws from a forked CPU RNG instead (it runs on the CPU).
        with torch.random.fork_rng(devices=[]):
            return self._measure(sig)

    def _measure(self, sig: tuple) -> ProbeResult:
        self._setup()
        layout, _, outside, detach = sig
        units = self._units
        update, probe = set(), set()
        for name in outside:
            if name in units.by_name:
                update.add(name)
        for i, s in enumerate(layout):
            in_block = [u.name for u in units.in_block(i)]
            if s in ("first_update", "update", "first_adapter", "adapter"):
                update.update(in_block)
            elif s == "first_probe":
                probe.add(f"block.{i}")
        exit_depth = len(layout) if 0 < len(layout) < self.n_layers else (1 if not layout else None)
        plan = Plan.of(update, probe=probe, exit_depth=exit_depth, detach_tied_input=detach)
        native = self._run(plan, layout, emulate=False)
        kernels = native["kernels"]
        result = native
        reading = "/".join(sorted(kernels)) if kernels else "no sdpa (eager or none)"
        if self.device_type == "cuda" and "math" in kernels:
            result = self._run(plan, layout, emulate=True)
            reading = f"cpu {reading} -> cuda reading: fused (flash/efficient) saved tensors, no S x S"
        elif kernels:
            reading = f"{reading} (cpu); cuda flash saves the same q, k, v, out, logsumexp" \
                if self.device_type == "cuda" and kernels <= {"flash", "efficient"} else reading
        res = ProbeResult(result["states"], result["outside"], reading, plan.to_dict(), result["shared"])
        self._cache[sig] = res
        return res

    def _run(self, plan: Plan, layout: tuple, emulate: bool) -> dict:
        m = self._model
        hooks = self._apply(plan)
        seqs = self.seq_lens
        shapes = [(b, s) for s in seqs for b in (1, 2)]
        per_block = {i: {} for i in range(len(layout))}
        outside = {}
        kernels: set = set()
        gen = torch.Generator().manual_seed(self.seed)
        loss_fn = self._loss_fn()
        try:
            for B, S in shapes:
                batch = self._batch(B, S, gen)
                with ExitStack() as st:
                    st.enter_context(self._counter.counting())
                    st.enter_context(_attention_patch(kernels, emulate))
                    st.enter_context(self._precision_ctx())
                    if self._fast:
                        st.enter_context(_ZeroMatmul())
                    loss = loss_fn(m, batch)
                by = dict(self._counter.by_block)
                del loss
                for i in per_block:
                    per_block[i][(B, S)] = by.get(f"block.{i}", 0)
                outside[(B, S)] = by.get("outside", 0)
        finally:
            for h in hooks:
                h.remove()
            self._set_exit(None)
            for p in m.parameters():
                p.requires_grad_(False)
        states, shared = {}, _Fit()
        for i, s in enumerate(layout):
            if s not in states:
                states[s] = _Fit.from_points(per_block[i], seqs)
            else:  # the lowest state's second block: its per-block cost; the difference is shared
                first = states[s]
                states[s] = _Fit.from_points(per_block[i], seqs)
                shared = first.minus(states[s])
        return {"states": states, "shared": shared, "outside": _Fit.from_points(outside, seqs), "kernels": kernels}

    def _apply(self, plan: Plan) -> list:
        """The engine's plan mechanics on the small model: requires_grad, probes, exit, detach."""
        m, units = self._model, self._units
        wanted = set(units.param_names(plan.update | plan.probe_params))
        for n, p in m.named_parameters():
            p.requires_grad_(n in wanted)
        hooks = []
        for name in plan.probe:
            def hook(mod, args, out):
                t = out if isinstance(out, torch.Tensor) else out[0]
                if not t.requires_grad:
                    t.requires_grad_(True)
            hooks.append(self._blocks[units[name].depth].register_forward_hook(hook, prepend=True))
        if plan.detach_tied_input:
            emb = _unwrap(m).get_input_embeddings()
            hooks.append(emb.register_forward_hook(lambda mod, a, out: out.detach()))
        self._set_exit(plan.exit_depth)
        return hooks

    def _set_exit(self, e: int | None) -> None:
        n = len(self._blocks)
        e = n if e is None else e
        setattr(self._parent, self._attr, self._blocks if e == n else nn.ModuleList(list(self._blocks)[:e]))
        cfg = getattr(_unwrap(self._model), "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = e
            if self._layer_types is not None:
                cfg.layer_types = list(self._layer_types)[:e]

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache per token per layer at this precision (measured: HF's cache may
        promote values to the keys' fp32 under autocast)."""
        if self.kv_bytes_per_token_layer is not None:
            return self.kv_bytes_per_token_layer
        with torch.random.fork_rng(devices=[]):  # lazy like measure(): leave the run's RNG alone
            return self._kv_cache_bytes()

    def _kv_cache_bytes(self) -> int:
        self._setup()
        m = self._model
        ids = torch.randint(3, min(self._vocab, 100), (1, 4))
        try:
            with torch.no_grad(), self._precision_ctx():
                out = m(input_ids=ids, use_cache=True)
            cache = getattr(out, "past_key_values", None)
            layers = getattr(cache, "layers", None) or []
            per_layer = [sum(t.numel() * t.element_size() for t in (getattr(lay, "keys", None), getattr(lay, "values", None))
                             if isinstance(t, torch.Tensor)) for lay in layers]
            val = int(max(per_layer) // 4) if per_layer else 0
        except Exception:  # noqa: BLE001 - models without a cache
            val = 0
        self.kv_bytes_per_token_layer = val
        return val


_SMALL_CACHE: dict = {}


def build_small_like(target: nn.Module, precision: str, prepare: Callable | None = None,
                     layer_types=None, seed: int = 0) -> Callable[[int], nn.Module]:
    """A factory of small models like `target`: same class and config with n layers, uninitialised
    then filled with small uniform values (fast), cast like the run, then `prepare`d (adapters)."""
    base = _unwrap(target)
    cls = type(base)
    cfg0 = copy.deepcopy(base.config)
    if layer_types is not None:
        cfg0.layer_types = list(layer_types)
    tied = (base.get_output_embeddings() is not None and base.get_input_embeddings() is not None
            and base.get_output_embeddings().weight is base.get_input_embeddings().weight)
    prepare = prepare if prepare is not None else _default_prepare(target)

    def fresh(n: int) -> nn.Module:
        from transformers.initialization import no_init_weights
        cfg = copy.deepcopy(cfg0)
        _set_num_layers(cfg, n)
        impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
        with no_init_weights():
            try:
                m = cls._from_config(cfg, attn_implementation=impl)
            except (ValueError, TypeError):
                m = cls._from_config(cfg)
        if tied and m.get_output_embeddings().weight is not m.get_input_embeddings().weight:
            m.tie_weights()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.uniform_(-0.02, 0.02, generator=g)
        if precision == "bf16":
            m.to(torch.bfloat16)
        return m

    def build(n: int) -> nn.Module:
        # the un-adapted small model is cached (one entry): LoRA at several ranks re-uses it
        key = (cls, cfg0.to_json_string(use_diff=False), precision, n, seed, tied)
        if _SMALL_CACHE.get("key") != key:
            _SMALL_CACHE.clear()
            _SMALL_CACHE.update(key=key, model=fresh(n))
        m = copy.deepcopy(_SMALL_CACHE["model"])
        if prepare is not None:
            m = prepare(m)
        m.train()
        return m

    return build


# ---------------------------------------------------------------------------------------------
# The memory model
# ---------------------------------------------------------------------------------------------
class MemoryModel:
    """Predicts a plan's counted bytes and its peak on the target device, per term.

    model: the model as it trains (adapters injected), on any device including meta: only
    parameter shapes and dtypes are read from it. The probe builds its own small CPU model.
    precision: fp32 | amp-bf16 (fp32 weights and optimizer, bf16 autocast) | bf16 (pure bf16).
    loss: hf (`model(**batch).loss`: full logits), chunked (losses.chunked_causal_lm_loss), or
    sliced (user code keeping fp32 logits and slicing the shift, as the anchors' exit rows do).
    hold_logits: the caller keeps the model output (and so the logits) alive through backward and
    the optimizer step (e.g. `out = model(**b); out.loss.backward()`).
    """

    def __init__(self, model: nn.Module, *, units: Units | None = None, granularity: str = "block",
                 layers: str | None = None, precision: str = "fp32", optimizer="adamw", device_type: str = "cuda",
                 batch_shape: tuple[int, int] | None = None, loss: str = "hf", chunk_tokens: int = 1024,
                 grad_accum: int = 1, gradient_checkpointing: bool = False, hold_logits: bool = False,
                 offload_exited: bool = False, prepare: Callable | None = None, probe_layers: int = PROBE_LAYERS,
                 probe_seq_lens=PROBE_SEQ_LENS, workspace_bytes: int | None = None, layer_types=None,
                 build_small: Callable | None = None, params: dict | None = None, fast_probe="auto"):
        if precision not in PRECISIONS:
            raise DynatuneError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
        if loss not in LOSSES:
            raise DynatuneError(f"unknown loss '{loss}'; use one of {', '.join(LOSSES)}.")
        if device_type not in ("cuda", "cpu"):
            raise DynatuneError(f"device_type must be cuda or cpu, got {device_type!r}.")
        if grad_accum < 1:
            raise DynatuneError(f"grad_accum must be at least 1, got {grad_accum}.")
        self.model = model
        self.units = units if units is not None else partition(model, granularity, layers)
        self.precision, self.device_type, self.loss = precision, device_type, loss
        self.optimizer = OptimizerSpec.parse(optimizer)
        self.batch_shape = tuple(batch_shape) if batch_shape is not None else None
        self.chunk_tokens, self.grad_accum = int(chunk_tokens), int(grad_accum)
        self.gradient_checkpointing, self.hold_logits = gradient_checkpointing, hold_logits
        self.offload_exited = offload_exited
        self.workspace_bytes = (CUDA_WORKSPACE_BYTES if device_type == "cuda" else 0) \
            if workspace_bytes is None else int(workspace_bytes)
        # calibration (TriMS Operation 2, restricted to the inexact terms)
        self.alpha = 1.0     # activation scale
        self.offset = 0      # base correction, bytes
        self.calibrations: list[dict] = []

        # exact per-parameter facts from the (meta) model
        # every parameter by name (a Tuner's dict keeps the blocks an exit cut off: still resident)
        named = params if params is not None else dict(model.named_parameters())
        self._params = {n: (tuple(p.shape), p.element_size(), p.numel()) for n, p in named.items()}
        self.weight_bytes_total = sum(el * num for _, el, num in self._params.values())
        self._unit_params = {u.name: list(u.param_names) for u in self.units}
        inner = _unwrap(model)
        cfg = getattr(inner, "config", None)
        self.hidden_size = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        self.causal_lm = _is_causal_lm(model)
        self.vocab = int(head.weight.shape[0]) if self.causal_lm else 0
        self._head_param = None
        if self.causal_lm:
            for n, p in model.named_parameters():
                if p is head.weight:
                    self._head_param = n
        self._embed_param = None
        emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        if emb is not None:
            for n, p in model.named_parameters():
                if p is emb.weight:
                    self._embed_param = n
        self.tied = self.units.tied_embedding

        if build_small is None:
            build_small = build_small_like(model, precision, prepare, layer_types)
        self.probe = ActivationProbe(build_small, self.units.n_blocks, granularity=self.units.granularity,
                                     layers=layers, precision=precision, device_type=device_type, loss=loss,
                                     chunk_tokens=chunk_tokens, gradient_checkpointing=gradient_checkpointing,
                                     seq_lens=probe_seq_lens, n_layers=probe_layers, fast=fast_probe)
        self._memo: dict = {}

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def from_tuner(cls, tuner, *, precision: str = "fp32", batch_shape=None, **kw) -> "MemoryModel":
        """A memory model for the run a Tuner drives (its model, units, optimizer and device)."""
        kw.setdefault("optimizer", tuner.optimizer)
        kw.setdefault("device_type", tuner.device.type if tuner.device.type in ("cuda", "cpu") else "cuda")
        layer_types = getattr(tuner, "_config_layers", (None, None))[1]
        layers = tuner.units.blocks_path if tuner.units.blocks_path else None
        return cls(tuner.model, units=tuner.units, layers=layers, precision=precision, batch_shape=batch_shape,
                   prepare=tuner.method.prepare_model, layer_types=layer_types, params=tuner.params, **kw)

    @classmethod
    def from_config(cls, config, *, kind: str = "causal-lm", method=None, precision: str = "fp32",
                    num_labels: int | None = None, **kw) -> "MemoryModel":
        """Full size on the meta device (exact parameter bytes, no memory), probed small on the CPU.

        config: a transformers config, a built-in arch name ('qwen2-0.5b' or 'arch:qwen2-0.5b').
        method: a dynatune Method whose prepare_model (adapters) and granularity apply.
        """
        model = meta_model(config, kind=kind, precision=precision, num_labels=num_labels)
        prepare = method.prepare_model if method is not None else None
        if prepare is not None:
            model = prepare(model)
        granularity = method.granularity if method is not None else kw.pop("granularity", "block")
        return cls(model, granularity=granularity, precision=precision, prepare=prepare, **kw)

    # -- exact terms --------------------------------------------------------------------------------
    def _params_of(self, unit_names) -> list[str]:
        out, seen = [], set()
        for u in unit_names:
            for p in self._unit_params[self.units[u].name]:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out

    def param_bytes(self, names) -> int:
        return sum(self._params[n][1] * self._params[n][2] for n in names)

    def state_bytes(self, names) -> int:
        return sum(self.optimizer.state_bytes(self._params[n][0], self._params[n][1], self.device_type) for n in names)

    def _weights(self, plan: Plan) -> tuple[int, int]:
        """(resident weight bytes, offloaded weight bytes)."""
        if not (self.offload_exited and plan.exit_depth is not None):
            return self.weight_bytes_total, 0
        gone = self._params_of(u.name for u in self.units if plan.exit_depth <= u.depth < self.units.n_blocks)
        off = self.param_bytes(gone)
        return self.weight_bytes_total - off, off

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, plan: Plan, batch_shape: tuple[int, int] | None = None, *, kept_state=(),
                offloaded_state=()) -> Prediction:
        """Price `plan` at micro-batch shape (batch, seq).

        kept_state / offloaded_state: units whose optimizer state stays resident (state policy
        'keep') or sits in host memory ('offload') although they do not update in this plan.
        """
        shape = tuple(batch_shape) if batch_shape is not None else self.batch_shape
        if shape is None:
            raise DynatuneError("the memory model needs the batch shape (batch, seq): pass batch_shape=(B, S).")
        key = (plan, shape, frozenset(kept_state), frozenset(offloaded_state), self.alpha, self.offset)
        if key in self._memo:
            return self._memo[key]
        plan.validate(self.units)
        pred = self._predict(plan, (int(shape[0]), int(shape[1])), kept_state, offloaded_state)
        self._memo[key] = pred
        return pred

    def _probe_result(self, plan: Plan) -> tuple[ProbeResult, list[str]]:
        states, embed_on_path, outside, = block_states(self.units, plan)
        sig = self.probe.small_plan(states, embed_on_path, outside, plan.detach_tied_input)
        return self.probe.measure(sig), states

    def activation_bytes(self, plan: Plan, batch_shape) -> tuple[int, int, list[str], str]:
        """(saved by the blocks, saved outside the blocks, block states, attention kernel reading)."""
        res, states = self._probe_result(plan)
        B, S = batch_shape
        blocks = sum(res.states[s](B, S) for s in states if s in res.states)
        if res.shared is not None and any(s != "none" for s in states):
            blocks += res.shared(B, S)
        return blocks, res.outside(B, S), states, res.kernel

    def _predict(self, plan, shape, kept_state, offloaded_state) -> Prediction:
        B, S = shape
        upd = self._params_of(plan.update)
        path = self._params_of(plan.update | plan.probe_params)
        weights, off_w = self._weights(plan)
        grads = self.param_bytes(upd)
        grads_path = self.param_bytes(path)
        state_units = self._params_of(set(plan.update) | set(kept_state))
        opt = self.state_bytes(state_units)
        off_state = self.state_bytes(self._params_of(offloaded_state))
        blocks, outside, states, kernel = self.activation_bytes(plan, shape)
        counted = weights + grads + opt + blocks + outside

        # -- transients at each phase of a step (see docs/memory.md) --
        lb = 4 if self.precision == "fp32" else 2      # logits dtype bytes
        cb = 4 if self.precision == "fp32" else 2      # compute dtype bytes
        pb = 2 if self.precision == "bf16" else 4      # parameter (and gradient) dtype bytes
        V, H = self.vocab, self.hidden_size
        head_trains = self._head_param is not None and self._head_param in path
        gw32 = V * H * pb if head_trains else 0         # the head weight's gradient
        gw_lp = V * H * cb if (head_trains and self.precision == "amp-bf16") else 0
        ws = self.workspace_bytes
        acts = self.alpha * blocks
        held = 0
        loss_saved = 0  # what the loss saves (freed once backward leaves the loss)
        phase_extra: dict[str, float] = {}
        if self.causal_lm and V:
            N = B * S
            L = N * V
            if self.loss == "hf":
                loss_saved = 4 * L
                fp32_copy = 4 * L if lb != 4 else 0
                held = lb * L if self.hold_logits else 0
                phase_extra["forward_loss"] = (0 if self.hold_logits else lb * L) + fp32_copy  # held: in base
                # nll_loss_backward's grad (fp32) + log_softmax_backward's output, with the saved log-softmax
                phase_extra["backward_loss"] = 8 * L
                # log-softmax freed; the logits' gradient in the logits' dtype, then the head's weight gradient
                phase_extra["backward_head"] = -4 * L + max(lb * L + (4 * L if lb != 4 else 0),
                                                                     lb * L + gw_lp + (gw32 if lb == 4 else 0),
                                                                     gw_lp + gw32)
            elif self.loss == "sliced":
                L1 = B * (S - 1) * V
                loss_saved = 4 * L1
                held = 4 * L  # the caller's fp32 logits live through backward and the optimizer step
                # (beyond the held logits) the low-precision logits during .float(); then the shifted
                # copy with the saved log-softmax
                phase_extra["forward_loss"] = max(lb * L if lb != 4 else 0, 4 * L1)
                # log-softmax's gradient pair; then the slice's backward: a zero-filled full gradient
                phase_extra["backward_loss"] = max(8 * L1, 4 * L + 4 * L1)
                phase_extra["backward_head"] = -4 * L1 + max(4 * L + lb * L, lb * L + gw_lp, gw_lp + gw32)
            else:  # chunked
                N1 = B * (S - 1)
                C = max(1, min(self.chunk_tokens, N1))
                w_cast = V * H * cb if cb != pb else 0
                hb = pb  # hidden states' dtype
                loss_saved = N1 * (H * hb + 4 + 8)  # gathered hidden states, log-sum-exps, targets
                phase_extra["forward_loss"] = w_cast + C * V * (lb + 4 + 4)
                phase_extra["backward_loss"] = (w_cast + gw32 + (V * H * 2 if (head_trains and pb == 2) else 0)
                                                + N1 * H * hb + C * V * (lb + 4 + (cb if cb != 4 else 0)))
        phases: dict[str, float] = {}
        terms_at: dict[str, dict] = {}

        def add(name, grads_term, acts_term, base_term):
            phases[name] = weights + opt + grads_term + acts_term + base_term
            terms_at[name] = {"weights": weights, "gradients": grads_term, "optimizer": opt,
                              "activations": acts_term, "base": base_term}

        base_saved = outside + ws + self.offset + held
        if self.grad_accum > 1:  # earlier micro-batches' gradients, and one being accumulated into
            base_saved += max((self.param_bytes([p]) for p in path), default=0)
        g_acc = grads_path if self.grad_accum > 1 else 0
        any_saved = blocks + outside > 0
        if any_saved or phase_extra:
            add("forward", g_acc, acts, base_saved + phase_extra.get("forward_loss", 0))
            add("backward_start", g_acc, acts, base_saved + phase_extra.get("backward_loss", 0))
            if "backward_head" in phase_extra:
                add("backward_head", g_acc, acts, base_saved + phase_extra["backward_head"])
        # end of backward: every gradient of the path exists; a tied embedding's lookup gradient is
        # a dense V x H tensor accumulated into the head's gradient
        emb_dense = 0
        if self._embed_param is not None and self._embed_param in path and self.tied and not plan.detach_tied_input:
            emb_dense = self.param_bytes([self._embed_param])
        add("backward_end", grads_path, 0, ws + self.offset + held + emb_dense)
        # optimizer step: gradients of the updated units, their state, the step's scratch
        scratch = self.optimizer.scratch_bytes([self.param_bytes([p]) for p in upd], self.device_type)
        add("optimizer_step", grads, 0, ws + self.offset + held + scratch)
        if self.gradient_checkpointing and any_saved:
            # backward recomputes one checkpointed block at a time: its full activations are live
            nock = self._recompute_bytes(plan, shape)
            add("backward_recompute", g_acc + gw32, acts,
                max(0, outside - loss_saved) + ws + self.offset + held + nock)
        peak_phase = max(phases, key=lambda k: phases[k])
        terms = {k: int(round(v)) for k, v in terms_at[peak_phase].items()}
        peak = int(sum(terms.values()))
        return Prediction(batch_shape=shape, weights=weights, gradients=grads, optimizer=opt, activations=blocks,
                          activations_outside=outside, offloaded=off_state + off_w,
                          predicted_counted_bytes=int(counted), predicted_peak_bytes=peak, peak_phase=peak_phase,
                          terms=terms, phases={k: int(round(v)) for k, v in phases.items()}, block_states=states,
                          kernel=kernel, trainable_params=sum(self._params[n][2] for n in upd))

    def _recompute_bytes(self, plan, shape) -> int:
        """A checkpointed block's activations when backward recomputes it (probed without checkpointing)."""
        if not hasattr(self, "_nockpt_probe"):
            p = copy.copy(self.probe)
            p.gradient_checkpointing = False
            p._cache = {}
            p._model = None
            self._nockpt_probe = p
        states, embed_on_path, outside = block_states(self.units, plan)
        sig = self._nockpt_probe.small_plan(states, embed_on_path, outside, plan.detach_tied_input)
        res = self._nockpt_probe.measure(sig)
        B, S = shape
        return max((res.states[s](B, S) for s in set(states) if s in res.states), default=0)

    # -- calibration (TriMS Operation 2, on the inexact terms only) ---------------------------------
    def calibrate(self, plan: Plan, measured_peak_bytes: int, batch_shape=None, beta: float = 0.5) -> dict:
        """Fold a measured CUDA peak (torch.cuda.max_memory_allocated over a period) into the model.

        The activation scale alpha moves by EMA toward the ratio that explains the measurement
        with the predicted base; then the base offset absorbs the rest, so this plan is predicted
        exactly from now on. Weights, gradients and optimizer state are exact and never change.
        """
        pred = self.predict(plan, batch_shape)
        self._memo.clear()
        phase = pred.peak_phase
        act = pred.terms["activations"]
        raw = pred.activations
        other = pred.predicted_peak_bytes - act - self.offset
        if raw > 0 and act > 0:
            ratio = (measured_peak_bytes - other) / raw
            ratio = min(max(ratio, 0.1), 10.0)
            self.alpha = beta * self.alpha + (1 - beta) * ratio
        old_offset = self.offset
        self.offset = 0
        fresh = self.predict(plan, batch_shape)
        self.offset = int(measured_peak_bytes - fresh.predicted_peak_bytes)
        self._memo.clear()
        rec = {"plan": plan.to_dict(), "measured": int(measured_peak_bytes), "predicted": pred.predicted_peak_bytes,
               "phase": phase, "alpha": self.alpha, "offset": self.offset, "previous_offset": old_offset}
        self.calibrations.append(rec)
        return rec

    # -- budgets ------------------------------------------------------------------------------------
    def check_admitted(self, plan: Plan, budget_bytes: int, margin: float = DEFAULT_MARGIN,
                       batch_shape=None) -> Prediction:
        """Raise BudgetError unless predicted peak <= budget x (1 - margin); return the prediction."""
        pred = self.predict(plan, batch_shape)
        limit = usable_budget(budget_bytes, margin)
        if pred.predicted_peak_bytes > limit:
            raise BudgetError(
                f"plan (update {_short(plan.update)}{'' if plan.exit_depth is None else f', exit {plan.exit_depth}'}) "
                f"is predicted to peak at {pred.predicted_peak_bytes} bytes ({fmt_bytes(pred.predicted_peak_bytes)}), "
                f"above the budget's usable {limit} bytes ({fmt_bytes(budget_bytes)} x (1 - {margin:g})).",
                predicted_bytes=pred.predicted_peak_bytes, budget_bytes=budget_bytes)
        return pred

    def admits(self, plan: Plan, budget_bytes: int, margin: float = DEFAULT_MARGIN, batch_shape=None) -> bool:
        return self.predict(plan, batch_shape).predicted_peak_bytes <= usable_budget(budget_bytes, margin)

    def largest_fitting(self, plans: list[Plan], budget_bytes: int, margin: float = DEFAULT_MARGIN,
                        batch_shape=None) -> Plan | None:
        """The last plan of `plans` (ordered small to large) that the budget admits, or None."""
        best = None
        for p in plans:
            if self.admits(p, budget_bytes, margin, batch_shape):
                best = p
        return best

    # -- evaluation and generation ------------------------------------------------------------------
    def _forward_transient(self, batch: int, seq: int) -> int:
        """Live intermediates of one block under no_grad: bounded by what an updated block saves."""
        n = self.units.n_blocks
        top = Plan.of({u.name for u in self.units.in_block(n - 1)})
        res, _ = self._probe_result(top)
        fits = [f for f in res.states.values()]
        return max((int(round(batch * f.per_sample(seq))) for f in fits), default=0)

    def predict_eval(self, batch: int, seq: int, plan: Plan | None = None, with_loss: bool = True) -> dict:
        """Peak of an evaluation forward under no_grad (optimizer state of `plan` still resident)."""
        weights = self.weight_bytes_total
        opt = self.state_bytes(self._params_of(plan.update)) if plan is not None else 0
        lb = 4 if self.precision == "fp32" else 2
        L = batch * seq * self.vocab if self.causal_lm else 0
        logits = lb * L + ((4 * L if lb != 4 else 0) + 4 * L if with_loss else 0)
        block = self._forward_transient(batch, seq)
        base = max(logits, block) + self.workspace_bytes + self.offset
        peak = weights + opt + base
        return {"predicted_peak_bytes": int(peak), "terms": {"weights": weights, "optimizer": opt, "base": int(base)},
                "batch_shape": [batch, seq]}

    def predict_generate(self, batch: int, prompt_len: int, new_tokens: int, plan: Plan | None = None) -> dict:
        """Peak of generate(): weights, the KV cache at its full length (per layer, measured dtype),
        and the larger of the prefill's forward intermediates and one layer's cache copy in torch.cat."""
        weights = self.weight_bytes_total
        opt = self.state_bytes(self._params_of(plan.update)) if plan is not None else 0
        n_run = (plan.exit_depth if plan is not None and plan.exit_depth else self.units.n_blocks)
        per = self.probe.kv_cache_bytes()
        T = prompt_len + new_tokens
        cache = batch * T * per * n_run
        lb = 4 if self.precision == "fp32" else 2
        logits = batch * self.vocab * (lb + 4) if self.causal_lm else 0
        prefill = self._forward_transient(batch, prompt_len)
        cat = 2 * batch * T * per
        base = max(prefill, cat) + logits + self.workspace_bytes + self.offset
        peak = weights + opt + cache + base
        return {"predicted_peak_bytes": int(peak),
                "terms": {"weights": weights, "optimizer": opt, "kv_cache": int(cache), "base": int(base)},
                "kv_cache_bytes_per_token_per_layer": per, "batch": batch, "tokens": T}


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ... ({len(names)} units)"


# ---------------------------------------------------------------------------------------------
# Models on the meta device
# ---------------------------------------------------------------------------------------------
def resolve_config(config):
    """A transformers config from a config object, 'arch:NAME' / NAME of models.ARCHS, a known
    pretrained model name, or a local Hugging Face directory."""
    if not isinstance(config, str):
        return copy.deepcopy(config)
    from .models import ARCHS, MODELS, arch_config
    name = config[len("arch:"):] if config.startswith("arch:") else config
    if name in ARCHS:
        return arch_config(name)
    from pathlib import Path

    from transformers import AutoConfig
    if config in MODELS:
        from .models import _resolve_dir
        return AutoConfig.from_pretrained(_resolve_dir(config))
    p = Path(config).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return AutoConfig.from_pretrained(p)
    raise DynatuneError(f"unknown model {config!r}; use arch:NAME with NAME in {', '.join(ARCHS)}, "
                        f"one of {', '.join(MODELS)}, or a local Hugging Face model directory.")


def meta_model(config, *, kind: str = "causal-lm", precision: str = "fp32", num_labels: int | None = None):
    """The full-size model on the meta device: exact shapes and dtypes, no memory, no init time."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = resolve_config(config)
    if kind != "causal-lm":
        cfg.num_labels = 1 if kind == "regression" else (num_labels or getattr(cfg, "num_labels", 2) or 2)
        if kind == "regression":
            cfg.problem_type = "regression"
    if getattr(cfg, "pad_token_id", None) is None:
        eos = getattr(cfg, "eos_token_id", None)
        cfg.pad_token_id = eos if isinstance(eos, int) else 0
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    last = None
    for attn in ("sdpa", "eager"):
        try:
            with torch.device("meta"):
                m = auto.from_config(cfg, attn_implementation=attn)
            break
        except ValueError as e:
            last = e
    else:
        raise last
    if precision == "bf16":
        m.to(torch.bfloat16)
    m.train()
    return m


# ---------------------------------------------------------------------------------------------
# The smallest plan a method can run (the floor a budget must clear)
# ---------------------------------------------------------------------------------------------
def smallest_plan(method, units: Units) -> Plan:
    """The method's smallest admissible plan (each method knows its own; see Method.smallest_plan)."""
    return method.smallest_plan(units)


def check_budget_floor(memory_model: MemoryModel, budget_bytes: int, plan: Plan, margin: float = DEFAULT_MARGIN,
                       batch_shape=None, what: str = "the smallest plan") -> Prediction:
    """Reject, before training, a budget below `plan` (the method's smallest): the error names the
    minimum (that plan's predicted peak) and the budget it needs with the margin."""
    pred = memory_model.predict(plan, batch_shape)
    need = math.ceil(pred.predicted_peak_bytes / (1.0 - margin))
    if pred.predicted_peak_bytes > usable_budget(budget_bytes, margin):
        raise BudgetError(
            f"the budget of {budget_bytes} bytes ({fmt_bytes(budget_bytes)}) is below what {what} needs: it is "
            f"predicted to peak at {pred.predicted_peak_bytes} bytes ({fmt_bytes(pred.predicted_peak_bytes)}), so "
            f"with margin {margin:g} the budget must be at least {need} bytes ({fmt_bytes(need)}); raise the budget, "
            "lower batch_size or max_length, or use a chunked loss (chunked_loss=1024).",
            predicted_bytes=pred.predicted_peak_bytes, budget_bytes=budget_bytes, required_budget_bytes=need)
    return pred


def full_finetuning_peak(memory_model: MemoryModel, batch_shape=None) -> int:
    """Predicted peak of full fine-tuning of the same model (without adapters, if it has any):
    what a fractional budget ("0.6") is a fraction of."""
    mm = memory_model
    if mm.units.granularity == "block":
        return mm.predict(Plan.of(u.name for u in mm.units), batch_shape).predicted_peak_bytes
    inner = _unwrap(mm.model)
    cfg = copy.deepcopy(inner.config)
    cls = type(inner)
    with torch.device("meta"):
        base = cls._from_config(cfg)
    if mm.precision == "bf16":
        base.to(torch.bfloat16)
    full = MemoryModel(base, precision=mm.precision, optimizer=mm.optimizer, device_type=mm.device_type,
                       batch_shape=mm.batch_shape, loss=mm.loss, chunk_tokens=mm.chunk_tokens,
                       grad_accum=mm.grad_accum, gradient_checkpointing=mm.gradient_checkpointing,
                       hold_logits=mm.hold_logits, build_small=build_small_like(base, mm.precision, prepare=None))
    return full.predict(Plan.of(u.name for u in full.units), batch_shape).predicted_peak_bytes


def install_budget(tuner, budget, *, batch_shape: tuple[int, int], precision: str = "fp32",
                   margin: float = DEFAULT_MARGIN, **kw) -> MemoryModel:
    """What a training loop does before its first step when a budget is set.

    Builds the memory model of the tuner's run (kw: loss, chunk_tokens, grad_accum, hold_logits,
    device_type, gradient_checkpointing, ...), resolves the budget to bytes (a fraction is of full
    fine-tuning's predicted peak), rejects a budget below the method's smallest plan (BudgetError
    naming the minimum), and calls tuner.set_budget so that every plan applied is checked.
    """
    margin = check_margin(margin)
    mm = MemoryModel.from_tuner(tuner, precision=precision, batch_shape=batch_shape, **kw)
    kind, _ = parse_budget(budget)
    full = full_finetuning_peak(mm) if kind == "fraction" else None
    budget_bytes = resolve_budget(budget, full)
    check_budget_floor(mm, budget_bytes, smallest_plan(tuner.method, tuner.units), margin,
                       what=f"{tuner.method.name}'s smallest plan")
    tuner.set_budget(mm, budget_bytes, margin)
    return mm


def largest_prediction(memory_model: MemoryModel, plans) -> dict:
    """Of the plans a run applied, the one with the largest predicted peak (for metrics.json:
    memory.predicted_peak_bytes and memory.predicted_counted_bytes)."""
    best = None
    for item in set(plans):  # a plan, or (plan, units whose optimizer state it kept) as Tuner records them
        p, kept = item if isinstance(item, tuple) else (item, frozenset())
        pred = memory_model.predict(p, kept_state=kept)
        if best is None or pred.predicted_peak_bytes > best[1].predicted_peak_bytes:
            best = (p, pred)
    if best is None:
        return {}
    p, pred = best
    return {"predicted_peak_bytes": pred.predicted_peak_bytes, "predicted_counted_bytes": pred.predicted_counted_bytes,
            "predicted_peak_phase": pred.peak_phase, "predicted_terms": pred.terms, "predicted_for_plan": p.to_dict()}


__all__ = ["install_budget", "full_finetuning_peak", "largest_prediction", "MemoryModel", "Prediction", "OptimizerSpec", "ActivationProbe", "BudgetError", "resolve_budget",
           "parse_budget", "usable_budget", "check_margin", "smallest_plan", "check_budget_floor", "block_states",
           "meta_model", "resolve_config", "build_small_like", "PRECISIONS", "LOSSES", "DEFAULT_MARGIN"]
