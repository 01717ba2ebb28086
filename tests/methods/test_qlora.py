"""QLoRA: our NF4 bytes are bitsandbytes' bytes, and LoRA trains on the 4-bit base as on its dequantized copy."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from unitune.methods import io, lora, qlora
from unitune.methods.nf4 import NF4Linear, quantize_model

bnb = pytest.importorskip("bitsandbytes.functional")
X = torch.randint(3, 300, (2, 17))


@pytest.mark.parametrize("shape,double_quant", [((96, 64), True), ((50, 37), True), ((128, 256), False)])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
    ours = NF4Linear(w, None, blocksize=64, double_quant=double_quant)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(ours.packed, packed.reshape(-1))
    if double_quant:
        # bitsandbytes' own CPU kernel may round a scale sitting on an 8-bit level boundary the other way
        # (its CUDA and pure-torch kernels round as we do): allow one level on a few entries.
        steps = (ours.absmax.int() - state.absmax.int()).abs()
        assert steps.max() <= 1 and steps.float().mean() < 0.02
        torch.testing.assert_close(ours.absmax2, state.state2.absmax)
        torch.testing.assert_close(ours.offset, state.offset.reshape(()))
    else:
        torch.testing.assert_close(ours.absmax, state.absmax)
    theirs = bnb.dequantize_4bit(packed, state)
    torch.testing.assert_close(ours.dequantize(), theirs, atol=1e-7, rtol=2e-3)
    assert (ours.dequantize() - w).abs().max() < 0.25 * w.abs().max()  # 4 bits is coarse, not garbage


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_footprint_is_a_quarter_of_bf16(tiny_llama):
    model = qlora.apply(_load(tiny_llama), qlora.Config(r=4, target_modules="all-linear"))
    nbytes, params = qlora.quantized_bytes(model)
    assert params > 0 and nbytes <= 0.35 * 2 * params
    assert not any(isinstance(m, torch.nn.Linear) and "lora_" not in n and "lm_head" not in n
                   for n, m in model.named_modules())


def test_trains_like_lora_on_the_dequantized_base_and_saves_for_peft(tiny_llama, tmp_path):
    cfg = qlora.Config(r=4, alpha=8, target_modules="all-linear")
    torch.manual_seed(1)
    ours = qlora.apply(_load(tiny_llama), cfg)
    # The reference: plain LoRA on a model whose linear weights are the dequantized 4-bit ones.
    reference = qlora.dequantize_model(qlora.apply(_load(tiny_llama), cfg))
    reference.load_state_dict(ours.state_dict(), strict=False)
    for m in (ours, reference):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        m(X).logits.square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    for n, p in ours.named_parameters():
        assert p.requires_grad == (n in grads) and (p.grad is None) == (n not in grads)
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)
    io.save_adapter(ours, tmp_path / "a", cfg, str(tiny_llama))
    rounded = _load(tiny_llama)  # the base with its linear weights through NF4 and back
    quantize_model(rounded, {"lm_head"})
    peft_model = PeftModel.from_pretrained(qlora.dequantize_model(rounded), tmp_path / "a")
    with torch.no_grad():
        tuned = ours(X).logits
        torch.testing.assert_close(peft_model.eval()(X).logits, tuned, atol=1e-5, rtol=1e-4)
        with pytest.raises(RuntimeError, match="quantized base"):
            lora.lora_layers(ours)[0][1].merge()
        merged = io.merge_and_unload(ours)
        assert not any(isinstance(m, NF4Linear) for m in merged.modules())
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequantize_uses_bitsandbytes_with_the_same_result():
    w = torch.randn(256, 192, device="cuda") * 0.02
    layer = NF4Linear(w, None)
    torch.testing.assert_close(layer.dequantize(), layer.dequantize_torch(), atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 192, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_torch().sum(0).expand(3, -1), atol=1e-4, rtol=1e-4)
