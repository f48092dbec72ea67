"""patch()/unpatch() on a small peft Llama on the CPU: the patched model's loss and
gradients equal peft's own, the model saves and loads as before, uncovered
configurations fall back to peft with a warning."""

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_kernels  # noqa: E402
from conftest import EPS, rel_err  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def peft_model(dtype, dropout=0.0, **kw):
    model = tiny_llama(dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                          init_lora_weights=False, **kw)
    pm = peft.get_peft_model(model, cfg)
    # Perturb DoRA's magnitude too, so that g ≠ 1 is exercised.
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return pm


def loss_and_grads(pm, ids):
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_matches_peft(variant, dtype):
    kw = {"use_rslora": True} if variant == "rslora" else {"use_dora": True} if variant == "dora" else {}
    pm = peft_model(dtype, **kw)
    ids = torch.randint(0, 128, (2, 11))
    # The truth: the same model (the same bf16 values) in float32 through peft.
    truth = copy.deepcopy(pm).float()
    loss_t, g_t = loss_and_grads(truth, ids)
    loss0, g0 = loss_and_grads(pm, ids)
    n = lora_kernels.patch(pm)
    assert n == 2 * len(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen here
        loss1, g1 = loss_and_grads(pm, ids)
    assert g0.keys() == g1.keys() == g_t.keys() and len(g0) > 0
    if dtype == torch.float32:
        # Both round each product to float32 once (the oracle accumulates in float64).
        assert abs(loss1.item() - loss0.item()) <= 1e-5 * abs(loss0.item())
        for name in g0:
            err = rel_err(g1[name], g0[name])
            assert err <= 1e-4, f"{name}: gradient relative error {err:.2e}"
    else:
        # bf16 rounds at every layer on both sides, in different places (peft runs the
        # adapters in float32 by default, the ops in bf16 with float32 accumulation): the
        # patched model must be about as close to the float32 truth as peft is.
        eps = EPS[dtype]
        e_ours, e_peft = abs(loss1.item() - loss_t.item()), abs(loss0.item() - loss_t.item())
        assert e_ours <= 2 * e_peft + 4 * eps * abs(loss_t.item()), (e_ours, e_peft)
        for name in g0:
            e_ours, e_peft = rel_err(g1[name], g_t[name]), rel_err(g0[name], g_t[name])
            assert e_ours <= 2 * e_peft + 8 * eps, f"{name}: {e_ours:.2e} vs peft's {e_peft:.2e}"
    assert lora_kernels.unpatch(pm) == n
    loss2, _ = loss_and_grads(pm, ids)
    assert loss2.item() == loss0.item()


def test_dropout_trains_and_eval_is_deterministic():
    pm = peft_model(torch.float32, dropout=0.1)
    lora_kernels.patch(pm)
    ids = torch.randint(0, 128, (2, 9))
    pm.train()
    torch.manual_seed(1)
    l1, g1 = loss_and_grads(pm, ids)
    torch.manual_seed(1)
    l2, _ = loss_and_grads(pm, ids)
    torch.manual_seed(2)
    l3, _ = loss_and_grads(pm, ids)
    assert l1.item() == l2.item(), "same torch seed, same dropout masks"
    assert l1.item() != l3.item(), "another seed, other masks"
    assert all(torch.isfinite(g).all() for g in g1.values())
    pm.eval()
    with torch.no_grad():
        e_ours = pm(input_ids=ids).logits
        lora_kernels.unpatch(pm)
        e_peft = pm(input_ids=ids).logits
    assert rel_err(e_ours, e_peft) < 1e-5


def test_save_and_load_unchanged(tmp_path):
    pm = peft_model(torch.float32)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    lora_kernels.patch(pm)
    assert pm.state_dict().keys() == before.keys()
    pm.save_pretrained(tmp_path)
    base = tiny_llama(torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_fallbacks_warn_once_and_stay_correct():
    pm = peft_model(torch.float32)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        lora_kernels.patch(pm)
        lora_kernels.reset_warnings()
        with pm.disable_adapter():
            with pytest.warns(RuntimeWarning, match="adapters are disabled"):
                base = pm(input_ids=ids).logits
        assert not torch.allclose(base, ref)
        assert lora_kernels.fallbacks(pm) == {"adapters are disabled": 2 * len(TARGETS)}
        pm.merge_adapter()
        with pytest.warns(RuntimeWarning, match="the adapter is merged"):
            merged = pm(input_ids=ids).logits
        torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)
        pm.unmerge_adapter()
        # Two active adapters are not covered: peft runs them.
        pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                 init_lora_weights=False))
        pm.base_model.set_adapter(["default", "second"])
        with pytest.warns(RuntimeWarning, match="2 active adapters"):
            two = pm(input_ids=ids).logits
        lora_kernels.unpatch(pm)
        torch.testing.assert_close(two, pm(input_ids=ids).logits)


