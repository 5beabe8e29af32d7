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
  at four small shapes under saved_tensors_hooks (counting.SavedTensorCounter, deduplicated by
  storage, attributed to blocks), and fits per state bytes = a*B*S + c*B*S^2 + e*S + k.
  Blocks are identical, so the real model's blocks cost the sum of their states' fits.
- M_B: what lives outside the blocks (embedding outputs, final norm, the head's saved input, the
  loss's saved log-softmax: also measured by the probe) plus the transients a CUDA allocator sees
  at the step's high-water marks (logits and their fp32 copy, the loss gradient, optimizer
  scratch, cuBLAS workspaces), from the loss implementation's known allocations.

Two numbers come out of `predict`:
- `predicted_counted_bytes`: what counting.py counts (weights + gradients + optimizer + saved
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

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import DynatuneError
from ..models import meta_model
from ..plan import Plan
from ..precision import check_precision, priced_as
from ..units import Units, partition, unwrap_peft
from .budget import DEFAULT_MARGIN, BudgetError, fmt_bytes, usable_budget
from .probe import (PROBE_LAYERS, PROBE_SEQ_LENS, ActivationProbe, ProbeResult, block_states, build_small_like,
                    is_causal_lm)

LOSSES = ("hf", "chunked", "sliced")
DEVICE_TYPES = ("cuda", "cpu")  # the targets whose peak is predicted
# cuBLAS workspaces on Hopper: 32 MiB per (handle, stream); forward runs on the main thread's
# handle and backward on the autograd device thread's, so two are live at the peak.
CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20


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
# Predictions
# ---------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A plan's predicted bytes, per term.

    `counted_terms` sum to `predicted_counted_bytes` (what counting.py counts); `terms` sum to
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
    communication: int = 0  # data parallelism: a gradient bucket (ddp), gathered blocks and their gradients (fsdp)

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
                "attention_kernel": self.kernel, "trainable_params": self.trainable_params,
                "communication": self.communication,
                "block_states": list(self.block_states)}


