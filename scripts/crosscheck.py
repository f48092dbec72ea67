#!/usr/bin/env python3
"""Cross-checks lora-kernels against peft (and bitsandbytes, where installed).

    cargo run --release --example crosscheck -- --out DIR   # the crate's side
    python3 scripts/crosscheck.py DIR                        # this script
    python3 scripts/crosscheck.py --parse-only DIR           # no torch: read the files only

For every `DIR/*.safetensors` written by `examples/crosscheck.rs` it builds the same
layer in torch (on CUDA if available, else the CPU): an `nn.Linear(K, N, bias)` holding
W and the bias (QLoRA: a `bitsandbytes.nn.Linear4bit` holding the crate's NF4 bytes,
so bitsandbytes' own dequantization runs), wrapped by peft's
`get_peft_model(LoraConfig(r, lora_alpha, target_modules=["proj"], lora_dropout=0,
use_dora, use_rslora), autocast_adapter_dtype=False)`, with lora_A, lora_B and the DoRA
magnitude set from the file, everything in the file's dtype (f32 or bf16). It runs
peft's forward and backward with the file's dy and compares y, dx, dA, dB (and dm for
DoRA) with the crate's, plus the crate's DoRA row norms (against the exact f64 norms of
W + s·BA) and, for QLoRA, the crate's dequantized weight (against bitsandbytes'
`dequantize_4bit`, which must be equal element for element).

Without bitsandbytes (or without CUDA), the NF4 weight is dequantized here in torch from
the same bytes (NF4 code table, high nibble first, one absmax per 64 elements of the
flat [N, K] array, double quantization absmax = nested_quant_map[q] ·
nested_absmax[block // 256] + offset) and peft wraps a plain nn.Linear holding it; the
script says so loudly.

Tolerance, per element (float64 arithmetic on the file's values):

    |crate − peft| ≤ (C · eps + 2 · k · 2⁻²⁴) · mag

- eps: the dtype's machine epsilon (2⁻²³ f32, 2⁻⁷ bf16). Both sides round their
  outputs and some intermediates to the dtype; each rounding moves a quantity bounded
  by mag by at most eps/2 · mag. C counts those roundings on both sides, worst case:
  C = 8 for LoRA/QLoRA (peft rounds the base product, h, h Bᵀ, the scaled term and the
  sum: 5 · eps/2; the crate at most 3 · eps, its own test bound), C = 16 for DoRA (peft
  also rounds B·A, s·BA, W + s·BA, the norm, m/norm, g − 1, result − bias and three more
  products).
- k · 2⁻²⁴: f32 accumulation over a chain of reductions of total length k, once per
  side (k = K + r for y, N + r for dx, N + T for dA, K + T for dB, K + r + T for dm).
  peft runs with TF32 and reduced-precision bf16 reductions turned off, so torch
  accumulates matmuls in f32 like the crate.
- mag: the same computation on absolute values (|x| |W|ᵀ + |b| + |s| (|x| |A|ᵀ) |B|ᵀ for
  y, etc.). For DoRA the scale g = m / ‖W + s·BA‖ enters as |m| · ‖|W| + |s||B||A|‖ /
  ‖W + s·BA‖², which also bounds the rounding error of a norm computed in the dtype.

The crate's DoRA norms (f32) are checked against the f64 norm with the bound of the
crate's own GPU tests: 4 · 2⁻²³ · norm + (K + r) · 2⁻²⁴ · ‖|W| + |s||B||A|‖.

Exit status: 0 if every comparison passes, 1 if any fails or DIR holds no cases, 2 on
bad usage.
"""

import glob
import json
import math
import os
import struct
import sys

# safetensors dtype -> bytes per element
ELEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
C_LORA, C_DORA = 8, 16
NF4_PREFIX = "base."


# ---- reading the files (pure python) --------------------------------------------------


