"""The kernels as PyTorch custom ops (``torch.ops.lora_kernels.*``).

Every op takes 2-D activations ``x`` [T, K] and the layer's tensors as they sit in
memory, allocates its outputs with torch (the caching allocator), and runs on torch's
current CUDA stream (CPU tensors run the crate's CPU oracle, in float64 internally).
Scratch buffers of the CUDA paths come from CUDA's stream-ordered allocator (the
device's default memory pool) on that same stream; :func:`scratch_pool_usage` reads it.

Each op has a fake (meta) implementation, so ``torch.compile``, FSDP and meta-device
tracing see shapes without running anything, and the forward ops are differentiable
(``torch.library.register_autograd``) with respect to ``x``, ``a``, ``b``, ``bias`` and,
for DoRA, the magnitude ``m``. The frozen base ``w`` gets no gradient: asking for one is
an error.

Inputs are checked before anything runs; a wrong dtype raises ``TypeError``, a wrong
device, layout or shape ``ValueError``, each naming the tensor.

Dropout is applied to the LoRA branch's input with the crate's Philox generator keyed
by ``seed``: the backward regenerates the same mask, nothing is stored.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import _lib

_DTYPES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}

__all__ = [
    "lora_forward",
    "lora_backward",
    "qlora_forward",
    "qlora_backward",
    "dora_forward",
    "dora_backward",
    "qdora_forward",
    "qdora_backward",
    "lora_merge",
    "dora_merge",
    "nf4_quantize",
    "nf4_dequantize",
    "scratch_pool_usage",
    "record_plans",
    "neftune_embedding",
    "take_index_errors",
]

_PLANS: Optional[List[Tuple[str, str]]] = None


@contextlib.contextmanager
def record_plans() -> Iterator[List[Tuple[str, str]]]:
    """Collects ``(op, plan)`` for every op run inside the block: the path the crate's
    planner took (its ``Plan`` as text; ``"cpu"`` for the oracle). For logging and
    tests; it never changes a path."""
    global _PLANS
    outer, _PLANS = _PLANS, []
    try:
        yield _PLANS
    finally:
        _PLANS = outer


def _note(op: str, plan: str) -> None:
    if _PLANS is not None:
        _PLANS.append((op, plan))


# --------------------------------------------------------------------------------------
# Checks and raw arguments
# --------------------------------------------------------------------------------------


def _dtype_name(op: str, x: Tensor) -> str:
    try:
        return _DTYPES[x.dtype]
    except KeyError:
        raise TypeError(
            f"{op}: x has dtype {x.dtype}; supported: bfloat16, float16, float32"
        ) from None


def _check(op: str, name: str, t: Tensor, *, like: Tensor, shape, dtype=None) -> None:
    dtype = like.dtype if dtype is None else dtype
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, x on {like.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous())")


def _check_x(op: str, x: Tensor) -> Tuple[int, int]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    _dtype_name(op, x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous (call .contiguous())")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{op}: x is on {x.device}; only cuda and cpu tensors are supported")
    return x.shape[0], x.shape[1]


def _check_rank(op: str, a: Tensor, b: Tensor, k: int) -> Tuple[int, int]:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{op}: a must be [r, in_features] and b [out_features, r], "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    r, n = a.shape[0], b.shape[0]
    if r == 0:
        raise ValueError(f"{op}: rank 0 (a has no rows)")
    return r, n


def _check_dropout(op: str, p: float) -> None:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{op}: dropout p = {p} must be in [0, 1)")


def _args(op: str, x: Tensor, a: Tensor, b: Tensor, *, w=None, out_features=None, bias=None,
          m=None, h=None, norm=None, z=None, dy=None, p: float = 0.0) -> Tuple[int, int, int, int]:
    """The checks every LoRA-family op makes, in one place: x [T, K], a [r, K], b [N, r],
    and those of w [N, K], bias and m [N], h [T, r], norm (float32 [N]), z and dy [T, N]
    that are given; N equal to ``out_features`` when given (an NF4 base's); dropout p.
    Returns (T, K, N, r)."""
    t, k = _check_x(op, x)
    r, n = _check_rank(op, a, b, k)
    if out_features is not None and n != out_features:
        raise ValueError(f"{op}: b has {n} rows, out_features is {out_features}")
    for name, tensor, shape in (("w", w, (n, k)), ("a", a, (r, k)), ("b", b, (n, r)), ("m", m, (n,)),
                                ("bias", bias, (n,)), ("h", h, (t, r)), ("z", z, (t, n)),
                                ("dy", dy, (t, n))):
        if tensor is not None:
            _check(op, name, tensor, like=x, shape=shape)
    if norm is not None:
        _check(op, "norm", norm, like=x, shape=(n,), dtype=torch.float32)
    _check_dropout(op, p)
    return t, k, n, r


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _cuda_stream(device) -> Tuple[int, int]:
    """(ordinal, raw handle of torch's current stream there) of a CUDA device (None: the
    current one)."""
    if device is None or (isinstance(device, torch.device) and device.index is None):
        idx = torch.cuda.current_device()
    else:
        idx = torch.device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
    if _raw_stream is not None:
        return idx, _raw_stream(idx)
    return idx, torch.cuda.current_stream(idx).cuda_stream


def _where(x: Tensor) -> Tuple[int, int]:
    """(device ordinal or -1 for the CPU, raw handle of torch's current stream there)."""
    if x.device.type == "cuda":
        return _cuda_stream(x.device)
    return -1, 0


def _buf(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t.numel())


def _seed(seed: int) -> int:
    return seed & ((1 << 64) - 1)


class _Nf4:
    """bitsandbytes' NF4 tensors of one weight, checked: packed codes (uint8, any shape,
    (N·K+1)//2 bytes; other storage dtypes are viewed as bytes), absmax (float32, or
    uint8 codes under double quantization with absmax2 float32 and code2 float32[256])."""

    def __init__(self, op, x, n, k, blocksize, packed, absmax, absmax2, code2):
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        numel = n * k
        blocks = -(-numel // blocksize) if blocksize > 0 else 0
        _check(op, "packed", packed, like=x, shape=packed.shape, dtype=torch.uint8)
        if packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"{op}: packed has {packed.numel()} bytes, a {n}x{k} NF4 weight has {(numel + 1) // 2}"
            )
        nested = absmax2 is not None or code2 is not None
        if nested:
            if absmax2 is None or code2 is None:
                raise ValueError(f"{op}: absmax2 and code2 come together (double quantization)")
            _check(op, "absmax", absmax, like=x, shape=(blocks,), dtype=torch.uint8)
            _check(op, "absmax2", absmax2, like=x, shape=absmax2.shape, dtype=torch.float32)
            _check(op, "code2", code2, like=x, shape=(256,), dtype=torch.float32)
        else:
            _check(op, "absmax", absmax, like=x, shape=(blocks,), dtype=torch.float32)
        self.packed, self.absmax, self.absmax2, self.code2 = packed, absmax, absmax2, code2
        self.blocksize = blocksize

    def args(self, offset: float):
        return (
            self.blocksize,
            _buf(self.packed),
            _buf(self.absmax),
            _buf(self.absmax2),
            _buf(self.code2),
            float(offset),
        )


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def _lora_forward_impl(
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor]:
    """``y = x wᵀ + bias + scale · drop(x) aᵀ bᵀ`` and ``h = drop(x) aᵀ`` (saved for the
    backward). x [T, K], w [N, K], a [r, K], b [N, r], bias [N] or None."""
    op = "lora_forward"
    t, k, n, r = _args(op, x, a, b, w=w, bias=bias, p=p)
    y = x.new_empty((t, n))
    h = x.new_empty((t, r))
    if t > 0:
        dev, stream = _where(x)
        _note(op, _lib.lora_forward(
            dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
            _buf(x), _buf(w), _buf(a), _buf(b), _buf(bias), _buf(y), _buf(h),
        ))
    return y, h


lora_forward = torch.library.custom_op("lora_kernels::lora_forward", mutates_args=())(_lora_forward_impl)


@lora_forward.register_fake
def _(x, w, a, b, bias, scale, p, seed):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], a.shape[0]))


