#!/usr/bin/env python3
"""Checks what `examples/finetune.rs` trained against transformers + peft.

    python3 scripts/check_finetune.py [DIR] [--model MODEL_DIR] [--device cpu|cuda]

DIR is the example's --out (default target/finetune). The base model is DIR/base (the
Llama the example generated) unless --model names the checkpoint it was given. The
script loads it with transformers' `LlamaForCausalLM.from_pretrained`, the adapter
DIR/adapter with `PeftModel.from_pretrained` exactly as a user would, runs the
evaluation batch of DIR/eval.safetensors (`input_ids`) and compares the logits and the
loss with the ones the example computed (`logits`, `loss`).

For QLoRA / QDoRA adapters (the example's base was quantized to NF4, blocksize 64,
double quantization) each targeted weight goes through bitsandbytes'
`quantize_4bit` / `dequantize_4bit` first, so peft's layers see the example's base.

The tolerance follows the example's dtype: f32 logits agree to 1e-3 relative to their
largest magnitude (different summation orders over a few layers), bf16 ones to 6e-2
(bf16's 8-bit mantissa through every layer). Exits non-zero on a mismatch or when peft
loads fewer adapter weights than the files hold.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from peft import PeftModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default="target/finetune")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    base_dir = a.model or os.path.join(a.dir, "base")
    adir = os.path.join(a.dir, "adapter")
    ev = load_file(os.path.join(a.dir, "eval.safetensors"))
    ids, want, want_loss = ev["input_ids"], ev["logits"], float(ev["loss"][0])
    with open(os.path.join(adir, "adapter_config.json")) as f:
        cfg = json.load(f)

    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model.eval()
    stored = load_file(os.path.join(adir, "adapter_model.safetensors"))
    quantized = any(k.endswith("lora_A.weight") for k in stored) and _was_quantized(a.dir)
    if quantized:
        import bitsandbytes.functional as F

        targets = set(cfg["target_modules"])
        n = 0
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
                # In the example's dtype (its base was quantized from that), on --device.
                w = mod.weight.data.to(a.device, _torch_dtype(a.dir))
                q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                mod.weight.data = F.dequantize_4bit(q, st).to("cpu", torch.float32)
                n += 1
        print(f"base: {n} targeted weights through bitsandbytes NF4 (blocksize 64, double quant)")

    peft_model = PeftModel.from_pretrained(model, adir)
    peft_model.eval()
    loaded = sum(1 for k, _ in peft_model.named_parameters() if "lora_" in k)
    if loaded < len(stored):
        sys.exit(f"peft loaded {loaded} adapter tensors, the files hold {len(stored)}")
    peft_model.to(a.device)
    with torch.no_grad():
        out = peft_model(input_ids=ids.to(a.device), labels=ids.to(a.device))
    got = out.logits.float().cpu()
    loss = float(out.loss)
    bf16 = _dtype(a.dir) == "bf16"
    rel = 6e-2 if bf16 else 1e-3
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    print(f"logits: max |peft - example| = {diff:.3e} (largest {scale:.3f}; tolerance {rel * scale:.3e})")
    print(f"loss: peft {loss:.6f}, example {want_loss:.6f}")
    ok = diff <= rel * scale and abs(loss - want_loss) <= rel * max(1.0, abs(want_loss))
    print("MATCH" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


def _meta(d):
    p = os.path.join(d, "run.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def _was_quantized(d):
    return _meta(d).get("method", "").lower() in ("qlora", "qdora")


def _dtype(d):
    return _meta(d).get("dtype", "f32")


def _torch_dtype(d):
    return torch.bfloat16 if _dtype(d) == "bf16" else torch.float32


if __name__ == "__main__":
    main()
