"""``patch(model)``: peft's LoRA layers run on the fused ops.

:func:`patch` replaces the ``forward`` of every peft LoRA ``Linear`` (over ``nn.Linear``)
and LoRA ``Linear4bit`` (over bitsandbytes' NF4 ``Linear4bit``) in a model with one that
calls :mod:`lora_kernels.ops`: LoRA, rsLoRA (peft folds it into ``scaling``), DoRA,
QLoRA and QDoRA, with dropout. Nothing else changes: the parameters, their names and
``state_dict``, so the model saves and loads with peft exactly as before.

Each call checks that it is a configuration the ops cover; one that is not runs peft's
own forward, with a warning (once per reason) that says why. Covered:

- adapters enabled, not merged, exactly one active adapter, no ``adapter_names``
  (mixed batch) and no extra arguments;
- plain LoRA or DoRA (peft's ``use_dora``), ``lora_bias=False``, ``fan_in_fan_out=False``;
- dropout ``nn.Dropout`` or none (the mask comes from the crate's Philox generator, a
  seed drawn from torch's CPU generator each call, so ``torch.manual_seed`` makes runs
  repeatable);
- x in bfloat16, float16 or float32, the dense base weight in x's dtype, or an NF4 base
  (``quant_type="nf4"``, nested blocksize 256) whose compute dtype is x's dtype; under
  autocast only when x is already in the autocast dtype;
- x on a CUDA device (sm_80 or newer) or on the CPU (the crate's CPU oracle: exact but
  slow, for tests).

The LoRA weights (and DoRA's magnitude) are used in x's dtype: peft keeps them in
float32 by default (``autocast_adapter_dtype=True``); they are then cast to x's dtype in
the autograd graph (a copy of r·(K+N) values a call), and their gradients flow back to
the float32 parameters through that cast. The products accumulate in float32.

:func:`unpatch` puts peft's forwards back.
"""

from __future__ import annotations

import types
import warnings
from typing import Optional

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.lora_kernels)

_ORIG = "_lora_kernels_orig_forward"
_WARNED: set = set()
_SEED_MAX = (1 << 62) - 1


def _peft_classes():
    classes = []
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear

        classes.append(LoraLinear)
    except ImportError:  # pragma: no cover - peft is optional at import time
        pass
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        classes.append(LoraLinear4bit)
    except (ImportError, AttributeError):
        pass
    return tuple(classes)


def _fell_back(layer, reason: str) -> None:
    counts = layer.__dict__.setdefault("_lora_kernels_fallbacks", {})
    counts[reason] = counts.get(reason, 0) + 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"lora_kernels: falling back to peft's forward: {reason}", RuntimeWarning, stacklevel=3
        )


def _is_nf4_base(base) -> bool:
    w = getattr(base, "weight", None)
    return getattr(w, "quant_state", None) is not None or type(w).__name__ == "Params4bit"


def _variant(layer, adapter) -> Optional[str]:
    """'lora', 'dora', or None for another variant."""
    variants = layer.__dict__.get("lora_variant")
    if variants is not None:
        v = variants.get(adapter)
        if v is None:
            return "lora"
        return "dora" if "Dora" in type(v).__name__ else None
    return "dora" if getattr(layer, "use_dora", {}).get(adapter, False) else "lora"


_DTYPES = tuple(ops._DTYPES)  # the dtypes the ops take


