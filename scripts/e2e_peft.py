#!/usr/bin/env python3
"""End-to-end race: peft's LoRA/QLoRA/DoRA/QDoRA training steps with and without
``lora_kernels.patch``, on a ~1B-parameter Llama with random weights.

    python3 scripts/e2e_peft.py --out DIR [--steps 50] [--batch 4] [--seq 2048]
                                [--configs floor,lora,lora+patch,...] [--checkpoint CKPT]
    python3 scripts/e2e_peft.py --out DIR --tiny        (smoke test; runs on the CPU too)

The model (hidden 2048, 16 layers, intermediate 5632, 32 heads, vocab 32000) is built
once from a fixed seed and saved with ``save_pretrained`` (safetensors, bf16); every
configuration reloads it with ``from_pretrained`` (bf16, sdpa attention; the q* rows
through bitsandbytes NF4 with double quantization and a bf16 compute dtype).

Configurations, run one after another in this process:

- ``floor``: no adapters, every weight frozen; only the base's forward + backward.
- ``lora``, ``qlora``, ``qlora_drop`` (dropout 0.05), ``dora``, ``qdora``: peft, r=16,
  alpha=32, on q/k/v/o/gate/up/down, peft's defaults otherwise (float32 adapters).
- ``X+patch``: the same after ``lora_kernels.patch(model)``.

Every configuration has the embedding *output* require grad
(``enable_input_require_grads``), so all of them run the same full backward chain and
the floor is the base's cost alone. Each one is seeded identically (``torch.manual_seed``)
so a configuration and its ``+patch`` twin start from the same adapters, and all see the
same fixed-seed batches (labels = inputs): each sequence repeats a random pattern of 8
to 64 tokens (``make_batches``), a copy task a model can learn from its context. Dropout masks differ between peft
(torch's RNG) and the patch (the crate's Philox), so the ``qlora_drop`` pair agrees only
statistically.

Per configuration: tokens/s over the steps after ``--warmup``, peak
``torch.cuda.max_memory_allocated`` during training, for ``+patch`` rows also the high
water of the CUDA default memory pool the ops' scratch comes from (which torch does not
count), the loss of every step, the patched-layer count and any "falling back" warning
of the patch. ``results.json`` and ``results.md`` in ``--out`` are rewritten after every
configuration, so a run cut short keeps what it finished. A configuration that raises is
recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings

import torch

GiB = 1 << 30
SEED = 1234  # the checkpoint's weights and every configuration's adapter init
DATA_SEED = 4321  # the token stream
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FULL_MODEL = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY_MODEL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
)
FULL_RUN = dict(steps=50, batch=4, seq=2048)
TINY_RUN = dict(steps=5, batch=2, seq=32)

# name -> (4-bit base, DoRA, lora_dropout); each also runs as "name+patch".
ADAPTERS = {
    "lora": (False, False, 0.0),
    "qlora": (True, False, 0.0),
    "qlora_drop": (True, False, 0.05),
    "dora": (False, True, 0.0),
    "qdora": (True, True, 0.0),
}
ALL_CONFIGS = ["floor"] + [c for a in ADAPTERS for c in (a, a + "+patch")]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--steps", type=int, help="training steps per configuration (default 50; tiny 5)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 2048; tiny 32)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    ap.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma list, in run order")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 2 steps per configuration (profile_<config>.txt in --out)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and few steps (smoke test)")
    ap.add_argument("--checkpoint", help="where the random model is saved / reused "
                    "(default: a temporary directory under --out, removed at the end)")
    args = ap.parse_args()
    run = TINY_RUN if args.tiny else FULL_RUN
    for key, default in run.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in ALL_CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(ALL_CONFIGS)}")
    if not 0 <= args.warmup < args.steps:
        ap.error("--warmup must be in [0, --steps)")
    return args


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------
# Optional components: bitsandbytes (q* rows) and lora_kernels (+patch rows)
# --------------------------------------------------------------------------------------


def probe_bnb(device: torch.device):
    """None when the 4-bit configurations can run, else why not."""
    if device.type != "cuda":
        return "no CUDA device (bitsandbytes NF4 needs one)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes not importable: {type(e).__name__}: {e}"
    return None


def probe_lora_kernels():
    """(module or None, why not)."""
    try:
        import lora_kernels
    except Exception as e:
        return None, f"lora_kernels not importable: {type(e).__name__}: {e}"
    return lora_kernels, None


def reset_patch_warnings() -> None:
    """``lora_kernels.patch`` warns once per fallback reason per process; forget the
    reasons already warned so each configuration reports its own fallbacks."""
    import lora_kernels

    lora_kernels.reset_warnings()


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def ensure_checkpoint(path: str, sizes: dict, seq: int, device: torch.device) -> dict:
    """Writes the random bf16 Llama to ``path`` unless a checkpoint of these sizes is
    there already. Returns a short description."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **sizes,
        max_position_embeddings=max(2048, seq),
        tie_word_embeddings=False,
        use_cache=False,
    )
    info = {"path": path, "reused": os.path.exists(os.path.join(path, "config.json"))}
    if info["reused"]:
        old = LlamaConfig.from_pretrained(path)
        if not all(getattr(old, k) == v for k, v in sizes.items()) or old.max_position_embeddings < seq:
            raise SystemExit(f"{path} holds a checkpoint of other sizes; pick another --checkpoint")
    else:
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        # Built on the run's device (a 1B float32 init is slow on a CPU), saved as bf16.
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(path)
        del model
        free_memory(device)
        info["write_s"] = time.perf_counter() - t0
    info["params"] = checkpoint_params(path)
    return info