def test_patch_is_idempotent_and_counts():
    pm = peft_model(torch.float32)
    n = lora_kernels.patch(pm)
    assert lora_kernels.patch(pm) == 0
    assert lora_kernels.is_patched(pm.base_model.model.model.layers[0].mlp.up_proj)
    assert lora_kernels.unpatch(pm) == n
    assert lora_kernels.unpatch(pm) == 0
    assert not lora_kernels.is_patched(pm.base_model.model.model.layers[0].mlp.up_proj)


def test_patched_model_under_torch_compile():
    pm = peft_model(torch.float32)
    ids = torch.randint(0, 128, (2, 9))
    lora_kernels.patch(pm)
    loss0, g0 = loss_and_grads(pm, ids)
    compiled = torch.compile(pm, backend="aot_eager")
    with lora_kernels.ops.record_plans() as plans:
        loss1, g1 = loss_and_grads(compiled, ids)
    # The ops ran (through the registered custom ops, traced with their fake kernels).
    assert plans and all(plan == "cpu" for _, plan in plans)
    assert abs(loss1.item() - loss0.item()) <= 1e-5 * abs(loss0.item())
    g1 = {n.removeprefix("_orig_mod."): g for n, g in g1.items()}
    assert g1.keys() == g0.keys()
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 1e-4, name


def test_neftune_patch():
    pm = peft_model(torch.float32)
    emb = pm.get_input_embeddings()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        plain = emb(ids)
    n = lora_kernels.patch(pm, neftune_alpha=5.0)
    assert n == 2 * len(TARGETS) + 1
    pm.train()
    with torch.no_grad():
        noisy = emb(ids)
    mag = 5.0 / (9 * 64) ** 0.5
    diff = (noisy - plain).abs()
    assert 0 < diff.max().item() <= mag * (1 + 1e-5)
    pm.eval()
    with torch.no_grad():
        assert torch.equal(emb(ids), plain)
    pm.train()
    loss, grads = loss_and_grads(pm, ids)  # trains through the noisy embedding
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert lora_kernels.fallbacks(pm) == {}
    lora_kernels.unpatch(pm)
    with torch.no_grad():
        assert torch.equal(emb(ids), plain)
    with pytest.raises(ValueError, match="neftune_alpha"):
        lora_kernels.patch(pm, neftune_alpha=float("nan"))


def quantize_linears(model, compute_dtype):
    """Every decoder linear of ``model`` replaced by bitsandbytes' NF4 ``Linear4bit``
    (double quantization), quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(mod, name, q.to("cpu"))
    return model


@pytest.mark.parametrize("variant", ["qlora", "qdora"])
def test_patched_4bit_model_matches_peft(variant):
    """QLoRA / QDoRA over bitsandbytes' Linear4bit on the CPU (bitsandbytes' CPU
    backend; compute dtype float32): the patched model against peft's."""
    model = quantize_linears(tiny_llama(torch.float32), torch.float32)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                          use_dora=variant == "qdora")
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 11))
    loss0, g0 = loss_and_grads(pm, ids)
    assert lora_kernels.patch(pm) == 2 * len(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss1, g1 = loss_and_grads(pm, ids)
    assert lora_kernels.fallbacks(pm) == {}
    assert abs(loss1.item() - loss0.item()) <= 1e-5 * abs(loss0.item())
    for name in g0:
        err = rel_err(g1[name], g0[name])
        assert err <= 1e-4, f"{name}: gradient relative error {err:.2e}"
