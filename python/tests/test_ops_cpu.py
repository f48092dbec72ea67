"""The ops on CPU tensors (the crate's CPU oracle through the extension module) against
float64 references in torch, their autograd, their checks and their fake kernels."""

import pytest
import torch

import lora_kernels  # noqa: F401
from lora_kernels import ops
from conftest import DTYPES, EPS, assert_close

L = torch.ops.lora_kernels


def layer(t, k, n, r, dtype, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(t * 1000 + k * 10 + n)
    x = torch.randn(t, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).to(device)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype).to(device)
    bb = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, a, b, bb


def ref_lora(x, w, a, b, bias, s):
    x, w, a, b = (v.double() for v in (x, w, a, b))
    y = x @ w.T + s * (x @ a.T) @ b.T
    return y + bias.double() if bias is not None else y


SHAPES = [(1, 8, 8, 1), (7, 37, 23, 5), (33, 64, 40, 16), (5, 130, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_forward_backward(dtype, shape):
    t, k, n, r = shape
    x, w, a, b, bias = layer(t, k, n, r, dtype)
    s = 2.0
    y, h = L.lora_forward(x, w, a, b, bias, s, 0.0, 0)
    assert_close(y, ref_lora(x, w, a, b, bias, s), dtype, k, "y")
    assert_close(h, x.double() @ a.double().T, dtype, k, "h")

    xr, ar, br, biasr = (v.double().requires_grad_() for v in (x, a, b, bias))
    yr = ref_lora(xr, w, ar, br, biasr, s)
    dy = torch.randn(t, n).to(dtype)
    yr.backward(dy.double())
    xg, ag, bg, biasg = (v.clone().requires_grad_() for v in (x, a, b, bias))
    L.lora_forward(xg, w, ag, bg, biasg, s, 0.0, 0)[0].backward(dy)
    assert_close(xg.grad, xr.grad, dtype, max(n, r), "dx")
    assert_close(ag.grad, ar.grad, dtype, t * n, "da")
    assert_close(bg.grad, br.grad, dtype, t, "db")
    assert_close(biasg.grad, biasr.grad, dtype, t, "dbias")


def test_lora_dropout_mask_regenerated():
    # A = I (r = K): h is drop(x) itself, so the mask can be read off, and the backward
    # must use the very same mask.
    t, k, n, p, s = 41, 12, 9, 0.3, 0.5
    x = torch.randn(t, k).abs() + 0.1
    w = torch.randn(n, k)
    a = torch.eye(k)
    b = torch.randn(n, k)
    y, h = L.lora_forward(x, w, a, b, None, s, p, 1234)
    keep = h != 0
    frac = 1 - keep.double().mean().item()
    assert 0.15 < frac < 0.45, f"dropped fraction {frac}"
    drop_x = x * keep / (1 - p)
    torch.testing.assert_close(h, drop_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, x @ w.T + s * drop_x @ b.T, rtol=1e-5, atol=1e-5)
    # Same seed, same mask; another seed, another mask.
    assert torch.equal(L.lora_forward(x, w, a, b, None, s, p, 1234)[1], h)
    assert not torch.equal(L.lora_forward(x, w, a, b, None, s, p, 99)[1], h)

    dy = torch.randn(t, n)
    xg, ag, bg = (v.clone().requires_grad_() for v in (x, a, b))
    L.lora_forward(xg, w, ag, bg, None, s, p, 1234)[0].backward(dy)
    g = s * dy @ b
    torch.testing.assert_close(xg.grad, dy @ w + g * keep / (1 - p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ag.grad, g.T @ drop_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bg.grad, s * dy.T @ drop_x, rtol=1e-5, atol=1e-5)


def ref_dora(x, w, a, b, bias, m, s):
    x, w, a, b, m = (v.double() for v in (x, w, a, b, m))
    norm = (w + s * b @ a).norm(dim=1).detach()
    y = (m / norm) * (x @ w.T + s * (x @ a.T) @ b.T)
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 37, 23, 5), (16, 64, 40, 8)])
def test_dora_forward_backward(dtype, shape):
    t, k, n, r = shape
    x, w, a, b, bias = layer(t, k, n, r, dtype)
    m = (torch.rand(n) + 0.5).to(dtype)
    s = 1.5
    y, h, norm, z = L.dora_forward(x, w, a, b, bias, m, s, 0.0, 0)
    assert_close(y, ref_dora(x, w, a, b, bias, m, s), dtype, k, "y")
    ref_norm = (w.double() + s * b.double() @ a.double()).norm(dim=1)
    assert_close(norm, ref_norm, dtype, k, "norm")

    leaves = [v.double().requires_grad_() for v in (x, a, b, bias, m)]
    xr, ar, br, biasr, mr = leaves
    ref_dora(xr, w, ar, br, biasr, mr, s).backward(torch.ones(t, n, dtype=torch.float64) * 0.5)
    ours = [v.clone().requires_grad_() for v in (x, a, b, bias, m)]
    xg, ag, bg, biasg, mg = ours
    L.dora_forward(xg, w, ag, bg, biasg, mg, s, 0.0, 0)[0].backward(torch.full((t, n), 0.5, dtype=dtype))
    for name, got, ref, kk in [("dx", xg, xr, n), ("da", ag, ar, t * n), ("db", bg, br, t * k),
                               ("dbias", biasg, biasr, t), ("dm", mg, mr, t * k)]:
        assert_close(got.grad, ref.grad, dtype, kk, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_and_qdora_equal_the_dense_path_on_the_dequantized_weight(dtype, double_quant):
    t, k, n, r = 9, 128, 24, 4
    x, w, a, b, bias = layer(t, k, n, r, dtype)
    q = ops.nf4_quantize(w, blocksize=64, double_quant=double_quant)
    wd = ops.nf4_dequantize(q, (n, k), blocksize=64, dtype=dtype)
    assert (wd.double() - w.double()).abs().max() < 0.5, "NF4 round trip far off"
    nf = (q["packed"], q["absmax"], q["absmax2"], q["code2"], q["offset"], 64, n)

    s = 2.0
    y, h = L.qlora_forward(x, *nf, a, b, bias, s, 0.0, 0)
    yd, hd = L.lora_forward(x, wd, a, b, bias, s, 0.0, 0)
    assert torch.equal(y, yd) and torch.equal(h, hd)
    dy = torch.randn(t, n).to(dtype)
    g1 = L.qlora_backward(x, *nf, a, b, h, dy, s, 0.0, 0)
    g2 = L.lora_backward(x, wd, a, b, hd, dy, s, 0.0, 0)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)

    m = (torch.rand(n) + 0.5).to(dtype)
    o1 = L.qdora_forward(x, *nf, a, b, bias, m, s, 0.0, 0)
    o2 = L.dora_forward(x, wd, a, b, bias, m, s, 0.0, 0)
    for u, v in zip(o1, o2):
        assert torch.equal(u, v)
    _, h1, n1, z1 = o1
    g1 = L.qdora_backward(x, *nf, a, b, m, h1, n1, z1, dy, s, 0.0, 0)
    g2 = L.dora_backward(x, wd, a, b, m, h1, n1, z1, dy, s, 0.0, 0)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)


