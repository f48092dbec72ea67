"""The ops and patch() on a CUDA GPU: against float64 references and the CPU oracle,
on torch's current stream, inside a CUDA graph, and a patched peft model (LoRA, rsLoRA,
DoRA, and with bitsandbytes QLoRA and QDoRA) against peft itself."""

import copy
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the GPU tests did NOT run", allow_module_level=True)

import lora_kernels  # noqa: E402
from conftest import DTYPES, EPS, assert_close, rel_err  # noqa: E402
from test_ops_cpu import layer, ref_dora, ref_lora  # noqa: E402

L = torch.ops.lora_kernels
DEV = "cuda"

# T = 1 and 7: the one-pass small kernels; 96: cuBLAS; 2048 × 1024: the GEMM core.
SHAPES = [(1, 64, 48, 8), (7, 136, 72, 16), (96, 200, 120, 4), (2048, 1024, 1024, 16)]


def test_built_for_this_gpu():
    info = lora_kernels.build_info()
    assert info["cuda_kernels"], info
    major, minor = torch.cuda.get_device_capability()
    print("build", info, "device", torch.cuda.get_device_name(), (major, minor))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_ops(dtype, shape):
    t, k, n, r = shape
    x, w, a, b, bias = layer(t, k, n, r, dtype, device=DEV)
    s = 2.0
    y, h = L.lora_forward(x, w, a, b, bias, s, 0.0, 0)
    assert_close(y, ref_lora(x, w, a, b, bias, s), dtype, k, "y")
    xr, ar, br = (v.double().requires_grad_() for v in (x, a, b))
    dy = torch.randn(t, n, device=DEV).to(dtype)
    ref_lora(xr, w, ar, br, bias, s).backward(dy.double())
    dx, da, db = L.lora_backward(x, w, a, b, h, dy, s, 0.0, 0)
    assert_close(dx, xr.grad, dtype, n, "dx")
    assert_close(da, ar.grad, dtype, t * n, "da")
    assert_close(db, br.grad, dtype, t, "db")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 136, 72, 16), (600, 512, 1024, 16)])
def test_dora_ops(dtype, shape):
    t, k, n, r = shape
    x, w, a, b, bias = layer(t, k, n, r, dtype, device=DEV)
    m = (torch.rand(n, device=DEV) + 0.5).to(dtype)
    s = 1.5
    y, h, norm, z = L.dora_forward(x, w, a, b, bias, m, s, 0.0, 0)
    assert_close(y, ref_dora(x, w, a, b, bias, m, s), dtype, k, "y")
    leaves = [v.double().requires_grad_() for v in (x, a, b, m)]
    xr, ar, br, mr = leaves
    dy = torch.randn(t, n, device=DEV).to(dtype)
    ref_dora(xr, w, ar, br, bias, mr, s).backward(dy.double())
    dx, da, db, dm = L.dora_backward(x, w, a, b, m, h, norm, z, dy, s, 0.0, 0)
    assert_close(dx, xr.grad, dtype, n, "dx")
    assert_close(da, ar.grad, dtype, t * n, "da")
    assert_close(db, br.grad, dtype, t * k, "db")
    assert_close(dm, mr.grad, dtype, t * k, "dm")


