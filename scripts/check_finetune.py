#!/usr/bin/env python3
"""Checks the adapter `examples/finetune.rs` wrote against peft.

    python3 scripts/check_finetune.py [DIR]     (DIR: the example's --out, default target/finetune)

Rebuilds the example's model in torch from DIR/base_model.safetensors (the frozen NF4
layers dequantized to f32, the embedding, the sizes), loads DIR/adapter with
`PeftModel.from_pretrained` exactly as a user would, runs the evaluation batch of
DIR/eval.safetensors and compares peft's logits and loss with the ones the crate's CPU
oracle computed. Exits non-zero on any mismatch, or when peft loads fewer adapter
weights than the files hold.
"""
import json
import math
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from peft import PeftModel


class Block(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)


class Tiny(torch.nn.Module):
    """The example's model: embed; per layer a = x + causal_mean(x),
    x = a + down(relu(up(rmsnorm(a)))); logits = head(rmsnorm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg["rms_eps"]
        self.embed = torch.nn.Embedding(cfg["vocab"], cfg["dim"])
        self.layers = torch.nn.ModuleList(Block(cfg["dim"], cfg["hidden"]) for _ in range(cfg["layers"]))
        self.head = torch.nn.Linear(cfg["dim"], cfg["vocab"], bias=False)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, ids):
        x = self.embed(ids)  # [B, S, D]
        counts = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=x.dtype)[None, :, None]
        for blk in self.layers:
            a = x + x.cumsum(1) / counts
            x = a + blk.down(torch.relu(blk.up(self.rms(a))))
        return self.head(self.rms(x))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "target/finetune"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with safe_open(os.path.join(d, "base_model.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["meta"])
    base = load_file(os.path.join(d, "base_model.safetensors"))
    model = Tiny(cfg)
    state = {"embed.weight": base.pop("embed")}
    state.update(base)
    model.load_state_dict(state, strict=True)
    model = model.to(dev).eval()

    adir = os.path.join(d, "adapter")
    peft_model = PeftModel.from_pretrained(model, adir).to(dev).eval()
    # Every tensor in the file must have landed in the model.
    saved = load_file(os.path.join(adir, "adapter_model.safetensors"))
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    ok = True
    for k, v in saved.items():
        name = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight").replace(
            ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        if name not in loaded:
            print(f"FAIL: peft has no parameter for {k} (looked for {name})")
            ok = False
        elif not torch.equal(loaded[name].cpu().float(), v.float()):
            print(f"FAIL: {k} differs after loading")
            ok = False
    print(f"peft {__import__('peft').__version__} loaded {len(saved)} adapter tensors "
          f"(use_dora={cfg['dora']}) into {len([m for m in peft_model.modules() if hasattr(m, 'lora_A')])} modules")

    ev = load_file(os.path.join(d, "eval.safetensors"))
    with safe_open(os.path.join(d, "eval.safetensors"), "pt") as f:
        emeta = json.loads(f.metadata()["meta"])
    ids = ev["ids"].to(torch.int64).to(dev)
    ref = ev["logits"].to(dev)
    with torch.no_grad():
        logits = peft_model(ids).reshape(ref.shape).float()
    err = (logits - ref).abs().max().item()
    scale = ref.abs().max().item()
    # Both sides in f32 with different summation orders (the oracle sums in f64).
    tol = 1e-4 * max(scale, 1.0)
    lg = logits.reshape(ids.shape[0], ids.shape[1], -1)[:, :-1]
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)).item()
    print(f"logits: max |peft - crate| = {err:.3e} (max |logit| {scale:.3f}, tol {tol:.1e}); "
          f"loss peft {loss:.6f} vs crate {emeta['loss']:.6f}")
    if not (err <= tol) or not math.isclose(loss, emeta["loss"], rel_tol=1e-4, abs_tol=1e-5):
        print("FAIL: peft's outputs differ from the crate's")
        ok = False
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
