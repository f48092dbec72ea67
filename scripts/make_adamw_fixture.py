#!/usr/bin/env python3
"""Writes tests/fixtures/adamw_torch.safetensors: five steps of torch.optim.AdamW
(non-amsgrad, torch's single-tensor CPU implementation, f32) on three tensors of odd
sizes, in three param groups as peft's LoRA+ optimizer makes them:

    tensor 0 (7 elements)     "A": lr,          weight_decay
    tensor 1 (130 elements)   "B": lr * ratio,  weight_decay
    tensor 2 (1029 elements)  "B, no decay": lr * ratio, weight_decay = 0

with non-default betas. The gradients cover the regimes of the update: tensor 0's are
about 1e-8 (so sqrt(v) is of the order of eps), tensor 1's of order 1 with sign changes,
tensor 2's of order 1e-3 with some elements zero at every step (m = v = 0: the update is
0 / eps) and some zero at some steps.

Tensors (f32): ``p0_<i>`` the initial parameters of tensor i, ``g<s>_<i>`` its gradient
at step s (1..=5), ``p<s>_<i>`` its parameters after step s, ``m5_<i>`` and ``v5_<i>``
its moments (exp_avg, exp_avg_sq) after the last step. Metadata ``meta`` (JSON): lr,
ratio, betas, eps, weight_decay, each group's lr and weight_decay, the sizes, the number
of steps and torch's version.

The file is written in the safetensors format directly (torch is the only dependency).

Usage: python3 scripts/make_adamw_fixture.py [OUT_FILE]
"""

import json
import os
import struct
import sys

import torch

SIZES = [7, 130, 1029]
STEPS = 5
LR = 1e-3
RATIO = 16.0
BETAS = (0.8, 0.99)
EPS = 1e-8
WEIGHT_DECAY = 0.05


def save_safetensors(path: str, tensors: dict, meta: dict) -> None:
    header = {"__metadata__": {"meta": json.dumps(meta, sort_keys=True)}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        data = bytes(t.reshape(-1).view(torch.uint8).tolist())  # little-endian hosts
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "adamw_torch.safetensors")
    gen = torch.Generator().manual_seed(20261203)
    params = [torch.nn.Parameter(0.5 * torch.randn(n, generator=gen)) for n in SIZES]
    tensors = {f"p0_{i}": p.detach().clone() for i, p in enumerate(params)}
    groups = [
        {"params": [params[0]], "lr": LR, "weight_decay": WEIGHT_DECAY},
        {"params": [params[1]], "lr": LR * RATIO, "weight_decay": WEIGHT_DECAY},
        {"params": [params[2]], "lr": LR * RATIO, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            amsgrad=False, maximize=False, foreach=False, fused=False)
    always_zero = torch.arange(SIZES[2]) % 7 == 3
    for s in range(1, STEPS + 1):
        g0 = 1e-8 * torch.randn(SIZES[0], generator=gen)
        g1 = torch.randn(SIZES[1], generator=gen) * (-1.0) ** s + 0.1
        g2 = 1e-3 * torch.randn(SIZES[2], generator=gen)
        g2[always_zero] = 0.0
        g2[(torch.arange(SIZES[2]) % 11) == s] = 0.0
        for i, g in enumerate([g0, g1, g2]):
            params[i].grad = g.clone()
            tensors[f"g{s}_{i}"] = g.clone()
        opt.step()
        for i, p in enumerate(params):
            tensors[f"p{s}_{i}"] = p.detach().clone()
    for i, p in enumerate(params):
        st = opt.state[p]
        assert float(st["step"]) == STEPS
        tensors[f"m{STEPS}_{i}"] = st["exp_avg"].clone()
        tensors[f"v{STEPS}_{i}"] = st["exp_avg_sq"].clone()
    meta = dict(
        lr=LR, ratio=RATIO, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
        group_lr=[g["lr"] for g in opt.param_groups],
        group_weight_decay=[g["weight_decay"] for g in opt.param_groups],
        sizes=SIZES, steps=STEPS, torch=torch.__version__,
        implementation="torch.optim.AdamW(foreach=False, fused=False) on the CPU, float32",
    )
    save_safetensors(out, tensors, meta)
    print(f"wrote {os.path.normpath(out)} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