def _prepare(layer, x, args, kwargs):
    """Why the fused forward cannot take this call (a str), or what it needs:
    (adapter, lora_A, lora_B, dropout module, base layer, NF4 base?, DoRA?). One pass
    over the layer's state, reading submodules from ``_modules`` (nn.Module's
    ``__getattr__`` is slow, and this runs on every call of every layer)."""
    if args or kwargs:
        names = sorted(kwargs) if kwargs else ["positional arguments"]
        return f"extra forward arguments ({', '.join(names)})"
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "the adapter is merged"
    mods = layer._modules
    lora_a = mods["lora_A"]
    active = [a for a in layer.active_adapters if a in lora_a]
    if len(active) != 1:
        return f"{len(active)} active adapters (the ops take exactly one)"
    adapter = active[0]
    d = layer.__dict__
    if d.get("fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    if d.get("lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    variant = _variant(layer, adapter)
    if variant is None:
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    drop = mods["lora_dropout"][adapter]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(drop).__name__}"
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        return f"input dtype {getattr(x, 'dtype', type(x).__name__)}"
    dev = x.device
    if dev.type not in ("cuda", "cpu"):
        return f"input on {dev}"
    if x.shape[-1] != d.get("in_features", x.shape[-1]):
        return f"input has {x.shape[-1]} features, the layer {d['in_features']}"
    if torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) != x.dtype:
        return "autocast to another dtype than the input's"
    base = mods["base_layer"]
    while "base_layer" in base._modules:  # peft's get_base_layer, without __getattr__
        base = base._modules["base_layer"]
    weight = base._parameters.get("weight")
    if weight is None:
        return f"base layer {type(base).__name__} without a weight parameter"
    nf4 = _is_nf4_base(base)
    if nf4:
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            return "NF4 weight without a quant_state"
        if qs.quant_type != "nf4":
            return f"4-bit quant_type {qs.quant_type!r} (only nf4)"
        if qs.nested and qs.state2.blocksize != 256:
            return f"nested blocksize {qs.state2.blocksize} (only 256)"
        cd = base.__dict__.get("compute_dtype")
        if cd is not None and cd != x.dtype:
            return f"compute_dtype {cd} differs from the input's {x.dtype}"
    elif isinstance(base, nn.Linear):
        if weight.dtype != x.dtype:
            return f"base weight dtype {weight.dtype} differs from the input's {x.dtype}"
        if weight.requires_grad:
            return "the base weight requires grad"
    else:
        return f"base layer {type(base).__name__}"
    if weight.device != dev:
        return "the weight is on another device than the input"
    return adapter, lora_a[adapter], mods["lora_B"][adapter], drop, base, nf4, variant == "dora"


def _nf4_args(layer, base):
    """bitsandbytes' tensors of the NF4 weight, as the ops take them (cached offset)."""
    w = base._parameters["weight"]
    qs = w.quant_state
    cache = layer.__dict__.get("_lora_kernels_nf4")
    if cache is None or cache[0] is not qs:
        # One host read of the offset (a 0-d tensor) per quant_state, not per step.
        offset = float(qs.offset) if qs.nested else 0.0
        cache = (qs, offset)
        layer._lora_kernels_nf4 = cache
    offset = cache[1]
    packed = w.data if w.data.dtype == torch.uint8 else w.data.view(torch.uint8)
    n = qs.shape[0]
    if qs.nested:
        return (packed, qs.absmax, qs.state2.absmax, qs.state2.code, offset, qs.blocksize, n)
    return (packed, qs.absmax, None, None, 0.0, qs.blocksize, n)


class _Lora(torch.autograd.Function):
    """The eager path of a patched layer: the ops' implementations called directly
    (no dispatcher round trip), the adapters cast to x's dtype inside (their gradients
    cast back to the parameters' dtypes), one autograd node a layer."""

    @staticmethod
    def forward(ctx, x, w, a, b, bias, m, nf4, scale, p, seed):
        dt = x.dtype
        ac, bc = a.to(dt), b.to(dt)
        mc = m.to(dt) if m is not None else None
        if nf4 is None:
            if mc is None:
                y, h = ops._lora_forward_impl(x, w, ac, bc, bias, scale, p, seed)
                saved = (h,)
            else:
                y, h, norm, z = ops._dora_forward_impl(x, w, ac, bc, bias, mc, scale, p, seed)
                saved = (h, norm, z)
        else:
            if mc is None:
                y, h = ops._qlora_forward_impl(x, *nf4, ac, bc, bias, scale, p, seed)
                saved = (h,)
            else:
                y, h, norm, z = ops._qdora_forward_impl(x, *nf4, ac, bc, bias, mc, scale, p, seed)
                saved = (h, norm, z)
        ctx.save_for_backward(x, w, ac, bc, mc, *saved)
        ctx.nf4 = nf4
        ctx.args = (scale, p, seed)
        ctx.dtypes = (a.dtype, b.dtype, m.dtype if m is not None else None)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, m, *saved = ctx.saved_tensors
        dy = dy.contiguous()
        nf4 = ctx.nf4
        dm = None
        if m is None:
            (h,) = saved
            if nf4 is None:
                dx, da, db = ops._lora_backward_impl(x, w, a, b, h, dy, *ctx.args)
            else:
                dx, da, db = ops._qlora_backward_impl(x, *nf4, a, b, h, dy, *ctx.args)
        else:
            h, norm, z = saved
            if nf4 is None:
                dx, da, db, dm = ops._dora_backward_impl(x, w, a, b, m, h, norm, z, dy, *ctx.args)
            else:
                dx, da, db, dm = ops._qdora_backward_impl(x, *nf4, a, b, m, h, norm, z, dy, *ctx.args)
            dm = dm.to(ctx.dtypes[2])
        dbias = dy.sum(0) if ctx.bias_grad else None
        return (dx, None, da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dbias, dm,
                None, None, None, None)