# ---------------------------------------------------------------------------------------------
# The memory model
# ---------------------------------------------------------------------------------------------
class MemoryModel:
    """Predicts a plan's counted bytes and its peak on the target device, per term.

    model: the model as it trains (adapters injected), on any device including meta: only
    parameter shapes and dtypes are read from it. The probe builds its own small CPU model.
    precision: fp32 | amp-bf16 (fp32 weights and optimizer, bf16 autocast) | amp-fp16 (the same bytes as
    amp-bf16: fp16 autocast; the loss scaler's state is a few scalars) | bf16 (pure bf16).
    loss: hf (`model(**batch).loss`: full logits), chunked (losses.chunked_causal_lm_loss), or
    sliced (user code keeping fp32 logits and slicing the shift, as the anchors' exit rows do).
    hold_logits: the caller keeps the model output (and so the logits) alive through backward and
    the optimizer step (e.g. `out = model(**b); out.loss.backward()`).
    world_size, strategy: one rank of a data-parallel run (batch_shape is that rank's micro-batch).
    ddp: weights, gradients and optimizer states replicated, plus the largest flat gradient bucket
    the reduction after backward allocates (distributed.Replicas.reduce_gradients, at most
    bucket_bytes). fsdp (FSDP2 fully_shard per block): weights, gradients and states sharded along
    dim 0 (padded to world_size rows, as FSDP2 pads), plus, in forward and backward, the largest
    block's parameters gathered twice (running and prefetched) and, in backward, its unsharded
    gradient before the reduce-scatter.
    """

    def __init__(self, model: nn.Module, *, units: Units | None = None, granularity: str = "block",
                 layers: str | None = None, precision: str = "fp32", optimizer="adamw", device_type: str = "cuda",
                 batch_shape: tuple[int, int] | None = None, loss: str = "hf", chunk_tokens: int = 1024,
                 grad_accum: int = 1, gradient_checkpointing: bool = False, hold_logits: bool = False,
                 offload_exited: bool = False, prepare: Callable | None = None, probe_layers: int = PROBE_LAYERS,
                 probe_seq_lens=PROBE_SEQ_LENS, workspace_bytes: int | None = None, layer_types=None,
                 build_small: Callable | None = None, params: dict | None = None, fast_probe="auto",
                 world_size: int = 1, strategy: str = "ddp", bucket_bytes: int = 25 * 2 ** 20):
        check_precision(precision)
        self.requested_precision = precision
        precision = priced_as(precision)  # amp-fp16 costs what amp-bf16 costs, byte for byte
        if strategy not in ("ddp", "fsdp"):
            raise DynatuneError(f"strategy must be ddp or fsdp, got {strategy!r}.")
        if int(world_size) < 1:
            raise DynatuneError(f"world_size must be at least 1, got {world_size}.")
        self.world_size, self.strategy, self.bucket_bytes = int(world_size), strategy, int(bucket_bytes)
        if loss not in LOSSES:
            raise DynatuneError(f"unknown loss '{loss}'; use one of {', '.join(LOSSES)}.")
        if device_type not in DEVICE_TYPES:
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
        self._full = {n: (tuple(p.shape), p.element_size(), p.numel()) for n, p in named.items()}
        # what one rank holds of each parameter: all of it, or under fsdp its dim-0 shard
        self._params = {n: self._shard(*f) for n, f in self._full.items()}
        self.weight_bytes_total = sum(el * num for _, el, num in self._params.values())
        self._unit_params = {u.name: list(u.param_names) for u in self.units}
        inner = unwrap_peft(model)
        cfg = getattr(inner, "config", None)
        self.hidden_size = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        self.causal_lm = is_causal_lm(model)
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
        kw.setdefault("device_type", tuner.device.type if tuner.device.type in DEVICE_TYPES else "cuda")
        layer_types = tuner.block_stack.layer_types
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
        model = meta_model(config, kind=kind, precision=priced_as(precision), num_labels=num_labels)
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

    def _shard(self, shape, elem, numel):
        if self.strategy != "fsdp" or self.world_size == 1 or not shape:
            return shape, elem, numel
        rows = -(-shape[0] // self.world_size)  # FSDP2 pads dim 0 to a multiple of world_size
        rest = numel // shape[0] if shape[0] else 0
        return (rows, *shape[1:]), elem, rows * rest

    def full_param_bytes(self, names) -> int:
        """Unsharded bytes (what fsdp gathers)."""
        return sum(self._full[n][1] * self._full[n][2] for n in names)

    def communication_bytes(self, plan: Plan) -> tuple[int, int]:
        """Data parallelism's buffers under `plan`: (live in forward and backward, live at the end of backward)."""
        return self._communication(self._params_of(plan.update | plan.probe_params))

    def _communication(self, path: list[str]) -> tuple[int, int]:
        """(bytes live in forward and backward, bytes live at the end of backward) for data parallelism."""
        if self.world_size == 1:
            return 0, 0
        if self.strategy == "ddp":
            # distributed.Replicas.reduce_gradients: gradients in model order, a flat copy per bucket of
            # two or more (a lone gradient is reduced in place)
            order = [n for n in self._params if n in set(path)]
            largest, bucket, dtype = 0, [], None
            for n in order + [None]:
                b = self.param_bytes([n]) if n is not None else 0
                if bucket and (n is None or self._params[n][1] != dtype or sum(bucket) + b > self.bucket_bytes):
                    if len(bucket) > 1:
                        largest = max(largest, sum(bucket))
                    bucket = []
                if n is not None:
                    bucket.append(b)
                    dtype = self._params[n][1]
            return 0, largest
        blocks = [self.full_param_bytes(self._unit_params[u.name]) for u in self.units if u.kind == "block"]
        trained = [self.full_param_bytes([p for p in self._unit_params[u.name] if p in set(path)])
                   for u in self.units if u.kind == "block"]
        gathered = 2 * max(blocks, default=0)
        return gathered + max(trained, default=0), 0

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
        comm_run, comm_end = self._communication(path)

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
            base_term += comm_end if name == "backward_end" else comm_run if name.startswith(("forward", "backward")) else 0
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
        if self.device_type == "cpu":
            # No allocator peak is measured on the CPU: the counted bytes (every term at once, an
            # upper bound of what is live together) are the measurement a budget is held against.
            add("counted", grads, acts, outside + self.offset)  # alpha = 1, offset = 0 unless calibrated
        peak_phase = max(phases, key=lambda k: phases[k])
        terms = {k: int(round(v)) for k, v in terms_at[peak_phase].items()}
        peak = int(sum(terms.values()))
        return Prediction(batch_shape=shape, weights=weights, gradients=grads, optimizer=opt, activations=blocks,
                          activations_outside=outside, offloaded=off_state + off_w,
                          predicted_counted_bytes=int(counted), predicted_peak_bytes=peak, peak_phase=peak_phase,
                          terms=terms, phases={k: int(round(v)) for k, v in phases.items()}, block_states=states,
                          kernel=kernel, trainable_params=sum(self._full[n][2] for n in upd),
                          communication=comm_end if peak_phase == "backward_end" else
                          comm_run if peak_phase.startswith(("forward", "backward")) else 0)

    def _recompute_bytes(self, plan, shape) -> int:
        """A checkpointed block's activations when backward recomputes it (probed without checkpointing)."""
        if not hasattr(self, "_nockpt_probe"):
            self._nockpt_probe = self.probe.without_checkpointing()
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