def read_safetensors(path):
    """(meta dict, {name: (dtype, shape, bytes)}) of one safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    info = header.pop("__metadata__", None) or {}
    if "meta" not in info:
        raise ValueError(f"{path}: no `meta` metadata (not written by the crosscheck example?)")
    meta = json.loads(info["meta"])
    base = 8 + n
    tensors = {}
    for name, t in header.items():
        dtype, shape = t["dtype"], tuple(t["shape"])
        begin, end = t["data_offsets"]
        if dtype not in ELEM_SIZE:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        numel = math.prod(shape)
        if end - begin != numel * ELEM_SIZE[dtype] or base + end > len(data):
            raise ValueError(f"{path}: tensor {name}: {end - begin} bytes for {dtype} {list(shape)}")
        tensors[name] = (dtype, shape, data[base + begin : base + end])
    return meta, tensors


def expected_tensors(meta):
    """The tensor names (and shapes) a case must hold."""
    T, K, N, r = meta["T"], meta["K"], meta["N"], meta["r"]
    want = {
        "x": (T, K),
        "A": (r, K),
        "B": (N, r),
        "dy": (T, N),
        "y": (T, N),
        "dx": (T, K),
        "dA": (r, K),
        "dB": (N, r),
    }
    if meta["bias"]:
        want["bias"] = (N,)
    if meta["qlora"]:
        want["W_deq"] = (N, K)
        want[NF4_PREFIX + "weight"] = ((N * K + 1) // 2, 1)
        want[NF4_PREFIX + "weight.quant_map"] = (16,)
        want[NF4_PREFIX + "weight.absmax"] = (-(-N * K // meta["blocksize"]),)
    else:
        want["W"] = (N, K)
    if meta["dora"]:
        want["magnitude"] = (N,)
        want["dm"] = (N,)
        want["norm"] = (N,)
    return want


def load_case(path):
    meta, tensors = read_safetensors(path)
    for key in ("case", "dtype", "T", "K", "N", "r", "alpha", "scale", "rslora", "dora", "qlora", "bias", "device"):
        if key not in meta:
            raise ValueError(f"{path}: meta has no `{key}`")
    if meta["dtype"] not in EPS:
        raise ValueError(f"{path}: dtype {meta['dtype']} is not supported")
    if meta.get("dropout", 0.0) != 0.0:
        raise ValueError(f"{path}: dropout must be 0 (peft's mask comes from torch's RNG)")
    for name, shape in expected_tensors(meta).items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor `{name}` is missing")
        if tensors[name][1] != shape:
            raise ValueError(f"{path}: tensor `{name}` has shape {list(tensors[name][1])}, expected {list(shape)}")
    if meta["qlora"]:
        qs = json.loads(tensors[NF4_PREFIX + "weight.quant_state.bitsandbytes__nf4"][2])
        if qs.get("quant_type") != "nf4" or list(qs.get("shape", [])) != [meta["N"], meta["K"]]:
            raise ValueError(f"{path}: quant state {qs} does not match the case")
        if qs.get("blocksize") != meta["blocksize"]:
            raise ValueError(f"{path}: quant state blocksize {qs.get('blocksize')} != meta {meta['blocksize']}")
        if bool(meta.get("double_quant")) != ("nested_blocksize" in qs):
            raise ValueError(f"{path}: double_quant in meta and the quant state disagree")
    return meta, tensors


def f32(v):
    """v rounded to the nearest f32 (as a python float)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_to_bf16_bits(v):
    """The bf16 bit pattern nearest to the f32 value v (round to nearest even)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def nf4_selfcheck(meta, tensors):
    """Pure python: dequantizes the NF4 pieces exactly as the torch fallback does and
    compares the bits with the crate's W_deq. Returns the number of mismatches."""
    def get(name):
        return tensors[NF4_PREFIX + name][2]

    qs = json.loads(get("weight.quant_state.bitsandbytes__nf4"))
    n, k = qs["shape"]
    bs = qs["blocksize"]
    code = struct.unpack("<16f", get("weight.quant_map"))
    packed = get("weight")
    if "nested_blocksize" in qs:
        q = get("weight.absmax")
        nested = struct.unpack(f"<{len(get('weight.nested_absmax')) // 4}f", get("weight.nested_absmax"))
        code2 = struct.unpack("<256f", get("weight.nested_quant_map"))
        offset = f32(qs["nested_offset"])
        absmax = [f32(f32(code2[v] * nested[b // qs["nested_blocksize"]]) + offset) for b, v in enumerate(q)]
    else:
        raw = get("weight.absmax")
        absmax = struct.unpack(f"<{len(raw) // 4}f", raw)
    dtype, _, deq = tensors["W_deq"]
    bad = 0
    for e in range(n * k):
        c = packed[e // 2] >> 4 if e % 2 == 0 else packed[e // 2] & 15
        v = f32(code[c] * absmax[e // bs])
        if dtype == "F32":
            got = deq[4 * e : 4 * e + 4]
            bad += got != struct.pack("<f", v)
        elif dtype == "BF16":
            got = int.from_bytes(deq[2 * e : 2 * e + 2], "little")
            bad += got != f32_to_bf16_bits(v)
        else:
            raise ValueError(f"W_deq dtype {dtype} is not handled by the self-check")
    return bad


# ---- torch side -----------------------------------------------------------------------


def run(cases):
    import torch
    import peft
    from peft import LoraConfig, get_peft_model

    try:
        import bitsandbytes as bnb
        bnb_version, bnb_error = getattr(bnb, "__version__", "?"), None
    except Exception as e:  # ImportError, or a broken install that fails to load
        bnb, bnb_version, bnb_error = None, None, e

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Full-precision f32 accumulation in every matmul (no TF32, no bf16/f16 reduced
    # precision reductions): the tolerance assumes it.
    torch.set_float32_matmul_precision("highest")
    for flag in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        if hasattr(torch.backends.cuda.matmul, flag):
            setattr(torch.backends.cuda.matmul, flag, False)
    print(f"torch {torch.__version__}, peft {peft.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    if dev.type != "cuda":
        print("*** no CUDA device: peft runs on the CPU ***")
    use_bnb = bnb is not None and dev.type == "cuda"
    if any(m["qlora"] for m, _ in cases):
        if use_bnb:
            print(f"bitsandbytes {bnb_version}: the QLoRA base is a bnb.nn.Linear4bit over the crate's NF4 bytes")
        else:
            why = f"bitsandbytes is NOT installed ({bnb_error})" if bnb is None else "no CUDA device for bitsandbytes"
            print(f"\n*** {why}: the QLoRA base is dequantized in torch from the crate's NF4 bytes and peft "
                  "wraps a plain nn.Linear; bitsandbytes' own kernels are NOT exercised ***\n")

    TORCH_DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}
    DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def tens(entry, device=dev):
        dtype, shape, raw = entry
        return torch.frombuffer(bytearray(raw), dtype=TORCH_DT[dtype]).reshape(shape).to(device)

    def nf4_dequantize_torch(sd, dtype):
        """bitsandbytes' dequantize_4bit, written out in torch (f32 products and sums)."""
        qs = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].cpu().tolist()))
        n, k = qs["shape"]
        bs = qs["blocksize"]
        packed = sd["weight"].reshape(-1).to(torch.int64)
        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: n * k]
        code_table = sd["weight.quant_map"].to(torch.float32)
        if "nested_blocksize" in qs:
            q = sd["weight.absmax"].to(torch.int64)
            nested = sd["weight.nested_absmax"].to(torch.float32)
            blocks = torch.arange(q.numel(), device=q.device) // qs["nested_blocksize"]
            offset = torch.tensor(qs["nested_offset"], dtype=torch.float32, device=q.device)
            absmax = sd["weight.nested_quant_map"].to(torch.float32)[q] * nested[blocks]
            absmax = absmax + offset
        else:
            absmax = sd["weight.absmax"].to(torch.float32)
        elem_block = torch.arange(n * k, device=codes.device) // bs
        return (code_table[codes] * absmax[elem_block]).to(dtype).reshape(n, k)

    class Net(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    rows, failures = [], []

    def check(case, name, got, ref, tol):
        got64, ref64 = got.double(), ref.double()
        if got64.shape != ref64.shape:
            rows.append((case, name, "shape", f"{list(got64.shape)} vs {list(ref64.shape)}", "", "FAIL"))
            failures.append((case, name))
            return
        err = (got64 - ref64).abs()
        tol = tol.expand_as(err) if torch.is_tensor(tol) else torch.full_like(err, float(tol))
        ok_elem = err <= tol  # NaN compares false: fails
        ratio = err / torch.where(tol > 0, tol, torch.ones_like(tol))
        ratio = torch.where((tol > 0) | (err == 0), ratio, torch.full_like(ratio, math.inf))
        ratio = torch.nan_to_num(ratio, nan=math.inf)
        worst = int(torch.argmax(ratio.reshape(-1)))
        ok = bool(ok_elem.all())
        rows.append((case, name, f"{err.max().item():.3e}", f"{tol.reshape(-1)[worst].item():.3e}",
                     f"{ratio.reshape(-1)[worst].item():.3f}", "ok" if ok else "FAIL"))
        if not ok:
            failures.append((case, name))

    for meta, raw in cases:
        name, dtype = meta["case"], DTYPE[meta["dtype"]]
        T, K, N, r = meta["T"], meta["K"], meta["N"], meta["r"]
        eps = EPS[meta["dtype"]]
        t = {k: tens(v) for k, v in raw.items() if not k.startswith(NF4_PREFIX)}
        x, A, B, dy = t["x"], t["A"], t["B"], t["dy"]
        bias = t.get("bias")

        # The base layer.
        is_4bit = False
        if meta["qlora"]:
            sd = {k[len(NF4_PREFIX):]: tens(v, torch.device("cpu")) for k, v in raw.items() if k.startswith(NF4_PREFIX)}
            if use_bnb:
                base = bnb.nn.Linear4bit(K, N, bias=meta["bias"], compute_dtype=dtype, quant_type="nf4")
                stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
                base.weight = bnb.nn.Params4bit.from_prequantized(
                    data=sd["weight"].to(dev), quantized_stats=stats, requires_grad=False, device=dev, module=base)
                base.bias = torch.nn.Parameter(bias.clone(), requires_grad=False) if bias is not None else None
                w_ref = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
                is_4bit = True
            else:
                w_ref = nf4_dequantize_torch({k: v.to(dev) for k, v in sd.items()}, dtype)
                base = torch.nn.Linear(K, N, bias=meta["bias"], device=dev, dtype=dtype)
                with torch.no_grad():
                    base.weight.copy_(w_ref)
        else:
            w_ref = t["W"]
            base = torch.nn.Linear(K, N, bias=meta["bias"], device=dev, dtype=dtype)
            with torch.no_grad():
                base.weight.copy_(w_ref)
        if bias is not None and not is_4bit:
            with torch.no_grad():
                base.bias.copy_(bias)

        net = Net(base)
        if is_4bit:
            net.is_loaded_in_4bit = True  # peft dispatches bnb.nn.Linear4bit to its lora.Linear4bit on this
        config = LoraConfig(r=r, lora_alpha=meta["alpha"], target_modules=["proj"], lora_dropout=0.0,
                            use_dora=meta["dora"], use_rslora=meta["rslora"], bias="none")
        model = get_peft_model(net, config, autocast_adapter_dtype=False)
        layer = model.base_model.model.proj
        # The crate's adapters (and magnitude) are in the layer's dtype. peft creates them
        # in f32 where the base weight is not a float tensor (the 4-bit base): cast them.
        adapters = [layer.lora_A, layer.lora_B] + ([layer.lora_magnitude_vector] if meta["dora"] else [])
        for mod in adapters:
            had = {p.dtype for p in mod.parameters()}
            if had != {dtype}:
                print(f"{name}: note: peft created {type(mod).__name__} params in {sorted(map(str, had))}; cast to {dtype}")
                mod.to(dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
            if meta["dora"]:
                layer.lora_magnitude_vector["default"].weight.copy_(t["magnitude"])
        for p, what in [(layer.lora_A["default"].weight, "lora_A"), (layer.lora_B["default"].weight, "lora_B")]:
            if p.dtype != dtype:
                raise RuntimeError(f"{name}: peft holds {what} in {p.dtype}, not {dtype}")
        scaling = layer.scaling["default"]
        if abs(scaling - meta["scale"]) > 2.0**-23 * abs(meta["scale"]):
            raise RuntimeError(f"{name}: peft's scaling {scaling} != the crate's {meta['scale']}")
        lora_share = ((meta["scale"] * (x.double() @ A.double().T) @ B.double().T).norm()
                      / (x.double() @ w_ref.double().T).norm()).item()
        print(f"{name}: {meta['dtype']} T={T} K={K} N={N} r={r} scale={scaling:.6g} bias={meta['bias']} "
              f"peft layer {type(layer).__module__}.{type(layer).__name__}; crate ran on {meta['device']}; "
              f"‖low-rank term‖/‖x Wᵀ‖ = {lora_share:.2f}")

        # peft's forward and backward.
        model.train()
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        y.backward(dy)
        ref = {"y": y.detach(), "dx": xg.grad, "dA": layer.lora_A["default"].weight.grad,
               "dB": layer.lora_B["default"].weight.grad}
        if meta["dora"]:
            ref["dm"] = layer.lora_magnitude_vector["default"].weight.grad

        # Magnitudes, in f64 (see the module docstring).
        d = lambda v: v.double()
        s = abs(meta["scale"])
        ax, aW, aA, aB, ady = d(x).abs(), d(w_ref).abs(), d(A).abs(), d(B).abs(), d(dy).abs()
        ab = d(bias).abs() if bias is not None else torch.zeros(N, dtype=torch.float64, device=dev)
        ha = ax @ aA.T
        la = ha @ aB.T
        base_mag = ax @ aW.T
        if not meta["dora"]:
            c = C_LORA
            mag = {
                "y": (base_mag + ab + s * la, K + r),
                "dx": (ady @ aW + s * (ady @ aB) @ aA, N + r),
                "dA": (s * (ady @ aB).T @ ax, N + T),
                "dB": (s * ady.T @ ha, K + T),
            }
        else:
            c = C_DORA
            m64 = d(t["magnitude"])
            nrm = (d(w_ref) + meta["scale"] * d(B) @ d(A)).norm(dim=1)
            nmag = (aW + s * aB @ aA).norm(dim=1)
            g = m64 / nrm
            gm = m64.abs() * nmag / nrm**2
            gm1 = (g - 1).abs()
            mag = {
                "y": ((1 + gm1 + gm) * (base_mag + ab) + gm * s * la, K + r),
                "dx": ((ady * (1 + gm1 + gm)) @ aW + s * ((ady * gm) @ aB) @ aA, N + r),
                "dA": (s * ((ady * gm) @ aB).T @ ax, N + T),
                "dB": (s * gm[:, None] * (ady.T @ ha), K + T),
                "dm": ((ady * (base_mag + ab + s * la)).sum(0) * nmag / nrm**2, K + r + T),
            }
        for key in ["y", "dx", "dA", "dB"] + (["dm"] if meta["dora"] else []):
            m_, k = mag[key]
            if ref[key] is None:
                raise RuntimeError(f"{name}: peft produced no gradient for {key}")
            check(name, key, t[key], ref[key], (c * eps + 2 * k * 2.0**-24) * m_ + sys.float_info.min)
        if meta["dora"]:
            check(name, "norm(f64)", t["norm"], nrm, 4 * 2.0**-23 * nrm + (K + r) * 2.0**-24 * nmag)
        if meta["qlora"]:
            src = "bnb dequantize_4bit" if is_4bit else "torch NF4 dequant"
            check(name, f"W_deq({src})", t["W_deq"], w_ref, 0.0)

    header = ("case", "tensor", "max|err|", "tol@worst", "err/tol", "ok")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths))
    print()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()
    if failures:
        print(f"FAILED: {len(failures)} of {len(rows)} comparisons: "
              + ", ".join(f"{c}/{n}" for c, n in failures))
        return 1
    print(f"all {len(rows)} comparisons of {len(cases)} cases within tolerance")
    return 0


def main(argv):
    args = [a for a in argv if a != "--parse-only"]
    parse_only = len(args) != len(argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    directory = args[0]
    paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not paths:
        print(f"FAILED: no cases (*.safetensors) in {directory}", file=sys.stderr)
        return 1
    cases = [load_case(p) for p in paths]
    if parse_only:
        status = 0
        for meta, tensors in cases:
            note = ""
            if meta["qlora"]:
                bad = nf4_selfcheck(meta, tensors)
                note = f"; NF4 bytes dequantized in python: {'equal to W_deq' if bad == 0 else f'{bad} MISMATCHES with W_deq'}"
                status |= bad != 0
            print(f"{meta['case']}: {meta['dtype']} T={meta['T']} K={meta['K']} N={meta['N']} r={meta['r']} "
                  f"dora={meta['dora']} qlora={meta['qlora']} device={meta['device']}: {len(tensors)} tensors{note}")
        print(f"parsed {len(cases)} cases (--parse-only: nothing compared with peft)")
        return status
    return run(cases)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