def _fused_forward(self, x, *args, **kwargs):
    prep = _prepare(self, x, args, kwargs)
    if isinstance(prep, str):
        _fell_back(self, prep)
        return getattr(self, _ORIG)(x, *args, **kwargs)
    adapter, lora_a, lora_b, drop, base, is_nf4, dora = prep
    dt = x.dtype
    a = lora_a._parameters["weight"]
    b = lora_b._parameters["weight"]
    scale = float(self.scaling[adapter])
    p = float(drop.p) if (self.training and isinstance(drop, nn.Dropout)) else 0.0
    seed = int(torch.randint(0, _SEED_MAX, ())) if p > 0.0 else 0
    bias = base._parameters.get("bias")
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = self._modules["lora_magnitude_vector"][adapter]._parameters["weight"] if dora else None
    if is_nf4:
        nf4, w = _nf4_args(self, base), None
    else:
        nf4, w = None, base._parameters["weight"]
    if torch.compiler.is_compiling():
        # Under torch.compile: the registered custom ops (fake kernels, autograd).
        y = _traced(x2, w, a.to(dt), b.to(dt), bias, None if m is None else m.to(dt), nf4, scale, p, seed)
    else:
        y = _Lora.apply(x2, w, a, b, bias, m, nf4, scale, p, seed)
    return y.view(*lead, y.shape[-1])


def _traced(x, w, a, b, bias, m, nf4, scale, p, seed):
    L = torch.ops.lora_kernels
    if nf4 is None:
        if m is None:
            return L.lora_forward(x, w, a, b, bias, scale, p, seed)[0]
        return L.dora_forward(x, w, a, b, bias, m, scale, p, seed)[0]
    if m is None:
        return L.qlora_forward(x, *nf4, a, b, bias, scale, p, seed)[0]
    return L.qdora_forward(x, *nf4, a, b, bias, m, scale, p, seed)[0]


_NEFT = "_lora_kernels_neftune_alpha"


def _neftune_forward(self, ids, *args, **kwargs):
    """nn.Embedding's forward with NEFTune's noise in training, one pass."""
    orig = getattr(self, _ORIG)
    alpha = getattr(self, _NEFT)
    reason = None
    if args or kwargs:
        reason = "embedding called with extra arguments"
    elif not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        reason = "embedding ids are not a 2-D int64/int32 tensor"
    elif self.weight.dtype not in _DTYPES or self.weight.device.type not in ("cuda", "cpu"):
        reason = f"embedding table of dtype {self.weight.dtype} on {self.weight.device}"
    elif self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
        reason = "embedding with max_norm, scale_grad_by_freq or sparse"
    elif self.weight.requires_grad and self.padding_idx is not None:
        reason = "trainable embedding with a padding_idx"
    elif ids.device != self.weight.device:
        reason = "ids on another device than the table"
    if reason is not None:
        _fell_back(self, reason)
        out = orig(ids, *args, **kwargs)
        if self.training and alpha > 0:
            # transformers' NEFTune hook, so that the fallback still adds the noise.
            mag = alpha / float(out.size(1) * out.size(2)) ** 0.5
            out = out + torch.zeros_like(out).uniform_(-mag, mag)
        return out
    if not self.training or alpha == 0:
        return orig(ids)
    seed = int(torch.randint(0, _SEED_MAX, ()))
    ids = ids if ids.is_contiguous() else ids.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.lora_kernels.neftune_embedding(ids, self.weight, float(alpha), seed)
    return _Neftune.apply(ids, self.weight, float(alpha), seed)