def test_dropout_matches_the_cpu_oracle_bit_for_bit_in_f32():
    t, k, n, r = 40, 64, 48, 8
    x, w, a, b, bias = layer(t, k, n, r, torch.float32)
    y_c, h_c = L.lora_forward(x, w, a, b, bias, 2.0, 0.25, 77)
    y_g, h_g = L.lora_forward(*(v.to(DEV) for v in (x, w, a, b, bias)), 2.0, 0.25, 77)
    # Same Philox mask on both: h differs only by float32 accumulation order.
    assert torch.equal(h_c != 0, h_g.cpu() != 0)
    torch.testing.assert_close(y_g.cpu(), y_c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neftune_embedding_equals_the_cpu_oracle_bit_for_bit(dtype):
    b, s, v, d = 4, 300, 1000, 256
    table = torch.randn(v, d).to(dtype)
    ids = torch.randint(0, v, (b, s))
    cpu = L.neftune_embedding(ids, table, 5.0, 11)
    gpu = L.neftune_embedding(ids.to(DEV), table.to(DEV), 5.0, 11)
    assert torch.equal(gpu.cpu(), cpu)
    tg = table.to(DEV).requires_grad_()
    dout = torch.randn(b, s, d).to(dtype)
    L.neftune_embedding(ids.to(DEV), tg, 5.0, 11).backward(dout.to(DEV))
    tc = table.clone().requires_grad_()
    L.neftune_embedding(ids, tc, 5.0, 11).backward(dout)
    assert torch.equal(tg.grad.cpu(), tc.grad)


def test_neftune_bad_id_is_reported():
    table = torch.randn(10, 8, device=DEV)
    out = L.neftune_embedding(torch.tensor([[1, 12, 3]], device=DEV), table, 0.0, 0)
    assert torch.equal(out[0, 1], torch.zeros(8, device=DEV))
    with pytest.raises(ValueError, match="12"):
        lora_kernels.ops.take_index_errors()
    lora_kernels.ops.take_index_errors()  # cleared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merges_match_the_cpu_oracle(dtype):
    k, n, r, s = 520, 300, 16, 2.0
    _, w, a, b, _ = layer(1, k, n, r, dtype)
    m = (torch.rand(n) + 0.5).to(dtype)
    wg = w.to(DEV)
    L.lora_merge(wg, a.to(DEV), b.to(DEV), s, False)
    wc = w.clone()
    L.lora_merge(wc, a, b, s, False)
    assert_close(wg.cpu(), wc.float(), dtype, r, "lora merge")
    wg, ng = w.to(DEV), torch.empty(n, device=DEV)
    L.dora_merge(wg, a.to(DEV), b.to(DEV), m.to(DEV), ng, s, False)
    wc, nc = w.clone(), torch.empty(n)
    L.dora_merge(wc, a, b, m, nc, s, False)
    assert_close(ng.cpu(), nc, torch.float32, k, "dora norms")
    assert_close(wg.cpu(), wc.float(), dtype, k, "dora merge")
    L.dora_merge(wg, a.to(DEV), b.to(DEV), m.to(DEV), ng, s, True)
    assert_close(wg.cpu(), w.float(), dtype, k, "dora unmerge")


def bnb_weight(w):
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                          blocksize=64).to(DEV)
    return bnb, p


def nf4_args(p):
    qs = p.quant_state
    return (p.data, qs.absmax, qs.state2.absmax, qs.state2.code, float(qs.offset), qs.blocksize, qs.shape[0])


@pytest.mark.parametrize("shape", [(1, 256, 128, 16), (24, 512, 384, 8), (1024, 1024, 2048, 16)])
def test_qlora_and_qdora_on_bitsandbytes_tensors(shape):
    t, k, n, r = shape
    dtype = torch.bfloat16
    x, w, a, b, bias = layer(t, k, n, r, dtype, device=DEV)
    bnb, p = bnb_weight(w)
    wd = bnb.functional.dequantize_4bit(p.data, p.quant_state).to(dtype)
    nf = nf4_args(p)
    y, h = L.qlora_forward(x, *nf, a, b, bias, 2.0, 0.0, 0)
    assert_close(y, ref_lora(x, wd, a, b, bias, 2.0), dtype, k, "y")
    dy = torch.randn(t, n, device=DEV).to(dtype)
    dx, da, db = L.qlora_backward(x, *nf, a, b, h, dy, 2.0, 0.0, 0)
    dx2, da2, db2 = L.lora_backward(x, wd, a, b, h, dy, 2.0, 0.0, 0)
    assert_close(dx, dx2.float(), dtype, n, "dx")
    assert_close(da, da2.float(), dtype, t * n, "da")
    assert_close(db, db2.float(), dtype, t, "db")
    m = (torch.rand(n, device=DEV) + 0.5).to(dtype)
    yq = L.qdora_forward(x, *nf, a, b, bias, m, 2.0, 0.0, 0)[0]
    assert_close(yq, ref_dora(x, wd, a, b, bias, m, 2.0), dtype, k, "qdora y")


