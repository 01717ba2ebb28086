"""QLoRA: our NF4 bytes are bitsandbytes' bytes, and LoRA trains on the 4-bit base as on its dequantized copy."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from unitune.methods import io, lora, qlora
from unitune.methods.quant import QuantEmbedding, QuantLinear, QuantWeight

bnb = pytest.importorskip("bitsandbytes.functional")
X = torch.randint(3, 300, (2, 17))


@pytest.mark.parametrize("shape,double_quant", [((96, 64), True), ((50, 37), True), ((128, 256), False)])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
    ours = QuantLinear(w, None, blocksize=64, double_quant=double_quant)
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


def test_8bit_bytes_match_bitsandbytes_blockwise():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(3)) * 0.02
    ours = QuantLinear(w, None, blocksize=64, double_quant=False, bits=8)
    codes, state = bnb.quantize_blockwise(w, blocksize=64)
    torch.testing.assert_close(ours.absmax, state.absmax)
    steps = (ours.packed.int() - codes.reshape(-1).int()).abs()  # the same CPU-kernel boundary rounding as above
    assert steps.max() <= 1 and steps.float().mean() < 0.02
    same = steps == 0
    theirs = bnb.dequantize_blockwise(codes, state).reshape(-1)
    torch.testing.assert_close(ours.dequantize().reshape(-1)[same], theirs[same])
    assert (ours.dequantize() - w).abs().max() < 0.02 * w.abs().max()  # 8 bits: close


def test_whole_frozen_base_is_under_035x_bf16(tiny_llama):
    def frozen(embeddings):
        model = qlora.apply(_load(tiny_llama), qlora.Config(r=4, target_modules="all-linear", embeddings=embeddings))
        nbytes, weights = qlora.quantized_bytes(model)
        rest = [p for p in model.parameters() if not p.requires_grad]
        return model, nbytes + sum(p.numel() * p.element_size() for p in rest), weights + sum(p.numel() for p in rest)

    model, nf4_bytes, weights = frozen("nf4")
    assert weights == sum(p.numel() for p in _load(tiny_llama).parameters())  # every base weight counted once
    assert nf4_bytes <= 0.35 * 2 * weights
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and ".lora_" not in n
                   for n, m in model.named_modules())
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert model.get_output_embeddings() is model.get_input_embeddings()  # tied: one quantized table
    model, int8_bytes, _ = frozen("int8")
    assert model.get_input_embeddings().bits == 8 and nf4_bytes < int8_bytes <= 0.4 * 2 * weights
    kept, kept_bytes, _ = frozen("keep")
    assert type(kept.get_input_embeddings()) is torch.nn.Embedding and type(kept.lm_head) is torch.nn.Linear
    assert kept_bytes > int8_bytes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [128, 48])  # rows made of whole blocks (row-wise lookup) or not
def test_embedding_rows_and_head_match_the_dequantized_table(dim, bits):
    base = torch.nn.Embedding(300, dim)
    table = QuantEmbedding(base, bits=bits)
    ids, h = torch.randint(0, 300, (3, 7)), torch.randn(3, 7, dim)
    w = table.dequantize()
    assert (w - base.weight).abs().max() < (0.25 if bits == 4 else 0.02) * base.weight.abs().max()
    torch.testing.assert_close(table(ids), torch.nn.functional.embedding(ids, w), atol=0, rtol=0)
    torch.testing.assert_close(table(h), h @ w.T)
    torch.testing.assert_close(table.to_embedding()(ids), table(ids), atol=0, rtol=0)


def test_dtype_casts_keep_the_quantized_state():
    table, ids = QuantEmbedding(torch.nn.Embedding(300, 128)), torch.randint(0, 300, (2, 5))
    rows, state = table(ids), {k: v.clone() for k, v in table.state_dict().items()}
    table.to(torch.bfloat16)
    assert all(torch.equal(v, state[k]) for k, v in table.state_dict().items())  # scales still fp32, unchanged
    torch.testing.assert_close(table(ids), rows.to(torch.bfloat16), atol=0, rtol=0)
    assert table(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert table.to_embedding().weight.dtype == torch.bfloat16


def test_scaled_embeddings_keep_their_scale():
    gemma = Gemma3TextScaledWordEmbedding(300, 64, 0, embed_scale=64**0.5)
    table = QuantEmbedding(gemma)
    with torch.no_grad():
        gemma.weight.copy_(table.dequantize())
    ids = torch.randint(0, 300, (2, 5))
    torch.testing.assert_close(table(ids), gemma(ids))
    torch.testing.assert_close(table.to_embedding()(ids), gemma(ids))


def test_untied_head_is_its_own_nf4_layer_and_dequantizes_back():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    qlora.quantize_base(model, qlora.Config(embeddings="nf4"))
    assert type(model.lm_head) is QuantLinear and isinstance(model.model.embed_tokens, QuantEmbedding)
    with torch.no_grad():
        logits = model(X).logits
        plain = qlora.dequantize_model(model)
        assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight is not plain.model.embed_tokens.weight
        torch.testing.assert_close(plain(X).logits, logits, atol=1e-5, rtol=1e-4)


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
    rounded = _load(tiny_llama)  # the base with its weights through NF4 and back
    qlora.quantize_base(rounded, cfg)
    peft_model = PeftModel.from_pretrained(qlora.dequantize_model(rounded), tmp_path / "a")
    with torch.no_grad():
        tuned = ours(X).logits
        torch.testing.assert_close(peft_model.eval()(X).logits, tuned, atol=1e-5, rtol=1e-4)
        with pytest.raises(RuntimeError, match="quantized base"):
            lora.lora_layers(ours)[0][1].merge()
        merged = io.merge_and_unload(ours)
        assert not any(isinstance(m, QuantWeight) for m in merged.modules())
        assert merged.lm_head.weight is merged.model.embed_tokens.weight  # tied again
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequantize_uses_bitsandbytes_with_the_same_result():
    w = torch.randn(256, 192, device="cuda") * 0.02
    layer = QuantLinear(w, None)
    torch.testing.assert_close(layer.dequantize(), layer.dequantize_torch(), atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 192, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_torch().sum(0).expand(3, -1), atol=1e-4, rtol=1e-4)
    table, ids = QuantEmbedding(torch.nn.Embedding(500, 128, device="cuda")), torch.randint(0, 500, (4, 9), device="cuda")
    torch.testing.assert_close(table(ids), table.cpu()(ids.cpu()).cuda(), atol=1e-6, rtol=1e-5)