def _lora_backward_impl(
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    dy: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, da, db) of :func:`lora_forward` from ``dy`` [T, N]; ``h`` and ``seed`` as the
    forward used them."""
    op = "lora_backward"
    t, k, n, r = _args(op, x, a, b, w=w, h=h, dy=dy, p=p)
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros_like(a), torch.zeros_like(b)
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    dev, stream = _where(x)
    _note(op, _lib.lora_backward(
        dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
        _buf(x), _buf(w), _buf(a), _buf(b), _buf(h), _buf(dy), _buf(dx), _buf(da), _buf(db),
    ))
    return dx, da, db


lora_backward = torch.library.custom_op("lora_kernels::lora_backward", mutates_args=())(_lora_backward_impl)


@lora_backward.register_fake
def _(x, w, a, b, h, dy, scale, p, seed):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)


def _no_base_grad(ctx, op: str) -> None:
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            f"{op}: the base weight w requires grad; the LoRA ops treat it as frozen "
            "(set w.requires_grad_(False))"
        )


def _bias_grad(ctx, dy: Tensor, idx: int):
    return dy.sum(0) if ctx.needs_input_grad[idx] else None


def _lora_setup(ctx, inputs, output):
    x, w, a, b, bias, scale, p, seed = inputs
    ctx.save_for_backward(x, w, a, b, output[1])
    ctx.args = (scale, p, seed)


def _lora_bwd(ctx, dy, _dh):
    _no_base_grad(ctx, "lora_forward")
    x, w, a, b, h = ctx.saved_tensors
    dx, da, db = torch.ops.lora_kernels.lora_backward(x, w, a, b, h, dy.contiguous(), *ctx.args)
    return dx, None, da, db, _bias_grad(ctx, dy, 4), None, None, None


torch.library.register_autograd("lora_kernels::lora_forward", _lora_bwd, setup_context=_lora_setup)


def _lora_merge_impl(w: Tensor, a: Tensor, b: Tensor, scale: float, unmerge: bool) -> None:
    """In place: ``w += scale · b a`` (``unmerge``: ``-=``), in w's dtype."""
    op = "lora_merge"
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [out_features, in_features]")
    _dtype_name(op, w)
    n, k = w.shape
    r = a.shape[0] if a.dim() == 2 else -1
    _check(op, "w", w, like=w, shape=(n, k))
    _check(op, "a", a, like=w, shape=(r, k))
    _check(op, "b", b, like=w, shape=(n, r))
    dev, stream = _where(w)
    _lib.lora_merge(dev, stream, _dtype_name(op, w), k, n, r, scale, unmerge, _buf(w), _buf(a), _buf(b))


