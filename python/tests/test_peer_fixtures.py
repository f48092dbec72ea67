"""The ops against the peer fixtures in tests/fixtures/peer (made with peft 0.21 and
bitsandbytes 0.50.2; see its README): on the CPU oracle, and on the GPU when there is one."""

import json
from pathlib import Path

import pytest
import torch

from lora_kernels import ops
from conftest import EPS, assert_close

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

PEER = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "peer"
L = torch.ops.lora_kernels
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load(name):
    path = PEER / f"{name}.safetensors"
    assert path.exists(), f"missing peer fixture {path}"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return safetensors_torch.load_file(str(path)), meta


@pytest.mark.parametrize("device", DEVICES)
def test_peft_lora_fixture(device):
    t, meta = load("peft_lora_48x80_r8")
    f = {k: v.to(device) for k, v in t.items()}
    s = meta["scaling"]
    x, a, b, bias = (f[k].clone().requires_grad_() for k in ("x", "A", "B", "bias"))
    y = L.lora_forward(x, f["W"], a, b, bias, s, 0.0, 0)[0]
    assert_close(y, f["y"], torch.float32, meta["k"], "y")
    y.backward(f["dy"])
    assert_close(x.grad, f["dx"], torch.float32, meta["n"], "dx")
    assert_close(a.grad, f["dA"], torch.float32, meta["T"] * meta["n"], "dA")
    assert_close(b.grad, f["dB"], torch.float32, meta["T"], "dB")


@pytest.mark.parametrize("device", DEVICES)
def test_peft_dora_fixture(device):
    t, meta = load("peft_dora_48x80_r8")
    f = {k: v.to(device) for k, v in t.items()}
    s = meta["scaling"]
    x, a, b, m = (f[k].clone().requires_grad_() for k in ("x", "A", "B", "magnitude"))
    y = L.dora_forward(x, f["W"], a, b, None, m, s, 0.0, 0)[0]
    assert_close(y, f["y"], torch.float32, meta["k"], "y")
    y.backward(f["dy"])
    assert_close(x.grad, f["dx"], torch.float32, meta["n"], "dx")
    assert_close(a.grad, f["dA"], torch.float32, meta["T"] * meta["n"], "dA")
    assert_close(b.grad, f["dB"], torch.float32, meta["T"] * meta["k"], "dB")
    assert_close(m.grad, f["dmagnitude"], torch.float32, meta["T"] * meta["k"], "dmagnitude")


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_fixture_bytes_and_dequantize(dq):
    t, meta = load("nf4_64x128_bs64" + ("_dq" if dq else ""))
    q = ops.nf4_quantize(t["weight_bf16"], blocksize=meta["blocksize"], double_quant=dq)
    assert torch.equal(q["packed"], t["packed"])
    if dq:
        assert torch.equal(q["absmax"], t["absmax_u8"])
        assert torch.equal(q["absmax2"], t["nested_absmax"])
        assert torch.equal(q["code2"], t["nested_code"])
        assert q["offset"] == t["nested_offset"].item()
    else:
        assert torch.equal(q["absmax"], t["absmax_f32"])
    wd = ops.nf4_dequantize(q, (meta["n"], meta["k"]), meta["blocksize"], torch.bfloat16)
    assert torch.equal(wd, t["dequant_bf16"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [False, True])
def test_qlora_fixture_matches_bitsandbytes_matmul(device, dq):
    # bnb.matmul_4bit(x, W) from the fixture = our QLoRA forward with a zero B.
    t, meta = load("nf4_64x128_bs64" + ("_dq" if dq else ""))
    n, k, bs = meta["n"], meta["k"], meta["blocksize"]
    f = {key: v.to(device) for key, v in t.items()}
    if dq:
        nf = (f["packed"], f["absmax_u8"], f["nested_absmax"], f["nested_code"], f["nested_offset"].item(), bs, n)
    else:
        nf = (f["packed"], f["absmax_f32"], None, None, 0.0, bs, n)
    for tokens in (1, 5):
        x = f[f"x_T{tokens}"]
        a = torch.randn(1, k, device=device).to(torch.bfloat16)
        b = torch.zeros(n, 1, device=device, dtype=torch.bfloat16)
        y = L.qlora_forward(x, *nf, a, b, None, 1.0, 0.0, 0)[0]
        # bitsandbytes rounds each dequantized value to bf16 and accumulates in f32 (as
        # the ops do), in another order: a few bf16 roundings of the output.
        err = (y.double() - f[f"y_T{tokens}"].double()).abs().max().item()
        scale = f[f"y_T{tokens}"].double().abs().max().item()
        assert err <= 2 * EPS[torch.bfloat16] * scale, (tokens, err, scale)