def checkpoint_params(path: str) -> int:
    """Parameters stored in the checkpoint's safetensors files (from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def load_model(path: str, quantized: bool, device: torch.device):
    from transformers import LlamaForCausalLM

    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else 0}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = LlamaForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device) if device.type != "cuda" else model


# --------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------


def parse_config(name: str):
    """(base name, +patch, 4-bit base, DoRA, dropout) of a configuration's name."""
    base_name = name.removesuffix("+patch")
    quantized, dora, dropout = ADAPTERS.get(base_name, (False, False, 0.0))
    return base_name, name != base_name, quantized, dora, dropout


def make_batches(steps: int, batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[steps, batch, seq] token ids of a task the model can learn in a few steps, so that
    the loss curves move and can be compared: each sequence repeats a random pattern of
    8 to 64 tokens (copying it from context is learnable; the first period is not)."""
    out = torch.empty((steps, batch, seq), dtype=torch.long)
    for s in range(steps):
        for b in range(batch):
            period = int(torch.randint(8, 65, (), generator=gen))
            pattern = torch.randint(0, vocab, (period,), generator=gen)
            out[s, b] = pattern.repeat(seq // period + 1)[:seq]
    return out


def profile_steps(model, opt, batches, out_path: str, steps: int = 2) -> None:
    """Runs ``steps`` more training steps under torch.profiler and writes the GPU
    kernels' table (by total CUDA time) to ``out_path``."""
    from torch.profiler import ProfilerActivity, profile

    import collections
    import contextlib

    try:
        from lora_kernels.ops import record_plans
    except ImportError:
        record_plans = None
    plans_ctx = record_plans() if record_plans is not None else contextlib.nullcontext([])
    with plans_ctx as plans, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            ids = batches[step]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    with open(out_path, "w") as f:
        f.write(f"{steps} steps\n{table}\n")
        f.write("plans taken by lora_kernels' ops (op, plan): calls\n")
        for (op, plan), n in sorted(collections.Counter(plans).items()):
            f.write(f"  {op}: {plan}: {n}\n")


def run_config(name: str, args, ckpt: str, device: torch.device, batches: torch.Tensor, lk) -> dict:
    """Loads, adapts, optionally patches and trains one configuration. Raises on error."""
    base_name, patched, quantized, dora, dropout = parse_config(name)
    res = {"config": name, "status": "ok"}

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    model = load_model(ckpt, quantized, device)
    # Every base weight frozen, the embedding's included (get_peft_model would freeze the
    # base too; the floor relies on this), while the embedding *output* requires grad.
    model.requires_grad_(False)
    model.enable_input_require_grads()
    if base_name != "floor":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=dropout,
            target_modules=TARGETS,
            use_dora=dora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    if patched:
        reset_patch_warnings()
        n = lk.patch(model)
        assert n > 0, "lora_kernels.patch patched no layer"
        res["patched_layers"] = n
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = None
    if params:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    sync(device)
    res["load_s"] = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        res["model_bytes"] = torch.cuda.memory_allocated(device)
    use_pool = patched and device.type == "cuda"
    if use_pool:
        res["pool_in_use_before"] = lk.ops.scratch_pool_usage(device, reset=True)[0]

    losses = []
    t_start = None
    for step in range(args.steps):
        if step == args.warmup:
            sync(device)
            t_start = time.perf_counter()
        ids = batches[step]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the loop: no host sync per step
        del loss
    sync(device)
    elapsed = time.perf_counter() - t_start

    timed = args.steps - args.warmup
    res["timed_steps"] = timed
    res["tokens_per_s"] = args.batch * args.seq * timed / elapsed
    res["step_ms"] = 1000.0 * elapsed / timed
    res["losses"] = [float(v) for v in torch.stack(losses).float().cpu()]
    if args.profile and device.type == "cuda":
        profile_steps(model, opt, batches, os.path.join(args.out, f"profile_{name.replace('+', '_')}.txt"))
    if patched:
        # Calls that ran peft's forward instead of the fused ops, by reason.
        res["fallback_calls"] = lk.fallbacks(model)
    if device.type == "cuda":
        res["peak_torch_bytes"] = torch.cuda.max_memory_allocated(device)
        res["peak_pool_bytes"] = lk.ops.scratch_pool_usage(device)[1] if use_pool else 0
        res["peak_total_bytes"] = res["peak_torch_bytes"] + res["peak_pool_bytes"]
    return res


def run_recorded(name: str, args, ckpt, device, batches, lk) -> dict:
    """run_config with its warnings recorded and any error caught."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = run_config(name, args, ckpt, device, batches, lk)
        except Exception as e:
            res = {"config": name, "status": "error", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=8)}
    messages = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in messages:
            messages.append(text)
    res["fallback_warnings"] = [m for m in messages if "falling back" in m]
    res["other_warnings"] = [m[:400] for m in messages if "falling back" not in m][:20]
    return res


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def loss_agreement(peft_losses, patch_losses) -> dict:
    n = min(len(peft_losses), len(patch_losses))
    diffs = [abs(a - b) for a, b in zip(peft_losses[:n], patch_losses[:n])]
    tail = max(1, min(10, n))
    peft_tail = sum(peft_losses[n - tail:n]) / tail
    patch_tail = sum(patch_losses[n - tail:n]) / tail
    return {
        "max_abs_diff": max(diffs) if diffs else math.nan,
        "mean_last10_peft": peft_tail,
        "mean_last10_patch": patch_tail,
        "mean_last10_diff": patch_tail - peft_tail,
    }


def summarize(results: list) -> dict:
    """Pairs every ok ``X+patch`` with an ok ``X``."""
    ok = {r["config"]: r for r in results if r["status"] == "ok"}
    pairs = {}
    for name, r in ok.items():
        twin = ok.get(name[: -len("+patch")]) if name.endswith("+patch") else None
        if twin is None:
            continue
        p = {"speedup": r["tokens_per_s"] / twin["tokens_per_s"]}
        if "peak_total_bytes" in r and "peak_total_bytes" in twin:
            p["peak_ratio"] = r["peak_total_bytes"] / twin["peak_total_bytes"]
        p.update(loss_agreement(twin["losses"], r["losses"]))
        pairs[name] = p
    return pairs


def fmt(v, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown(meta: dict, results: list, pairs: dict) -> str:
    lines = [
        "# lora_kernels end-to-end race (peft training steps)",
        "",
        f"- device: {meta['device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: Llama {meta['model']} ({meta['params']} params), random weights, bf16",
        f"- run: batch {meta['batch']} × seq {meta['seq']}, {meta['steps']} steps "
        f"({meta['warmup']} warm-up untimed), AdamW lr 2e-4, no gradient checkpointing",
    ]
    lines += [f"- note: {n}" for n in meta["notes"]]
    lines += [
        "",
        "| config | tokens/s | vs peft | overhead over floor | peak GiB | peak vs peft "
        "| final loss | max \\|Δloss\\| vs twin |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ok = {r["config"]: r for r in results if r["status"] == "ok"}
    floor = ok.get("floor")
    for r in results:
        name = r["config"]
        if r["status"] != "ok":
            what = r.get("error", r.get("reason", ""))[:160].replace("|", "/")
            lines.append(f"| {name} | {r['status']}: {what} | | | | | | |")
            continue
        pair = pairs.get(name, {})
        overhead = None
        if floor is not None and name != "floor":
            overhead = 100.0 * (floor["tokens_per_s"] / r["tokens_per_s"] - 1.0)
        peak = None
        if "peak_total_bytes" in r:
            peak = f"{r['peak_total_bytes'] / GiB:.2f}"
            if r.get("peak_pool_bytes"):
                peak += f" (pool {r['peak_pool_bytes'] / GiB:.2f})"
        flag = " ⚠ fell back" if r.get("fallback_warnings") else ""
        lines.append(
            f"| {name}{flag} | {r['tokens_per_s']:,.0f} | {fmt(pair.get('speedup'), '.3f', '×')} "
            f"| {fmt(overhead, '+.1f', '%')} | {peak or '—'} | {fmt(pair.get('peak_ratio'), '.3f', '×')} "
            f"| {r['losses'][-1]:.4f} | {fmt(pair.get('max_abs_diff'), '.2e')} |"
        )
    if pairs:
        lines += [
            "",
            "Loss agreement (+patch vs its peft twin; the dropout pair draws different masks):",
            "",
            "| pair | max \\|Δloss\\| | mean last 10 (peft) | mean last 10 (patch) | Δ mean |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, p in pairs.items():
            lines.append(
                f"| {name} | {p['max_abs_diff']:.2e} | {p['mean_last10_peft']:.4f} "
                f"| {p['mean_last10_patch']:.4f} | {p['mean_last10_diff']:+.2e} |"
            )
    fallbacks = [(r["config"], w) for r in results for w in r.get("fallback_warnings", [])]
    if fallbacks:
        lines += ["", "Fallback warnings (patched layers that ran peft's forward):", ""]
        lines += [f"- {name}: {w}" for name, w in fallbacks]
    return "\n".join(lines) + "\n"


def one_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('error', r.get('reason'))}"
    parts = [f"{r['tokens_per_s']:,.0f} tokens/s", f"{r['step_ms']:.1f} ms/step"]
    if "peak_total_bytes" in r:
        parts.append(f"peak {r['peak_total_bytes'] / GiB:.2f} GiB (pool {r['peak_pool_bytes'] / GiB:.3f})")
    parts.append(f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    if "patched_layers" in r:
        parts.append(f"{r['patched_layers']} layers patched")
    return ", ".join(parts)


def write_outputs(out: str, meta: dict, results: list) -> dict:
    pairs = summarize(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "pairs": pairs}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(meta, results, pairs))
    return pairs


# --------------------------------------------------------------------------------------


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no loading bars in the log
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sizes = TINY_MODEL if args.tiny else FULL_MODEL

    lk, lk_why = probe_lora_kernels()
    bnb_why = probe_bnb(device)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "lora_kernels": version("lora_kernels") if lk else "not importable",
    }
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "versions": versions,
        "model": ", ".join(f"{k} {v}" for k, v in sizes.items()),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "tiny": args.tiny, "notes": [],
    }
    if lk is not None:
        meta["lora_kernels_build"] = lk.build_info()
        if device.type == "cuda" and not meta["lora_kernels_build"]["cuda_kernels"]:
            meta["notes"].append("this lora_kernels build has no CUDA kernels")
    if lk_why:
        meta["notes"].append(f"+patch rows skipped: {lk_why}")
    if bnb_why:
        meta["notes"].append(f"4-bit rows skipped: {bnb_why}")
    if device.type == "cpu":
        meta["notes"].append("CPU run: the patched ops use the crate's float64 oracle; timings mean nothing")
    print(f"device: {meta['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for note in meta["notes"]:
        print(f"note: {note}")

    own_ckpt = args.checkpoint is None
    ckpt = tempfile.mkdtemp(prefix="checkpoint-", dir=args.out) if own_ckpt else args.checkpoint
    results = []
    try:
        info = ensure_checkpoint(ckpt, sizes, args.seq, device)
        meta["checkpoint"] = info
        meta["params"] = f"{info['params'] / 1e9:.3f}B" if info["params"] > 1e8 else str(info["params"])
        print(f"checkpoint: {info}")

        gen = torch.Generator().manual_seed(DATA_SEED)
        batches = make_batches(args.steps, args.batch, args.seq, sizes["vocab_size"], gen)
        batches = batches.to(device)

        for name in args.configs:
            _, patched, quantized, _, _ = parse_config(name)
            if patched and lk is None:
                res = {"config": name, "status": "skipped", "reason": lk_why}
            elif quantized and bnb_why:
                res = {"config": name, "status": "skipped", "reason": bnb_why}
            else:
                res = run_recorded(name, args, ckpt, device, batches, lk)
                free_memory(device)
            results.append(res)
            print(f"== {name}: {one_line(res)}", flush=True)
            for w in res.get("fallback_warnings", []):
                print(f"   FALLBACK: {w}")
            write_outputs(args.out, meta, results)
    finally:
        if own_ckpt:
            shutil.rmtree(ckpt, ignore_errors=True)

    pairs = write_outputs(args.out, meta, results)
    print()
    print(markdown(meta, results, pairs))
    failed = [r["config"] for r in results if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