lora_merge = torch.library.custom_op("lora_kernels::lora_merge", mutates_args=("w",))(_lora_merge_impl)


@lora_merge.register_fake
def _(w, a, b, scale, unmerge):
    return None


def _dora_merge_impl(w: Tensor, a: Tensor, b: Tensor, m: Tensor, norm: Tensor, scale: float, unmerge: bool) -> None:
    """In place, DoRA's merge: ``w ← m/‖w + scale·b a‖ ⊙ (w + scale·b a)`` (row norms),
    writing the float32 norms [N] into ``norm``; ``unmerge`` takes them back:
    ``w ← w ⊙ norm/m − scale·b a``."""
    op = "dora_merge"
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [out_features, in_features]")
    _dtype_name(op, w)
    n, k = w.shape
    r = a.shape[0] if a.dim() == 2 else -1
    _check(op, "w", w, like=w, shape=(n, k))
    _check(op, "a", a, like=w, shape=(r, k))
    _check(op, "b", b, like=w, shape=(n, r))
    _check(op, "m", m, like=w, shape=(n,))
    _check(op, "norm", norm, like=w, shape=(n,), dtype=torch.float32)
    dev, stream = _where(w)
    _lib.dora_merge(dev, stream, _dtype_name(op, w), k, n, r, scale, unmerge,
                    _buf(w), _buf(a), _buf(b), _buf(m), _buf(norm))


dora_merge = torch.library.custom_op("lora_kernels::dora_merge", mutates_args=("w", "norm"))(_dora_merge_impl)


@dora_merge.register_fake
def _(w, a, b, m, norm, scale, unmerge):
    return None


# --------------------------------------------------------------------------------------
# QLoRA: an NF4 base in bitsandbytes' layout
# --------------------------------------------------------------------------------------