class _Neftune(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, table, alpha, seed):
        ctx.save_for_backward(ids)
        ctx.vocab = table.shape[0]
        ctx.dtype = table.dtype
        return ops._neftune_embedding_impl(ids, table, alpha, seed)

    @staticmethod
    def backward(ctx, d_out):
        (ids,) = ctx.saved_tensors
        d_table = None
        if ctx.needs_input_grad[1]:
            d_table = ops._embedding_table_grad(ids, d_out.to(ctx.dtype), ctx.vocab).to(ctx.dtype)
        return None, d_table, None, None


def patch(model: nn.Module, neftune_alpha: Optional[float] = None) -> int:
    """Routes the forward of every peft LoRA ``Linear`` / ``Linear4bit`` in ``model``
    through the fused ops. Returns how many layers were patched (already patched layers
    are left as they are). Undo with :func:`unpatch`.

    ``neftune_alpha``: also replace the input embedding's forward
    (``model.get_input_embeddings()``, an ``nn.Embedding``) by one fused pass that adds
    NEFTune's noise in training (transformers' ``neftune_noise_alpha``: uniform noise of
    magnitude ``alpha / sqrt(seq · dim)``; the same distribution, not the same draws);
    in eval mode the embedding is unchanged. Counted in the returned number."""
    classes = _peft_classes()
    if not classes:
        raise ImportError("lora_kernels.patch needs peft (pip install peft)")
    if neftune_alpha is not None and not (0.0 <= float(neftune_alpha) < float("inf")):
        raise ValueError(f"neftune_alpha = {neftune_alpha} must be finite and >= 0")
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not hasattr(module, _ORIG):
            # The forward peft (or a hook that wrapped it) would have called.
            setattr(module, _ORIG, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            module.__dict__.pop("_lora_kernels_fallbacks", None)
            count += 1
    if neftune_alpha is not None:
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"neftune_alpha: the input embedding is a {type(emb).__name__}, not nn.Embedding")
        if not hasattr(emb, _ORIG):
            setattr(emb, _ORIG, emb.forward)
            emb.forward = types.MethodType(_neftune_forward, emb)
            count += 1
        setattr(emb, _NEFT, float(neftune_alpha))
    return count


def unpatch(model: nn.Module) -> int:
    """Puts back the forwards :func:`patch` replaced. Returns how many were restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIG):
            orig = getattr(module, _ORIG)
            delattr(module, _ORIG)
            if getattr(orig, "__self__", None) is module and orig.__func__ is type(module).forward:
                # It was the class's own forward: drop the instance attribute.
                del module.forward
            else:
                module.forward = orig
            module.__dict__.pop("_lora_kernels_nf4", None)
            module.__dict__.pop(_NEFT, None)
            module.__dict__.pop("_lora_kernels_fallbacks", None)
            count += 1
    return count


def fallbacks(model: nn.Module) -> dict:
    """How many calls of the patched layers in ``model`` ran peft's own forward since
    :func:`patch`, by reason (empty: every call took the fused ops)."""
    total: dict = {}
    for module in model.modules():
        for reason, n in module.__dict__.get("_lora_kernels_fallbacks", {}).items():
            total[reason] = total.get(reason, 0) + n
    return total


def reset_warnings() -> None:
    """Warn again for reasons already warned about (each reason warns once a process)."""
    _WARNED.clear()


def is_patched(module: nn.Module) -> bool:
    """Whether :func:`patch` replaced this module's forward."""
    return hasattr(module, _ORIG)
