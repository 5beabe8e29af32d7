"""The row-sparse delta (modules/row_delta.py): what it computes, what it saves, merge and unmerge."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynatune.modules import RowDeltaLinear, RowDeltaVector


def _saved_bytes(fn):
    """Bytes of the distinct storages saved for backward while fn() runs (parameters excluded)."""
    seen, params = {}, set()

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def _lin(seed=0, d_in=6, d_out=5, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def test_forward_and_grads_match_dense_reference():
    lin = _lin()
    rows = torch.tensor([4, 1])
    m = RowDeltaLinear(copy.deepcopy(lin), rows)
    with torch.no_grad():
        m.spsft_delta.normal_()
    x = torch.randn(3, 7, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    d_ref = m.spsft_delta.detach().clone().requires_grad_(True)
    assert m.spsft_rows.tolist() == [1, 4]  # kept sorted: row j of W_f is the j-th smallest index
    w_full = lin.weight.detach().index_add(0, m.spsft_rows, d_ref)  # W + M W_f, dense
    h_ref = F.linear(x_ref, w_full, lin.bias.detach())
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    h = m(x)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(h)
    h.backward(g)
    h_ref.backward(g)
    torch.testing.assert_close(m.spsft_delta.grad, d_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert m.weight.grad is None and m.bias.grad is None  # the frozen W gets nothing


@pytest.mark.parametrize("autocast", [False, True])
def test_saves_only_x(autocast):
    """saved-for-backward bytes == x's bytes (its bf16 copy under autocast, as a plain linear keeps)."""
    m = RowDeltaLinear(_lin(d_in=64, d_out=48), torch.arange(0, 48, 3))
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = torch.randn(4, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h, seen = _saved_bytes(lambda: m(x))
    assert h.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert sum(seen.values()) == x.numel() * (2 if autocast else 4)
    h.float().sum().backward()
    assert m.spsft_delta.grad is not None and m.spsft_delta.grad.dtype == torch.float32


def test_bf16_autocast_matches_a_plain_linear_under_autocast():
    """Under bf16 autocast the delta's gradient is the dense weight gradient's selected rows, as a
    plain linear computes it under autocast (relative error below 1e-2: bf16 rounding)."""
    lin = _lin(d_in=32, d_out=24)
    m = RowDeltaLinear(copy.deepcopy(lin), torch.tensor([0, 5, 23]))
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = torch.randn(2, 8, 32)
    ref = copy.deepcopy(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = m(x)
        h_ref = ref(x)
        assert h.dtype == h_ref.dtype == torch.bfloat16
        h.float().pow(2).sum().backward()
        h_ref.float().pow(2).sum().backward()
    want = ref.weight.grad[[0, 5, 23]]
    assert float((m.spsft_delta.grad - want).norm() / want.norm()) < 1e-2


def test_every_row_selected_equals_full_finetuning_of_the_weight():
    """With every row selected, W + W_f trains as W itself does (AdamW, 8 steps): losses and the
    effective weight agree to 1e-6 (float rounding of W0 + sum of updates vs the updates' sum)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    full = copy.deepcopy(net)
    sparse = copy.deepcopy(net)
    sparse[2] = RowDeltaLinear(sparse[2], torch.arange(4))
    for p in list(full.parameters()):
        p.requires_grad_(False)
    full[2].weight.requires_grad_(True)
    for p in sparse.parameters():
        p.requires_grad_(False)
    sparse[2].spsft_delta.requires_grad_(True)
    o_full = torch.optim.AdamW([full[2].weight], lr=1e-2, weight_decay=0.0)
    o_sp = torch.optim.AdamW([sparse[2].spsft_delta], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        x, y = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
        losses = []
        for model, opt in ((full, o_full), (sparse, o_sp)):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-6
    eff = sparse[2].weight + sparse[2].spsft_delta
    torch.testing.assert_close(eff, full[2].weight, rtol=0, atol=1e-6)
    assert torch.equal(sparse[0].weight, net[0].weight)  # the rest did not move


def test_merge_unmerge_exact():
    lin = _lin(d_in=9, d_out=7)
    w0 = lin.weight.detach().clone()
    m = RowDeltaLinear(lin, torch.tensor([6, 2, 3]))
    with torch.no_grad():
        m.spsft_delta.normal_()
    x = torch.randn(4, 9)
    h = m(x)
    m.merge()
    merged = m.weight.detach().clone()
    torch.testing.assert_close(m(x), h, rtol=0, atol=1e-6)  # no delta left to apply: plain linear
    assert torch.equal(merged[[0, 1, 4, 5]], w0[[0, 1, 4, 5]])
    m.unmerge()
    assert torch.equal(m.weight, w0)  # unmerge restores W bit for bit
    m.merge()
    assert torch.equal(m.weight, merged)  # merge(unmerge(W)) == W
    plain = m.to_plain()
    assert type(plain) is nn.Linear and torch.equal(plain.weight, merged)


@pytest.mark.parametrize("param", ["weight", "bias"])
def test_vector_delta_norm(param):
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(norm)
    v0 = getattr(norm, param).detach().clone()
    m = RowDeltaVector(norm, torch.tensor([1, 4]), param)
    for p in m.inner.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        m.spsft_delta.copy_(torch.tensor([0.3, -0.2]))
        getattr(ref, param)[torch.tensor([1, 4])] += m.spsft_delta
    x = torch.randn(3, 6, requires_grad=True)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-6)
    m(x).pow(2).sum().backward()
    getattr(ref, param).requires_grad_(True)
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(m.spsft_delta.grad, getattr(ref, param).grad[[1, 4]], rtol=0, atol=1e-6)
    assert m.inner.weight.grad is None
    h = m(x).detach()
    m.merge()
    torch.testing.assert_close(m(x), h, rtol=0, atol=1e-6)
    merged = getattr(m.inner, param).detach().clone()
    m.unmerge()
    assert torch.equal(getattr(m.inner, param), v0)
    m.merge()
    assert torch.equal(getattr(m.inner, param), merged)


def test_bad_rows_refused():
    with pytest.raises(ValueError):
        RowDeltaLinear(_lin(), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        RowDeltaLinear(_lin(d_out=5), torch.tensor([5]))


def test_column_delta_grads_saved_bytes_and_merge():
    """Appendix B's dependent columns: h = W x + M W_f x + W_dep x[..., cols]; gradients equal the dense
    reference's, backward still saves x alone, merge/unmerge stay exact."""
    lin = _lin(d_in=10, d_out=7)
    w0 = lin.weight.detach().clone()
    m = RowDeltaLinear(copy.deepcopy(lin), torch.tensor([2, 5]))
    m.add_columns(torch.tensor([9, 0, 4]))
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    with torch.no_grad():
        m.spsft_delta.normal_()
        m.spsft_col_delta.normal_()
    d = m.spsft_delta.detach().clone().requires_grad_(True)
    c = m.spsft_col_delta.detach().clone().requires_grad_(True)
    dense = w0.index_add(0, m.spsft_rows, d).index_add(1, m.spsft_cols, c)
    x = torch.randn(3, 4, 10, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    h, seen = _saved_bytes(lambda: m(x))
    assert sum(seen.values()) == x.numel() * 4
    h_ref = F.linear(xr, dense, lin.bias.detach())
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5)
    g = torch.randn_like(h)
    h.backward(g)
    h_ref.backward(g)
    torch.testing.assert_close(m.spsft_delta.grad, d.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.spsft_col_delta.grad, c.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-5)
    m.eval()
    h_eval = m(x).detach()
    m.merge()
    merged = m.weight.detach().clone()
    assert torch.equal(m(x), h_eval)  # eval computes with exactly the merged weight
    m.unmerge()
    assert torch.equal(m.weight, w0)
    m.merge()
    assert torch.equal(m.weight, merged)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_on_each_device_grads_saved_bytes_and_merge(device):
    """The same promises on a GPU: fp32 grads equal the dense reference's selected rows, bf16
    autocast saves only x's bf16 copy, and merge then unmerge gives W back bit for bit."""
    lin = _lin(d_in=64, d_out=48).to(device)
    rows = torch.arange(1, 48, 5, device=device)
    m = RowDeltaLinear(copy.deepcopy(lin), rows)
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = torch.randn(4, 16, 64, device=device)
    ref = copy.deepcopy(lin)
    h, h_ref = m(x), ref(x)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)  # W_f starts at zero
    g = torch.randn_like(h)
    h.backward(g)
    h_ref.backward(g)
    torch.testing.assert_close(m.spsft_delta.grad, ref.weight.grad[m.spsft_rows], rtol=1e-5, atol=1e-5)
    with torch.autocast(device, dtype=torch.bfloat16):
        hb, seen = _saved_bytes(lambda: m(x.requires_grad_(True)))
    assert hb.dtype == torch.bfloat16 and sum(seen.values()) == x.numel() * 2
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.spsft_delta.normal_()
    before = m(x).detach()
    m.merge()
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert torch.equal(m.weight, w0)