def _qlora_forward_impl(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    nf4_offset: float,
    blocksize: int,
    out_features: int,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor]:
    """:func:`lora_forward` with ``w`` = the NF4 weight [out_features, K] given by
    bitsandbytes' tensors: ``packed`` (``Params4bit`` data), ``absmax``, and under double
    quantization ``absmax2`` = ``quant_state.state2.absmax``, ``code2`` =
    ``quant_state.state2.code`` and ``nf4_offset`` = ``quant_state.offset``."""
    op = "qlora_forward"
    t, k, n, r = _args(op, x, a, b, out_features=out_features, bias=bias, p=p)
    nf = _Nf4(op, x, n, k, blocksize, packed, absmax, absmax2, code2)
    y = x.new_empty((t, n))
    h = x.new_empty((t, r))
    if t > 0:
        dev, stream = _where(x)
        (bs, pk, am, a2, c2, off) = nf.args(nf4_offset)
        _note(op, _lib.qlora_forward(
            dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
            _buf(x), bs, pk, am, a2, c2, off, _buf(a), _buf(b), _buf(bias), _buf(y), _buf(h),
        ))
    return y, h


qlora_forward = torch.library.custom_op("lora_kernels::qlora_forward", mutates_args=())(_qlora_forward_impl)


@qlora_forward.register_fake
def _(x, packed, absmax, absmax2, code2, nf4_offset, blocksize, out_features, a, b, bias, scale, p, seed):
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], a.shape[0]))


