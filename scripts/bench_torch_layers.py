#!/usr/bin/env python3
"""One peft LoRA layer, forward + backward, with and without ``lora_kernels.patch``, on
the GPU, against the frozen base layer alone (forward + dX), all in one process.

For each (T, K, N) and method (LoRA, DoRA, QLoRA, QDoRA with r = 16, alpha = 32), CUDA
events time 20 repetitions after 5 warm-ups of ``y = layer(x); y.backward(dy)``, eagerly
(host time included where it is the longer) and replayed from a CUDA graph (GPU time
only):

- ``base``: the frozen ``nn.Linear`` (or bitsandbytes ``Linear4bit`` for the 4-bit rows)
  with ``x.requires_grad``: what the step costs if the adapter were free;
- ``peft``: peft's layer (adapters in float32, peft's default);
- ``patch``: the same layer after ``lora_kernels.patch``.

Also the host time of one patched call at T = 1 (CPU-bound: the Python and launch
overhead a layer adds). Prints a markdown table; ``--json`` writes the figures.

Usage: python3 scripts/bench_torch_layers.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

SHAPES = [(8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048), (512, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
METHODS = ["lora", "dora", "qlora", "qdora"]


def make_layer(method: str, k: int, n: int):
    import peft

    torch.manual_seed(0)
    if method.startswith("q"):
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 compress_statistics=True)
        base.weight = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type="nf4",
                                        compress_statistics=True)
        base = base.cuda()
    else:
        base = nn.Linear(k, n, bias=False).to(torch.bfloat16).cuda().requires_grad_(False)
    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], use_dora=method.endswith("dora"),
                          init_lora_weights=False)
    model = peft.get_peft_model(wrapper, cfg)
    return base, model


def time_fwd_bwd(fn, x, dy, reps=20, warmup=5) -> float:
    for _ in range(warmup):
        fn(x).backward(dy)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(x).backward(dy)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps  # µs


def graph_us(fn, x, dy, reps=20) -> float:
    """GPU time of one forward + backward, µs: the call captured once in a CUDA graph
    (after warm-up calls on the capture stream) and replayed, so host time is out."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x).backward(dy)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        fn(x).backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def try_graph_us(fn, x, dy):
    try:
        return graph_us(fn, x, dy)
    except Exception as e:  # a path that cannot be captured: say so, keep going
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:120]})")
        return float("nan")


def host_us_per_call(fn, x, dy, reps=200) -> float:
    fn(x).backward(dy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x).backward(dy)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / reps


def main() -> None:
    import lora_kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("eager: CUDA events around 20 eager calls (host time included where it is longer);")
    print("graph: the same call replayed from a CUDA graph (GPU time only)")
    print("| method | T | K | N | base µs | peft µs | patch µs | patch / base | peft / patch "
          "| graph: base | peft | patch | patch / base | peft / patch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method in METHODS:
        for t, k, n in SHAPES:
            base, model = make_layer(method, k, n)
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
            us_base, g_base = time_fwd_bwd(base, x, dy), try_graph_us(base, x, dy)
            us_peft, g_peft = time_fwd_bwd(model, x, dy), try_graph_us(model, x, dy)
            lora_kernels.patch(model)
            us_patch, g_patch = time_fwd_bwd(model, x, dy), try_graph_us(model, x, dy)
            fb = lora_kernels.fallbacks(model)
            row = dict(method=method, T=t, K=k, N=n, base_us=us_base, peft_us=us_peft, patch_us=us_patch,
                       graph_base_us=g_base, graph_peft_us=g_peft, graph_patch_us=g_patch, fallbacks=fb)
            if t == 1:
                row["patch_host_us"] = host_us_per_call(model, x, dy)
                lora_kernels.unpatch(model)
                row["peft_host_us"] = host_us_per_call(model, x, dy)
            rows.append(row)
            print(f"| {method} | {t} | {k} | {n} | {us_base:.1f} | {us_peft:.1f} | {us_patch:.1f} | "
                  f"{us_patch / us_base:.3f} | {us_peft / us_patch:.2f} | {g_base:.1f} | {g_peft:.1f} | "
                  f"{g_patch:.1f} | {g_patch / g_base:.3f} | {g_peft / g_patch:.2f} |"
                  + (f" fell back: {fb}" if fb else ""))
            del base, model, x, dy
            torch.cuda.empty_cache()
    for r in rows:
        if "patch_host_us" in r:
            print(f"host time per fwd+bwd call at T=1 ({r['method']}): patch {r['patch_host_us']:.1f} µs, "
                  f"peft {r['peft_host_us']:.1f} µs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