def test_merge_unmerge():
    k, n, r, s = 37, 23, 5, 0.75
    _, w, a, b, _ = layer(1, k, n, r, torch.float32)
    w0 = w.clone()
    L.lora_merge(w, a, b, s, False)
    torch.testing.assert_close(w, w0 + s * b @ a, rtol=1e-5, atol=1e-6)
    L.lora_merge(w, a, b, s, True)
    torch.testing.assert_close(w, w0, rtol=1e-5, atol=1e-6)


# ---- checks ---------------------------------------------------------------------------


def test_bad_inputs_raise_and_name_the_tensor():
    x, w, a, b, bias = layer(4, 16, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="w has dtype torch.float16"):
        L.lora_forward(x, w.half(), a, b, bias, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        L.lora_forward(x.long(), w, a, b, bias, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"b has shape \(8, 3\), expected \(8, 2\)"):
        L.lora_forward(x, w, a, torch.randn(8, 3), bias, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="w has shape"):
        L.lora_forward(x, w[:, :15].contiguous(), a, b, bias, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="w must be contiguous"):
        L.lora_forward(x, torch.randn(16, 8).T, a, b, bias, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        L.lora_forward(x[None], w, a, b, bias, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias has shape"):
        L.lora_forward(x, w, a, b, bias[:3], 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="dropout p = 1.0"):
        L.lora_forward(x, w, a, b, bias, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        L.lora_forward(x, w, a, b, bias, float("nan"), 0.0, 0)
    with pytest.raises(ValueError, match="dy has shape"):
        L.lora_backward(x, w, a, b, torch.zeros(4, 2), torch.zeros(4, 9), 1.0, 0.0, 0)
    q = ops.nf4_quantize(torch.randn(8, 16), 64, True)
    with pytest.raises(ValueError, match="packed has 63 bytes"):
        L.qlora_forward(x, q["packed"][:63], q["absmax"], q["absmax2"], q["code2"], q["offset"], 64, 8,
                        a, b, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="absmax2 and code2 come together"):
        L.qlora_forward(x, q["packed"], q["absmax"], q["absmax2"], None, q["offset"], 64, 8,
                        a, b, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="blocksize"):
        L.qlora_forward(x, q["packed"], torch.zeros(128, dtype=torch.uint8), q["absmax2"], q["code2"],
                        q["offset"], 1, 8, a, b, None, 1.0, 0.0, 0)


def test_base_weight_grad_is_refused():
    x, w, a, b, bias = layer(4, 16, 8, 2, torch.float32)
    w.requires_grad_()
    y = L.lora_forward(x, w, a.requires_grad_(), b, None, 1.0, 0.0, 0)[0]
    with pytest.raises(RuntimeError, match="base weight w requires grad"):
        y.sum().backward()


def test_fake_kernels_on_meta():
    x, w, a, b, bias = (v.to("meta") for v in layer(6, 16, 8, 2, torch.bfloat16))
    y, h = L.lora_forward(x, w, a, b, bias, 1.0, 0.0, 0)
    assert y.shape == (6, 8) and h.shape == (6, 2) and y.device.type == "meta"
    m = torch.empty(8, dtype=torch.bfloat16, device="meta")
    y, h, norm, z = L.dora_forward(x, w, a, b, bias, m, 1.0, 0.0, 0)
    assert norm.dtype == torch.float32 and z.shape == (6, 8)


@pytest.mark.parametrize("which", ["lora", "dora", "qlora"])
def test_opcheck(which):
    x, w, a, b, bias = layer(5, 64, 6, 2, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    if which == "lora":
        torch.library.opcheck(L.lora_forward, (x, w, a, b, bias, 1.0, 0.0, 0))
    elif which == "dora":
        m = (torch.rand(6) + 0.5).requires_grad_()
        torch.library.opcheck(L.dora_forward, (x, w, a, b, bias, m, 1.0, 0.0, 0))
    else:
        q = ops.nf4_quantize(w, 64, True)
        torch.library.opcheck(
            L.qlora_forward,
            (x, q["packed"], q["absmax"], q["absmax2"], q["code2"], q["offset"], 64, 6, a, b, bias, 1.0, 0.0, 0),
        )


def test_compile_traces_the_op():
    x, w, a, b, bias = layer(5, 16, 8, 2, torch.float32)

    def f(x):
        return L.lora_forward(x, w, a, b, bias, 1.0, 0.0, 0)[0] * 2

    got = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, f(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_neftune_embedding(dtype, id_dtype):
    b, s, v, d = 3, 17, 50, 24
    table = torch.randn(v, d).to(dtype)
    ids = torch.randint(0, v, (b, s), dtype=id_dtype)
    plain = L.neftune_embedding(ids, table, 0.0, 0)
    assert torch.equal(plain, table[ids.long()])
    alpha = 5.0
    noisy = L.neftune_embedding(ids, table, alpha, 7)
    mag = alpha / (s * d) ** 0.5
    noise = noisy.double() - plain.double()
    # Within the magnitude (plus one rounding of the sum), centred, and spread out.
    assert noise.abs().max() <= mag * (1 + 1e-6) + 2 * EPS[dtype] * plain.double().abs().max()
    assert abs(noise.mean().item()) < 0.1 * mag
    assert noise.std().item() > 0.4 * mag  # uniform(-mag, mag) has std mag/sqrt(3)
    assert torch.equal(L.neftune_embedding(ids, table, alpha, 7), noisy)
    assert not torch.equal(L.neftune_embedding(ids, table, alpha, 8), noisy)

    tg = table.clone().requires_grad_()
    dout = torch.randn(b, s, d).to(dtype)
    L.neftune_embedding(ids, tg, alpha, 7).backward(dout)
    ref = torch.zeros(v, d, dtype=torch.float64).index_add_(0, ids.long().flatten(), dout.double().reshape(-1, d))
    assert_close(tg.grad, ref, dtype, b * s, "d_table")


def test_neftune_bad_inputs():
    table = torch.randn(10, 4)
    with pytest.raises(TypeError, match="ids must be an int64 or int32"):
        L.neftune_embedding(torch.zeros(2, 3), table, 1.0, 0)
    with pytest.raises(ValueError, match=r"ids must be \[batch, seq\]"):
        L.neftune_embedding(torch.zeros(6, dtype=torch.long), table, 1.0, 0)
    with pytest.raises(ValueError, match="alpha = -1.0"):
        L.neftune_embedding(torch.zeros(2, 3, dtype=torch.long), table, -1.0, 0)
    with pytest.raises(ValueError, match="10"):
        L.neftune_embedding(torch.full((2, 3), 10, dtype=torch.long), table, 1.0, 0)


def test_dora_merge_unmerge():
    k, n, r, s = 37, 23, 5, 0.75
    _, w, a, b, _ = layer(1, k, n, r, torch.float32)
    m = torch.rand(n) + 0.5
    w0 = w.clone()
    norm = torch.empty(n)
    L.dora_merge(w, a, b, m, norm, s, False)
    v = w0.double() + s * b.double() @ a.double()
    ref_norm = v.norm(dim=1)
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.double(), (m.double() / ref_norm)[:, None] * v, rtol=1e-5, atol=1e-6)
    L.dora_merge(w, a, b, m, norm, s, True)
    torch.testing.assert_close(w, w0, rtol=1e-5, atol=1e-5)