def _qlora_backward_impl(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    nf4_offset: float,
    blocksize: int,
    out_features: int,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    dy: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, da, db) of :func:`qlora_forward` (dx through the dequantized W)."""
    op = "qlora_backward"
    t, k, n, r = _args(op, x, a, b, out_features=out_features, h=h, dy=dy, p=p)
    nf = _Nf4(op, x, n, k, blocksize, packed, absmax, absmax2, code2)
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros_like(a), torch.zeros_like(b)
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    dev, stream = _where(x)
    (bs, pk, am, a2, c2, off) = nf.args(nf4_offset)
    _note(op, _lib.qlora_backward(
        dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
        _buf(x), bs, pk, am, a2, c2, off, _buf(a), _buf(b), _buf(h), _buf(dy),
        _buf(dx), _buf(da), _buf(db),
    ))
    return dx, da, db


qlora_backward = torch.library.custom_op("lora_kernels::qlora_backward", mutates_args=())(_qlora_backward_impl)


@qlora_backward.register_fake
def _(x, packed, absmax, absmax2, code2, nf4_offset, blocksize, out_features, a, b, h, dy, scale, p, seed):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)


def _qlora_setup(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, nf4_offset, blocksize, n, a, b, bias, scale, p, seed) = inputs
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, a, b, output[1])
    ctx.args = (nf4_offset, blocksize, n, scale, p, seed)


def _qlora_bwd(ctx, dy, _dh):
    if any(ctx.needs_input_grad[1:5]):
        raise RuntimeError("qlora_forward: the NF4 base tensors are frozen and get no gradient")
    x, packed, absmax, absmax2, code2, a, b, h = ctx.saved_tensors
    nf4_offset, blocksize, n, scale, p, seed = ctx.args
    dx, da, db = torch.ops.lora_kernels.qlora_backward(
        x, packed, absmax, absmax2, code2, nf4_offset, blocksize, n, a, b, h, dy.contiguous(),
        scale, p, seed,
    )
    return (dx, None, None, None, None, None, None, None, da, db, _bias_grad(ctx, dy, 10),
            None, None, None)


torch.library.register_autograd("lora_kernels::qlora_forward", _qlora_bwd, setup_context=_qlora_setup)


# --------------------------------------------------------------------------------------
# DoRA and QDoRA
# --------------------------------------------------------------------------------------


def _dora_outputs(x, n, r):
    t = x.shape[0]
    return (
        x.new_empty((t, n)),
        x.new_empty((t, r)),
        torch.empty((n,), dtype=torch.float32, device=x.device),
        x.new_empty((t, n)),
    )


def _dora_forward_impl(
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    m: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """DoRA (peft's): ``y = m/‖w + s·b a‖_row ⊙ (x wᵀ + s·drop(x) aᵀ bᵀ) + bias`` with the
    norm detached, as peft does. Returns (y, h, norm (float32 [N]), z), the last three
    saved for the backward."""
    op = "dora_forward"
    t, k, n, r = _args(op, x, a, b, w=w, m=m, bias=bias, p=p)
    y, h, norm, z = _dora_outputs(x, n, r)
    if t > 0:
        dev, stream = _where(x)
        _note(op, _lib.dora_forward(
            dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
            _buf(x), _buf(w), None, _buf(a), _buf(b), _buf(bias), _buf(m),
            _buf(y), _buf(h), _buf(norm), _buf(z),
        ))
    return y, h, norm, z


dora_forward = torch.library.custom_op("lora_kernels::dora_forward", mutates_args=())(_dora_forward_impl)


@dora_forward.register_fake
def _(x, w, a, b, bias, m, scale, p, seed):
    return _dora_outputs(x, w.shape[0], a.shape[0])


def _dora_backward_impl(
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    m: Tensor,
    h: Tensor,
    norm: Tensor,
    z: Tensor,
    dy: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, db, dm) of :func:`dora_forward` from what it saved."""
    op = "dora_backward"
    t, k, n, r = _args(op, x, a, b, w=w, m=m, h=h, norm=norm, z=z, dy=dy, p=p)
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(m)
    da, db, dm = torch.empty_like(a), torch.empty_like(b), torch.empty_like(m)
    dev, stream = _where(x)
    _note(op, _lib.dora_backward(
        dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
        _buf(x), _buf(w), None, _buf(a), _buf(b), _buf(m), _buf(h), _buf(norm), _buf(z),
        _buf(dy), _buf(dx), _buf(da), _buf(db), _buf(dm),
    ))
    return dx, da, db, dm


dora_backward = torch.library.custom_op("lora_kernels::dora_backward", mutates_args=())(_dora_backward_impl)


@dora_backward.register_fake
def _(x, w, a, b, m, h, norm, z, dy, scale, p, seed):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(m)


def _dora_setup(ctx, inputs, output):
    x, w, a, b, bias, m, scale, p, seed = inputs
    _y, h, norm, z = output
    ctx.save_for_backward(x, w, a, b, m, h, norm, z)
    ctx.args = (scale, p, seed)


def _dora_bwd(ctx, dy, _dh, _dnorm, _dz):
    _no_base_grad(ctx, "dora_forward")
    x, w, a, b, m, h, norm, z = ctx.saved_tensors
    dx, da, db, dm = torch.ops.lora_kernels.dora_backward(
        x, w, a, b, m, h, norm, z, dy.contiguous(), *ctx.args
    )
    return dx, None, da, db, _bias_grad(ctx, dy, 4), dm, None, None, None


torch.library.register_autograd("lora_kernels::dora_forward", _dora_bwd, setup_context=_dora_setup)


def _qdora_forward_impl(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    nf4_offset: float,
    blocksize: int,
    out_features: int,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    m: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dora_forward` over an NF4 base (as :func:`qlora_forward` takes it)."""
    op = "qdora_forward"
    t, k, n, r = _args(op, x, a, b, out_features=out_features, m=m, bias=bias, p=p)
    nf = _Nf4(op, x, n, k, blocksize, packed, absmax, absmax2, code2)
    y, h, norm, z = _dora_outputs(x, n, r)
    if t > 0:
        dev, stream = _where(x)
        _note(op, _lib.dora_forward(
            dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
            _buf(x), None, nf.args(nf4_offset), _buf(a), _buf(b), _buf(bias), _buf(m),
            _buf(y), _buf(h), _buf(norm), _buf(z),
        ))
    return y, h, norm, z


qdora_forward = torch.library.custom_op("lora_kernels::qdora_forward", mutates_args=())(_qdora_forward_impl)


@qdora_forward.register_fake
def _(x, packed, absmax, absmax2, code2, nf4_offset, blocksize, out_features, a, b, bias, m, scale, p, seed):
    return _dora_outputs(x, out_features, a.shape[0])


def _qdora_backward_impl(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    nf4_offset: float,
    blocksize: int,
    out_features: int,
    a: Tensor,
    b: Tensor,
    m: Tensor,
    h: Tensor,
    norm: Tensor,
    z: Tensor,
    dy: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, db, dm) of :func:`qdora_forward`."""
    op = "qdora_backward"
    t, k, n, r = _args(op, x, a, b, out_features=out_features, m=m, h=h, norm=norm, z=z, dy=dy, p=p)
    nf = _Nf4(op, x, n, k, blocksize, packed, absmax, absmax2, code2)
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(m)
    da, db, dm = torch.empty_like(a), torch.empty_like(b), torch.empty_like(m)
    dev, stream = _where(x)
    _note(op, _lib.dora_backward(
        dev, stream, _dtype_name(op, x), t, k, n, r, scale, p, _seed(seed), 0,
        _buf(x), None, nf.args(nf4_offset), _buf(a), _buf(b), _buf(m), _buf(h), _buf(norm),
        _buf(z), _buf(dy), _buf(dx), _buf(da), _buf(db), _buf(dm),
    ))
    return dx, da, db, dm


qdora_backward = torch.library.custom_op("lora_kernels::qdora_backward", mutates_args=())(_qdora_backward_impl)


@qdora_backward.register_fake
def _(x, packed, absmax, absmax2, code2, nf4_offset, blocksize, out_features, a, b, m, h, norm, z, dy, scale, p, seed):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(m)


def _qdora_setup(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, nf4_offset, blocksize, n, a, b, bias, m, scale, p, seed) = inputs
    _y, h, norm, z = output
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, a, b, m, h, norm, z)
    ctx.args = (nf4_offset, blocksize, n, scale, p, seed)


def _qdora_bwd(ctx, dy, _dh, _dnorm, _dz):
    if any(ctx.needs_input_grad[1:5]):
        raise RuntimeError("qdora_forward: the NF4 base tensors are frozen and get no gradient")
    x, packed, absmax, absmax2, code2, a, b, m, h, norm, z = ctx.saved_tensors
    nf4_offset, blocksize, n, scale, p, seed = ctx.args
    dx, da, db, dm = torch.ops.lora_kernels.qdora_backward(
        x, packed, absmax, absmax2, code2, nf4_offset, blocksize, n, a, b, m, h, norm, z,
        dy.contiguous(), scale, p, seed,
    )
    return (dx, None, None, None, None, None, None, None, da, db, _bias_grad(ctx, dy, 10), dm,
            None, None, None)


torch.library.register_autograd("lora_kernels::qdora_forward", _qdora_bwd, setup_context=_qdora_setup)


# --------------------------------------------------------------------------------------
# NEFTune
# --------------------------------------------------------------------------------------

_ID_DTYPES = {torch.int64: "int64", torch.int32: "int32"}


def _neftune_embedding_impl(ids: Tensor, table: Tensor, alpha: float, seed: int) -> Tensor:
    """``table[ids]`` [B, S, D] for ids [B, S] (int64 or int32), plus NEFTune's noise
    ``uniform(-1, 1) · alpha / sqrt(S · D)`` when ``alpha`` > 0 (transformers' NEFTune
    hook's magnitude, the padded length), in one pass; the noise comes from the crate's
    Philox generator keyed by ``seed``. On the GPU an id outside ``0..V`` gives a zero
    row and is reported by :func:`take_index_errors`; on the CPU it is an error."""
    op = "neftune_embedding"
    if not isinstance(ids, Tensor) or ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{op}: ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.dim() != 2:
        raise ValueError(f"{op}: ids must be [batch, seq], got shape {tuple(ids.shape)}")
    if not isinstance(table, Tensor) or table.dim() != 2:
        raise ValueError(f"{op}: table must be a 2-D [vocab, dim] tensor")
    name = _dtype_name(op, table)
    _check(op, "table", table, like=table, shape=table.shape)
    _check(op, "ids", ids, like=table, shape=ids.shape, dtype=ids.dtype)
    if not (alpha >= 0.0) or alpha == float("inf"):
        raise ValueError(f"{op}: alpha = {alpha} must be finite and >= 0")
    (batch, seq), (vocab, dim) = ids.shape, table.shape
    out = table.new_empty((batch, seq, dim))
    if out.numel() > 0:
        dev, stream = _where(table)
        _lib.neftune_embed(
            dev, stream, name, _ID_DTYPES[ids.dtype], batch, seq, vocab, dim, alpha, _seed(seed), 0,
            _buf(table), _buf(ids), _buf(out),
        )
    return out


neftune_embedding = torch.library.custom_op("lora_kernels::neftune_embedding", mutates_args=())(
    _neftune_embedding_impl
)


@neftune_embedding.register_fake
def _(ids, table, alpha, seed):
    return table.new_empty((ids.shape[0], ids.shape[1], table.shape[1]))


def _embedding_table_grad(ids: Tensor, d_out: Tensor, vocab: int) -> Tensor:
    """The table's gradient [vocab, dim] in float32 from the output's gradient
    [B, S, dim], summed in position order (deterministic)."""
    (batch, seq), dim = ids.shape, d_out.shape[-1]
    d_out = d_out.contiguous()
    d_table = torch.zeros((vocab, dim), dtype=torch.float32, device=d_out.device)
    dev, stream = _where(d_out)
    _lib.neftune_embedding_backward(
        dev, stream, _DTYPES[d_out.dtype], _ID_DTYPES[ids.dtype], batch, seq, vocab, dim, None,
        _buf(ids), _buf(d_out), _buf(d_table),
    )
    return d_table


def _neftune_setup(ctx, inputs, output):
    ids, table, _alpha, _seed = inputs
    ctx.save_for_backward(ids)
    ctx.table_meta = (table.shape[0], table.dtype)


def _neftune_bwd(ctx, d_out):
    (ids,) = ctx.saved_tensors
    d_table = None
    if ctx.needs_input_grad[1]:
        vocab, dtype = ctx.table_meta
        d_table = _embedding_table_grad(ids, d_out.to(dtype), vocab).to(dtype)
    return None, d_table, None, None


torch.library.register_autograd(
    "lora_kernels::neftune_embedding", _neftune_bwd, setup_context=_neftune_setup
)


def take_index_errors(device=None) -> None:
    """Raises ``ValueError`` naming the first out-of-range id (and how many) that the
    NEFTune kernels met on ``device`` since the last call, and clears the record.
    Synchronizes torch's current stream: call it once per step, or while debugging."""
    _lib.take_index_errors(*_cuda_stream(device))


# --------------------------------------------------------------------------------------
# NF4 helpers (host) and the scratch pool
# --------------------------------------------------------------------------------------


def nf4_quantize(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Quantizes a CPU weight [N, K] to NF4 with the bytes bitsandbytes'
    ``quantize_4bit(quant_type="nf4", compress_statistics=double_quant)`` gives.
    Returns a dict of CPU tensors: ``packed`` (uint8), ``absmax`` (float32, or uint8
    codes), and under double quantization ``absmax2``, ``code2`` and ``offset`` (float)."""
    op = "nf4_quantize"
    if w.device.type != "cpu" or w.dim() != 2:
        raise ValueError(f"{op}: w must be a 2-D CPU tensor, got {tuple(w.shape)} on {w.device}")
    w = w.contiguous()
    n, k = w.shape
    packed, absmax, absmax2, code2, offset = _lib.nf4_quantize(
        _dtype_name(op, w), n, k, blocksize, double_quant, _buf(w)
    )

    def f32(bs):
        return torch.frombuffer(bytearray(bs), dtype=torch.float32).clone()

    out = {"packed": torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone()}
    if absmax2 is None:
        out.update(absmax=f32(absmax), absmax2=None, code2=None, offset=0.0)
    else:
        out.update(
            absmax=torch.frombuffer(bytearray(absmax), dtype=torch.uint8).clone(),
            absmax2=f32(absmax2),
            code2=f32(code2),
            offset=float(offset),
        )
    return out


def nf4_dequantize(q: dict, shape, blocksize: int = 64, dtype=torch.bfloat16) -> Tensor:
    """The dense CPU weight of an NF4 weight given as :func:`nf4_quantize` returns it."""
    n, k = shape
    out = torch.empty((n, k), dtype=dtype)
    name = _dtype_name("nf4_dequantize", out)
    _lib.nf4_dequantize(
        name, n, k, blocksize, _buf(q["packed"].contiguous()), _buf(q["absmax"].contiguous()),
        _buf(q.get("absmax2")), _buf(q.get("code2")), float(q.get("offset", 0.0)), _buf(out),
    )
    return out


def scratch_pool_usage(device=None, reset: bool = False) -> Tuple[int, int]:
    """(bytes in use, high-water mark) of the CUDA memory pool the ops' scratch comes
    from (the device's default pool, not torch's caching allocator); ``reset`` first
    sets the mark to the current use."""
    return _lib.pool_usage(*_cuda_stream(device), reset)
