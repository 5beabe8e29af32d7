"""Row-sparse deltas (SPSFT, shared/papers/002 eq. 1 and 5): train r selected rows of a frozen weight.

A linear h = W x + b becomes h = W x + b + M W_f x, where M (d_out x r) scatters the r trained
rows back to their output positions and W_f (r x d_in) starts at zero. Written as one autograd
function so that backward keeps only x (a plain trained linear saves x too): never W_f x (what
LoRA's A x costs), and nothing for the frozen W (its reference is held, no copy). Gradients:

    dW_f = (g[..., rows])^T x        dx = g W^T + g[..., rows] W_f

Vector parameters (LayerNorm / RMSNorm weight and bias) get the same treatment per channel:
w_eff = w + M d, handed to the norm's own forward (`torch.func.functional_call`), so the norm
saves what it saves anyway.

`merge()` writes W[rows] = W0[rows] + W_f (W0's rows kept aside, so `unmerge()` restores W bit
for bit and a later merge gives the same merged weight bit for bit); a merged module runs the
plain linear, with no latency left. `to_plain()` hands back the original module (for saving). In eval mode (module.eval()) the forward
computes with the merged weight, so an evaluation equals the saved merged model's bit for bit.

Parameter names are those of the wrapped module (`weight`, `bias`) plus `spsft_delta`, and the
row indices are the buffer `spsft_rows`; units.py treats `spsft_` parameters as adapters.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.amp import custom_bwd, custom_fwd

DELTA = "spsft_delta"
ROWS = "spsft_rows"
COL_DELTA = "spsft_col_delta"
COLS = "spsft_cols"
# a deltas export (methods/spsft.py): rows + W_f (+ the fresh task head) and what names the base model
DELTAS_FILE = "spsft_deltas.safetensors"
DELTAS_CONFIG = "spsft_config.json"


def _make_function(device_type: str):
    """The autograd function for one device type: torch.amp's custom_fwd/custom_bwd take a fixed
    device type, and backward must run under the autocast state the forward ran under."""

    class RowDeltaLinearFn(torch.autograd.Function):
        @staticmethod
        @custom_fwd(device_type=device_type)
        def forward(ctx, x, weight, bias, delta, rows, col_delta, cols):
            h = F.linear(x, weight, bias)  # under autocast: the compute dtype, W's cast not kept
            if delta is not None:
                h.index_add_(-1, rows, F.linear(x, delta).to(h.dtype))
            if col_delta is not None:  # a dependent layer's columns (appendix B): W_dep x[..., cols]
                h = h + F.linear(x.index_select(-1, cols), col_delta).to(h.dtype)
            # only x: W and the deltas are parameters (held by reference, never copied), rows and
            # cols are buffers. Under autocast x is kept in the compute dtype, as a plain linear keeps it.
            xs = x
            if torch.is_autocast_enabled(device_type):
                xs = x.to(torch.get_autocast_dtype(device_type))
            ctx.save_for_backward(xs)
            ctx.weight, ctx.delta, ctx.rows, ctx.col_delta, ctx.cols = weight, delta, rows, col_delta, cols
            ctx.x_dtype = x.dtype
            return h

        @staticmethod
        @custom_bwd(device_type=device_type)
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            weight, delta, rows, col_delta, cols = ctx.weight, ctx.delta, ctx.rows, ctx.col_delta, ctx.cols
            ctx.weight = ctx.delta = ctx.rows = ctx.col_delta = ctx.cols = None
            amp = torch.is_autocast_enabled(device_type)

            def mat(t):  # autocast casts inside matmul; without it, match g's dtype (pure bf16 or fp32)
                return t if amp else t.to(g.dtype)
            need_x, need_w, need_b, need_d, _, need_c = ctx.needs_input_grad[:6]
            dx = dw = db = dd = dc = None
            g_rows = g.index_select(-1, rows) if delta is not None else None
            x2 = x.reshape(-1, x.shape[-1])
            if need_x:
                # dx = g W^T + g_rows W_f (+ g W_dep into the columns), in the matmuls' dtype
                dx = g.matmul(mat(weight))
                if delta is not None:
                    dx = dx + g_rows.matmul(mat(delta))
                if col_delta is not None:
                    dx = dx.index_add(-1, cols, g.matmul(mat(col_delta)).to(dx.dtype))
                dx = dx.to(ctx.x_dtype)
            if need_d:
                dd = g_rows.reshape(-1, g_rows.shape[-1]).t().matmul(x2).to(delta.dtype)
            if need_c:
                dc = g.reshape(-1, g.shape[-1]).t().matmul(x2.index_select(-1, cols)).to(col_delta.dtype)
            if need_w:  # not SPSFT's use (W is frozen), but the function stays a correct linear
                dw = g.reshape(-1, g.shape[-1]).t().matmul(x2).to(weight.dtype)
            if need_b:
                db = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
            return dx, dw, db, dd, None, dc, None

    RowDeltaLinearFn.__name__ = f"RowDeltaLinearFn_{device_type}"
    return RowDeltaLinearFn


_FUNCTIONS: dict[str, type] = {}


def row_delta_linear(x, weight, bias, delta, rows, col_delta=None, cols=None):
    """W x + b + scatter_rows(W_f x) (+ W_dep x[..., cols]), saving only x for backward."""
    dt = x.device.type
    fn = _FUNCTIONS.get(dt)
    if fn is None:
        fn = _FUNCTIONS[dt] = _make_function(dt)
    return fn.apply(x, weight, bias, delta, rows, col_delta, cols)


def _checked(rows, d: int) -> torch.Tensor:
    """Row indices as a sorted CPU long tensor (checked on the host: a meta-device model has no values)."""
    rows = torch.as_tensor(rows, dtype=torch.long).detach().cpu().flatten()
    if rows.numel() == 0 or rows.unique().numel() != rows.numel() or int(rows.min()) < 0 or int(rows.max()) >= d:
        raise ValueError(f"rows must be distinct indices in 0..{d - 1}")
    return rows.sort().values


class _Merge:
    """Merge / unmerge shared by the linear and vector deltas (the base tensor's rows along dim 0)."""

    merged: bool

    def _base(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """W[rows] = W0[rows] + W_f; W0's rows are kept so unmerge restores W exactly."""
        if self.merged:
            return
        base, rows, delta = self._base(), getattr(self, ROWS), getattr(self, DELTA)
        self._kept = base.index_select(0, rows).clone()
        base.index_copy_(0, rows, self._kept + delta.to(base.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._base().index_copy_(0, getattr(self, ROWS), self._kept)
        self._kept = None
        self.merged = False


class RowDeltaLinear(nn.Module, _Merge):
    """A frozen nn.Linear plus trainable rows: W_f (r x d_in, zero-initialised) on output rows `rows`."""

    def __init__(self, base: nn.Linear, rows):
        super().__init__()
        rows = _checked(rows, base.out_features).to(base.weight.device)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer(ROWS, rows)
        self.spsft_delta = nn.Parameter(torch.zeros(rows.numel(), base.in_features, dtype=base.weight.dtype,
                                                    device=base.weight.device))
        self.merged = False
        self._kept = None
        self._plain_type = type(base)

    @property
    def r(self) -> int:
        return int(getattr(self, ROWS).numel())

    @property
    def cols(self) -> torch.Tensor | None:
        return getattr(self, COLS, None)

    def _base(self):
        return self.weight

    def add_columns(self, cols) -> None:
        """Appendix B's dependency: input columns `cols` of this weight train too, as W_dep (d_out x c,
        zero-initialised) on x[..., cols]; the same function keeps saving x alone."""
        cols = _checked(cols, self.in_features).to(self.weight.device)
        self.register_buffer(COLS, cols)
        self.spsft_col_delta = nn.Parameter(torch.zeros(self.out_features, cols.numel(), dtype=self.weight.dtype,
                                                        device=self.weight.device))

    def merged_weight(self) -> torch.Tensor:
        """W with W_f added on the rows and W_dep on the columns (what merge() writes), out of place."""
        w = self.weight.index_add(0, getattr(self, ROWS), self.spsft_delta.to(self.weight.dtype))
        if self.cols is not None:
            w = w.index_add(1, self.cols, self.spsft_col_delta.to(w.dtype))
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Rows then columns, each from kept copies, so unmerge restores W bit for bit and a later
        merge writes the same merged weight bit for bit."""
        if self.merged:
            return
        super().merge()
        self.merged = False
        if self.cols is not None:
            w = self.weight
            self._kept_cols = w.index_select(1, self.cols).clone()
            w.index_copy_(1, self.cols, self._kept_cols + self.spsft_col_delta.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.cols is not None:
            self.weight.index_copy_(1, self.cols, self._kept_cols)
            self._kept_cols = None
        super().unmerge()

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if not self.training:
            # evaluation computes with the merged weight (W0[rows] + W_f, the sum merge() stores), so a
            # saved merged model reproduces the run's evaluations bit for bit
            return F.linear(x, self.merged_weight(), self.bias)
        return row_delta_linear(x, self.weight, self.bias, self.spsft_delta, getattr(self, ROWS),
                                getattr(self, "spsft_col_delta", None), self.cols)

    def to_plain(self) -> nn.Linear:
        """The wrapped linear (merged first), sharing this module's weight and bias."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        c = 0 if self.cols is None else self.cols.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={self.r}, columns={c}, "
                f"merged={self.merged}")


class RowDeltaVector(nn.Module, _Merge):
    """A norm module (LayerNorm, RMSNorm, ...) whose parameter `param` ('weight' or 'bias') gets
    trainable selected channels: the norm runs with w + M d through its own forward."""

    def __init__(self, base: nn.Module, rows, param: str = "weight"):
        super().__init__()
        vec = getattr(base, param)
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1:
            raise ValueError(f"{type(base).__name__}.{param} is not a vector parameter")
        rows = _checked(rows, vec.numel()).to(vec.device)
        self.inner = base
        self.param = param
        self.register_buffer(ROWS, rows)
        self.spsft_delta = nn.Parameter(torch.zeros(rows.numel(), dtype=vec.dtype, device=vec.device))
        self.merged = False
        self._kept = None

    @property
    def r(self) -> int:
        return int(getattr(self, ROWS).numel())

    def _base(self):
        return getattr(self.inner, self.param)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.inner(*args, **kwargs)
        w = self._base()
        eff = w.index_add(0, getattr(self, ROWS), self.spsft_delta.to(w.dtype))  # a d-vector, not an activation
        return torch.func.functional_call(self.inner, {self.param: eff}, args, kwargs, strict=False)

    def to_plain(self) -> nn.Module:
        self.merge()
        return self.inner


DELTA_TYPES = (RowDeltaLinear, RowDeltaVector)


def row_delta_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every row delta in `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DELTA_TYPES)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def merge_all(model: nn.Module) -> None:
    for m in row_delta_modules(model).values():
        m.merge()


def unmerge_all(model: nn.Module) -> None:
    for m in row_delta_modules(model).values():
        m.unmerge()


def unwrap_all(model: nn.Module) -> nn.Module:
    """Merge every delta and put the original modules back: a plain model (for save_pretrained)."""
    for name, m in list(row_delta_modules(model).items()):
        replace_module(model, name, m.to_plain())
    return model


def load_deltas(model: nn.Module, path) -> nn.Module:
    """Put a deltas export (methods/spsft.py) (spsft_deltas.safetensors) onto its base model: row deltas with the saved
    rows and W_f, and the saved task head. Returns the model (in place)."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = json.loads((path / DELTAS_CONFIG).read_text())
    tensors = load_file(path / DELTAS_FILE)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, kind in spec["modules"].items():
            mod = model.get_submodule(name)
            rows = tensors[f"{name}.{ROWS}"]
            new = RowDeltaLinear(mod, rows) if kind == "linear" else RowDeltaVector(mod, rows, "weight")
            new.spsft_delta.copy_(tensors[f"{name}.{DELTA}"])
            if f"{name}.{COLS}" in tensors:
                new.add_columns(tensors[f"{name}.{COLS}"])
                new.spsft_col_delta.copy_(tensors[f"{name}.{COL_DELTA}"])
            replace_module(model, name, new)
        for p in spec["heads"]:
            params[p].copy_(tensors[p])
    model.eval()
    return model