def test_runs_on_torch_current_stream_and_in_a_cuda_graph():
    t, k, n, r = 256, 512, 512, 16
    x, w, a, b, bias = layer(t, k, n, r, torch.bfloat16, device=DEV)
    dy = torch.randn(t, n, device=DEV, dtype=torch.bfloat16)
    y0, h0 = L.lora_forward(x, w, a, b, bias, 2.0, 0.0, 0)
    g0 = L.lora_backward(x, w, a, b, h0, dy, 2.0, 0.0, 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # The first call on a stream sets up its state (cuBLAS handle, flags): before capture.
        y1, h1 = L.lora_forward(x, w, a, b, bias, 2.0, 0.0, 0)
        g1 = L.lora_backward(x, w, a, b, h1, dy, 2.0, 0.0, 0)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y0, y1) and all(torch.equal(u, v) for u, v in zip(g0, g1))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        yg, hg = L.lora_forward(x, w, a, b, bias, 2.0, 0.0, 0)
        gg = L.lora_backward(x, w, a, b, hg, dy, 2.0, 0.0, 0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y2, h2 = L.lora_forward(x, w, a, b, bias, 2.0, 0.0, 0)
    g2 = L.lora_backward(x, w, a, b, h2, dy, 2.0, 0.0, 0)
    assert torch.equal(yg, y2) and all(torch.equal(u, v) for u, v in zip(gg, g2))


# ---- patched peft models ----------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def lora_cfg(**kw):
    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                           init_lora_weights=False, **kw)


def perturb_magnitudes(pm):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))


def loss_and_grads(pm, ids):
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().float().clone()
                                       for n, p in pm.named_parameters() if p.requires_grad}


def quantized(model):
    """model with every decoder linear replaced by bitsandbytes' NF4 Linear4bit
    (double quantization, bf16 compute), and a dense float32 twin whose weights are the
    dequantized NF4 values."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = copy.deepcopy(model).float()
    for (name, mod), (_, dmod) in zip(list(model.named_modules()), list(dense.named_modules())):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(mod, child_name, q)
    model = model.to(DEV)
    for (name, mod), (_, dmod) in zip(list(model.named_modules()), list(dense.named_modules())):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                wd = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                getattr(dmod, child_name).weight.data.copy_(wd.float().cpu())
    return model, dense.to(DEV)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "qlora", "qdora"])
def test_patched_model_matches_peft(variant):
    kw = {"use_rslora": True} if variant == "rslora" else {"use_dora": True} if "dora" in variant else {}
    model = small_llama()
    if variant.startswith("q"):
        model, truth_base = quantized(model)
    else:
        model = model.to(DEV)
        truth_base = copy.deepcopy(model).float()
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, lora_cfg(**kw))
    perturb_magnitudes(pm)
    truth = peft.get_peft_model(truth_base, lora_cfg(**kw))
    adapters = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    missing = truth.load_state_dict({k: v.float() for k, v in adapters.items()}, strict=False)
    assert not missing.unexpected_keys
    ids = torch.randint(0, 512, (2, 128), device=DEV)
    lt, gt = loss_and_grads(truth, ids)
    l0, g0 = loss_and_grads(pm, ids)
    assert lora_kernels.patch(pm) == 2 * len(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l1, g1 = loss_and_grads(pm, ids)
    eps = EPS[torch.bfloat16]
    e_ours, e_peft = abs(l1 - lt).item(), abs(l0 - lt).item()
    print(f"{variant}: loss truth {lt.item():.5f} peft {l0.item():.5f} ours {l1.item():.5f}")
    assert e_ours <= 2 * e_peft + 4 * eps * abs(lt.item())
    assert g0.keys() == g1.keys() and len(g0) > 0
    worst = 0.0
    for name in g0:
        eo, ep = rel_err(g1[name], gt[name]), rel_err(g0[name], gt[name])
        worst = max(worst, eo / max(ep, 1e-12))
        assert eo <= 2 * ep + 8 * eps, f"{name}: {eo:.2e} vs peft's {ep:.2e}"
    print(f"{variant}: worst gradient error ratio ours/peft against the float32 truth {worst:.2f}")
    lora_kernels.unpatch(pm)


def test_bad_device_is_refused():
    x, w, a, b, bias = layer(4, 16, 8, 2, torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="w is on cpu, x on cuda"):
        L.lora_forward(x, w.cpu(), a, b, bias, 1.0, 0.0, 0)


def test_patched_model_under_inductor():
    model = small_llama().to(DEV)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, lora_cfg())
    lora_kernels.patch(pm)
    ids = torch.randint(0, 512, (2, 128), device=DEV)
    l0, g0 = loss_and_grads(pm, ids)
    compiled = torch.compile(pm)
    with lora_kernels.ops.record_plans() as plans:
        l1, g1 = loss_and_grads(compiled, ids)
    assert plans, "the compiled model ran no lora_kernels op"
    assert abs(l1.item() - l0.item()) <= 1e-2 * abs(l0.item())
    g1 = {n.removeprefix("_orig_mod."): g for n, g in g1.items()}
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 0.1, name
