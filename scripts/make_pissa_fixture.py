#!/usr/bin/env python3
"""Writes tests/fixtures/peer/peft_pissa_<n>x<k>_r<r>[_rslora].safetensors: peft's PiSSA
initialisation (``init_lora_weights="pissa"``, exact SVD) of one ``nn.Linear(k, n)`` in
float32, and its conversion to a plain LoRA adapter on save
(``save_pretrained(path_initial_model_for_weight_conversion=...)``) after a change of
A and B standing in for training.

Tensors: ``W`` (the original weight), ``A0``, ``B0``, ``W_res`` (PiSSA's initial
adapter and residual), ``A``, ``B`` (the "trained" adapter), ``A_conv``, ``B_conv`` (the
converted rank-2r adapter peft saves). Metadata ``meta``: n, k, r, alpha, rslora,
scaling, and the converted config's r and lora_alpha.

Usage: python3 scripts/make_pissa_fixture.py [OUT_DIR]   (torch, peft, safetensors)
"""

import json
import os
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn


def make(out_dir: str, n: int, k: int, r: int, alpha: float, rslora: bool) -> str:
    torch.manual_seed(1234 + n + k + r + int(rslora))
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(k, n, bias=False))
    w = base.proj.weight.detach().clone()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights="pissa",
                     use_rslora=rslora)
    with tempfile.TemporaryDirectory() as tmp:
        model = get_peft_model(base, cfg)
        layer = model.base_model.model.proj
        a0 = layer.lora_A["default"].weight.detach().clone()
        b0 = layer.lora_B["default"].weight.detach().clone()
        w_res = layer.base_layer.weight.detach().clone()
        scaling = layer.scaling["default"]
        # The initial adapter, saved as peft's conversion needs it.
        init_dir = os.path.join(tmp, "init")
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(init_dir)
        model.peft_config["default"].init_lora_weights = "pissa"
        # "Training": a deterministic change of A and B.
        with torch.no_grad():
            layer.lora_A["default"].weight.add_(0.01 * torch.randn_like(a0))
            layer.lora_B["default"].weight.add_(0.01 * torch.randn_like(b0))
        a = layer.lora_A["default"].weight.detach().clone()
        b = layer.lora_B["default"].weight.detach().clone()
        conv_dir = os.path.join(tmp, "converted")
        model.save_pretrained(conv_dir, path_initial_model_for_weight_conversion=init_dir)
        conv = load_file(os.path.join(conv_dir, "adapter_model.safetensors"))
        conv_cfg = json.load(open(os.path.join(conv_dir, "adapter_config.json")))
    a_conv = next(v for key, v in conv.items() if "lora_A" in key)
    b_conv = next(v for key, v in conv.items() if "lora_B" in key)
    meta = dict(n=n, k=k, r=r, alpha=alpha, rslora=rslora, scaling=scaling,
                conv_r=conv_cfg["r"], conv_alpha=conv_cfg["lora_alpha"],
                torch=torch.__version__, peft=__import__("peft").__version__)
    name = f"peft_pissa_{n}x{k}_r{r}{'_rslora' if rslora else ''}.safetensors"
    path = os.path.join(out_dir, name)
    tensors = dict(W=w, A0=a0, B0=b0, W_res=w_res, A=a, B=b, A_conv=a_conv, B_conv=b_conv)
    save_file({key: v.contiguous() for key, v in tensors.items()}, path, metadata={"meta": json.dumps(meta)})
    return path


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "peer")
    for rslora in (False, True):
        print(make(out_dir, 48, 80, 8, 16.0, rslora))


if __name__ == "__main__":
    main()
