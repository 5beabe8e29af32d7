"""The activation probe: saved activations measured per block state on a small CPU model.

A probe builds the target's architecture with a few blocks on the CPU (`build_small_like`),
applies a small plan that puts its blocks in the states the real plan needs (`block_states`), runs
forwards at small shapes under saved_tensors_hooks (counting.SavedTensorCounter) and fits per
state bytes(B, S). CPU and CUDA attention differ: when the CPU runs the math kernel and the target
is CUDA, the probe is rerun with an attention that saves exactly what the fused CUDA kernels save.
"""
from __future__ import annotations

import copy
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch import nn

from ..errors import DynatuneError
from ..losses import chunked_causal_lm_loss
from ..plan import Plan
from ..plan_mechanics import BlockStack, add_plan_hooks, enable_checkpointing, grad_param_names, require_grad_only
from ..precision import autocast_for
from ..units import Units, partition, unwrap_peft
from .counting import SavedTensorCounter

PROBE_SEQ_LENS = (16, 24, 32)
PROBE_LAYERS = 4


# ---------------------------------------------------------------------------------------------
# Fits: a state's saved bytes as a function of the batch shape
# ---------------------------------------------------------------------------------------------
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


_ORIG_DROPOUT = F.dropout


@contextmanager
def _dropout_as_on_cuda():
    """Within: dropout saves what CUDA's fused kernel saves. On the CPU, F.dropout multiplies by a
    float mask and saves it (4 bytes an element in fp32); on CUDA, for 0 < p < 1, it runs
    native_dropout, which saves a bool mask (1 byte). torch.native_dropout runs on the CPU too."""

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and not inplace and 0 < p < 1 and input.numel() > 0:
            return torch.native_dropout(input, p, True)[0]
        return _ORIG_DROPOUT(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = _ORIG_DROPOUT


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
def hf_loss(model, batch):
    """`model(**batch).loss` (the loop's loss), or the output itself for models without labels."""
    out = model(**batch)
    return out.loss if getattr(out, "loss", None) is not None else out


def sliced_logits_loss(model, batch):
    """User code that keeps fp32 logits and slices the shift: shared/anchors/anchors_gpu.py's
    early-exit rows (`logits = lm_head(norm(h)).float(); CE(logits[:, :-1].reshape(...), ids[:, 1:])`)."""
    inner = unwrap_peft(model)
    out = inner.base_model(input_ids=batch["input_ids"], use_cache=False)
    logits = inner.get_output_embeddings()(out.last_hidden_state).float()
    ids = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def is_causal_lm(model) -> bool:
    inner = unwrap_peft(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    name = type(inner).__name__
    return isinstance(head, nn.Linear) and ("CausalLM" in name or "LMHead" in name)


# ---------------------------------------------------------------------------------------------
# Plans -> per-block states
# ---------------------------------------------------------------------------------------------
FIRST_STATES = ("first_update", "first_adapter", "first_probe")
MID_STATES = ("update", "adapter", "frozen")


def base_state(state: str) -> str:
    """'adapter:attention.self.query' -> 'adapter' (a state with some of a block's adapters active)."""
    return state.split(":", 1)[0]


def adapter_subset(state: str) -> frozenset[str] | None:
    """The active adapters (relative to their block) of an 'adapter:a,b' state; None: all of them."""
    return frozenset(state.split(":", 1)[1].split(",")) if ":" in state else None


def block_states(units: Units, plan: Plan) -> tuple[list[str], bool, frozenset]:
    """What each block does under `plan`, for pricing its saved activations.

    Returns (states by depth, embedding lookup on the backward path, non-block units with grads).
    States: none (past the exit: does not run), idle (runs below the backward path: saves nothing,
    under non-reentrant checkpointing too, since nothing below the path needs a gradient), first_update /
    first_adapter (the lowest block backward reaches, which trains: its input needs no gradient),
    first_probe (the lowest block is only probed at its output: saves nothing), update / adapter
    (trains, input needs a gradient), frozen (on the backward path without training). Module-level
    units make their block an `update` block (an upper bound). Adapter units are priced per module:
    a block with only some of its adapters active is `adapter:<names>` (first_adapter:<names>), the
    active adapters' module names relative to the block, measured with exactly those active (two
    adapters reading the same input save it once, so their costs do not add up).
    """
    n = units.n_blocks
    e = plan.exit_depth or n
    grad_units = plan.update | plan.probe_params
    need = grad_units | plan.probe
    outside = frozenset(u for u in grad_units if not 0 <= units[u].depth < n)
    embed_on_path = any(units[u].kind == "embedding" for u in need) and not plan.detach_tied_input
    trained_depths = {units[u].depth for u in grad_units if 0 <= units[u].depth < n}
    active: dict[int, set[str]] = {}
    for u in grad_units:
        if 0 <= units[u].depth < n and units[u].kind == "adapter":
            active.setdefault(units[u].depth, set()).add(u)
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
        kind = "adapter" if i in active else "update"
        if i in active:
            block_adapters = {u.name for u in units.in_block(i) if u.kind == "adapter"}
            if active[i] != block_adapters:
                prefix = f"block.{i}."
                kind += ":" + ",".join(sorted(u[len(prefix):] for u in active[i]))
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


def _in_every_block(cfg):
    """A peft config whose targets name modules relative to their block, so the probe's few blocks
    all carry the target's adapters whichever blocks of the target do ('bert.encoder.layer.4.
    attention.self.query' -> 'attention.self.query'; layers_to_transform dropped). Blocks are
    identical, and the plan, not the probe's adapters, says which of them train."""
    cfg = copy.deepcopy(cfg)

    def relative(name: str) -> str:
        return re.sub(r"^.*?\\?\.\d+\\?\.", "", name)  # up to the block index (escaped or not)

    if isinstance(cfg.target_modules, (list, set, tuple)):
        cfg.target_modules = sorted({relative(t) for t in cfg.target_modules})
    for attr in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, attr, None)
        if pattern:
            setattr(cfg, attr, {relative(k): v for k, v in pattern.items()})
    if getattr(cfg, "layers_to_transform", None) is not None:
        cfg.layers_to_transform = None
        cfg.layers_pattern = None
    return cfg


def _default_prepare(target: nn.Module):
    """Mirror the target's adapters on a fresh model: re-inject the same peft config, in every block."""
    if hasattr(target, "peft_config") and hasattr(target, "get_base_model"):  # PeftModel wrapper
        from peft import get_peft_model
        cfg = _in_every_block(target.peft_config[target.active_adapter])
        return lambda m: get_peft_model(m, copy.deepcopy(cfg))
    if hasattr(target, "peft_config"):  # inject_adapter_in_model
        from peft import inject_adapter_in_model
        cfgs = {name: _in_every_block(c) for name, c in target.peft_config.items()}

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
        self.max_layers = n_blocks
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

    def without_checkpointing(self) -> "ActivationProbe":
        """A probe like this one whose blocks are not checkpointed (what backward recomputes), built afresh."""
        p = copy.copy(self)
        p.gradient_checkpointing = False
        p._cache = {}
        p._model = None
        return p

    # -- the small model -----------------------------------------------------------------------
    def _setup(self):
        if self._model is not None:
            return
        m = self.build_small(self.n_layers)
        if self.gradient_checkpointing:
            enable_checkpointing(m)
        m.train()
        units = partition(m, self.granularity, self.layers)
        stack = BlockStack(m, units.blocks_path)
        counter = SavedTensorCounter(torch.device("cpu"))
        counter.attach({f"block.{i}": b for i, b in enumerate(stack.full)}, list(m.parameters()))
        self._model, self._units, self._stack, self._counter = m, units, stack, counter
        # skipping GEMMs pays off on real-size layers; on tiny models the Python dispatch costs more
        n_params = sum(p.numel() for p in m.parameters())
        self._fast = self.fast is True or (self.fast == "auto" and n_params >= 5_000_000)
        self._is_causal_lm = is_causal_lm(m)
        cfg = getattr(unwrap_peft(m), "config", None)
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
            return lambda m, b: chunked_causal_lm_loss(m, b, self.chunk_tokens)
        if self.loss == "sliced":
            return sliced_logits_loss
        return hf_loss

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
        first = [s for s in path if base_state(s) in FIRST_STATES][:1]
        mids = sorted({s for s in path if base_state(s) in MID_STATES})
        layout = idle + first + mids
        if layout:
            h = 1 if (layout[0] == "first_probe" and len(layout) > 1) else 0
            holder = layout[h]
            repeated = states.count(holder) > 1
            # per-module adapter states can outnumber the probe's blocks: it grows (never past the
            # target's block count, which bounds the distinct states of any plan)
            if len(layout) + repeated > self.n_layers and self.n_layers < self.max_layers:
                self.n_layers = min(self.max_layers, len(layout) + repeated)
                self._model = None
            if repeated and len(layout) < self.n_layers:
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
            subset = adapter_subset(s)
            in_block = [u.name for u in units.in_block(i)
                        if subset is None or u.name[len(f"block.{i}."):] in subset]
            if base_state(s) in ("first_update", "update", "first_adapter", "adapter"):
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
                    if self.device_type == "cuda":
                        st.enter_context(_dropout_as_on_cuda())
                    st.enter_context(autocast_for(self.precision, "cpu"))
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
            self._stack.set_exit(None)
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
        """The engine's plan mechanics (plan_mechanics.py) on the small model; returns the hooks."""
        m, units = self._model, self._units
        require_grad_only(dict(m.named_parameters()), grad_param_names(units, plan))
        hooks = add_plan_hooks(m, units, self._stack.full, plan)
        self._stack.set_exit(plan.exit_depth)
        return hooks

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
            with torch.no_grad(), autocast_for(self.precision, "cpu"):
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
    base = unwrap_peft(target)
    cls = type(base)
    cfg0 = copy.deepcopy(base.config)
    if layer_types is not None:
        cfg0.layer_types = list(layer_types)
    tied = (base.get_output_embeddings() is not None and base.get_input_embeddings() is not None
            and base.get_output_embeddings().weight is base.get_input_embeddings().weight)
    # a peft target is mirrored from its own config in every block (a method's prepare would adapt
    # the probe's few blocks by the target's block indices); other adapters come from `prepare`
    prepare = _default_prepare(target) or prepare

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
