"""QLoRA: our NF4 bytes are bitsandbytes' bytes, the base quantized as it loads equals the base loaded
then quantized (and stays near its quantized size on a 1B model), and LoRA trains on the 4-bit base as
on its dequantized copy."""
import functools
import json
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import init_empty_weights
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
from transformers.pytorch_utils import Conv1D

from unitune import api
from unitune.config import ModelConfig, RecipeError, load_recipe
from unitune.methods import io, layer_quantizer, lora, method_config, qlora, quant
from unitune.methods.quant import QuantEmbedding, QuantLinear, QuantWeight, dequantize_model
from unitune.models import load_model

bnb = pytest.importorskip("bitsandbytes.functional")
X = torch.randint(3, 300, (2, 17))


@pytest.mark.parametrize("shape,double_quant,blocksize", [((96, 64), True, 64), ((50, 37), True, 64),
                                                          ((128, 256), False, 64), ((64, 96), True, 32),
                                                          ((96, 128), False, 4096)])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
    ours = QuantLinear(w, None, blocksize=blocksize, double_quant=double_quant)
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
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


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_in_chunks_changes_no_byte(bits, monkeypatch):
    w = torch.randn(300, 201, generator=torch.Generator().manual_seed(0)) * 0.02  # ends in a short block
    whole = QuantLinear(w, None, bits=bits)
    monkeypatch.setattr(quant, "_CHUNK", 1000)  # 15 blocks of 64 a chunk
    chunked = QuantLinear(w, None, bits=bits)
    assert all(torch.equal(a, b) for a, b in zip(whole.buffers(), chunked.buffers(), strict=True))


def test_blocksize_is_one_bitsandbytes_takes():
    with pytest.raises(RecipeError, match=r"'method.blocksize': .*64, 128, 256, 512, 1024, 2048, 4096"):
        method_config({"name": "qlora", "blocksize": 48})
    with pytest.raises(RecipeError, match="set embeddings: nf4 or keep for 32"):  # 8-bit blocks start at 64
        method_config({"name": "qlora", "blocksize": 32})
    assert method_config({"name": "qlora", "blocksize": 32, "embeddings": "nf4"}).blocksize == 32
    with pytest.raises(RecipeError, match=r"one of 32, 64, .*, 4096: the sizes bitsandbytes' quantize_4bit takes"):
        method_config({"name": "qlora", "blocksize": 8192, "embeddings": "keep"})


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
        plain = dequantize_model(model)
        assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight is not plain.model.embed_tokens.weight
        torch.testing.assert_close(plain(X).logits, logits, atol=1e-5, rtol=1e-4)


def _rounded(path, cfg):
    """The base with its weights through NF4 (8 bits for the embeddings) and back: full-precision layers."""
    return dequantize_model(qlora.quantize_base(_load(path), cfg))


@pytest.mark.parametrize("fixture,options", [
    ("tiny_llama", {"target_modules": "all-linear"}),
    ("tiny_gpt2", {"target_modules": "all-linear", "dora": True}),  # Conv1D: weights stored (in, out)
    ("tiny_llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),  # LoRA on the quantized tied table
], ids=["llama", "gpt2-dora", "llama-embedding"])
def test_trains_like_lora_on_the_dequantized_base_and_saves_for_peft(fixture, options, request, tmp_path):
    path = request.getfixturevalue(fixture)
    cfg = qlora.Config(r=4, alpha=8, **options)
    ours, reference = _load(path), _rounded(path, cfg)
    torch.manual_seed(1)
    ours = qlora.apply(ours, cfg)
    # The reference: plain LoRA (DoRA) on a model whose weights are the dequantized ones, built apart.
    torch.manual_seed(1)
    reference = lora.apply(reference, qlora.lora_config(cfg))
    start = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert start.keys() == {n for n, p in ours.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():  # same init: DoRA's magnitudes are the dequantized rows' norms
        if p.requires_grad:
            torch.testing.assert_close(p, start[n], atol=1e-6, rtol=1e-5)
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
    io.save_adapter(ours, tmp_path / "a", cfg, str(path))
    peft_model = PeftModel.from_pretrained(_rounded(path, cfg), tmp_path / "a")
    with torch.no_grad():
        tuned = ours(X).logits
        torch.testing.assert_close(reference(X).logits, tuned, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(peft_model.eval()(X).logits, tuned, atol=1e-5, rtol=1e-4)
        with pytest.raises(RuntimeError, match="quantized base"):
            lora.lora_layers(ours)[0][1].merge()
        merged = io.merge_and_unload(ours)
        assert not any(isinstance(m, QuantWeight) for m in merged.modules())
        tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
        assert tied == ("embed_tokens" not in options["target_modules"])  # the trained table is the input's only
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-4)
        merged.save_pretrained(tmp_path / "merged")  # GPT-2's layers go back as Conv1D, which it reloads
        assert fixture != "tiny_gpt2" or isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
        torch.testing.assert_close(_load(tmp_path / "merged")(X).logits, tuned, atol=1e-5, rtol=1e-4)


def _quantizer(cfg):
    return functools.partial(qlora.layer_quantizer, cfg)


@pytest.fixture(scope="module")
def sharded_untied_bf16(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sharded")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return path


@pytest.mark.parametrize("fixture,options", [
    ("tiny_llama", {}),  # the tied table and head one 8-bit table
    ("tiny_llama", {"embeddings": "keep"}),  # the tied table at full precision, still shared
    ("sharded_untied_bf16", {"dora": True, "embeddings": "nf4"}),  # shards, a bf16 file cast to fp32, its own head
    ("tiny_gpt2", {"init": "pissa"}),  # Conv1D; the targets load at full precision for the split
], ids=["llama", "llama-keep", "sharded-bf16-untied", "gpt2-pissa"])
def test_quantized_while_loading_equals_quantized_after(fixture, options, request, capsys):
    path = request.getfixturevalue(fixture)
    cfg = qlora.Config(r=4, target_modules="all-linear", **options)
    models = []
    for quantize in (None, _quantizer(cfg)):
        loaded = load_model(ModelConfig(name=str(path)), quantize=quantize)
        torch.manual_seed(1)
        models.append(qlora.apply(loaded.model, cfg))
    assert "unitune:" not in capsys.readouterr().out  # layer by layer, not the whole-model fallback
    after, streamed = models
    expected, state = after.state_dict(), streamed.state_dict()
    assert state.keys() == expected.keys()
    assert [k for k in state if not torch.equal(state[k], expected[k])] == []  # NF4 bytes, scales, norms, adapters
    head, table = streamed.get_output_embeddings(), streamed.get_input_embeddings()
    assert (head is table or head.weight is table.weight) == (fixture != "sharded_untied_bf16")
    assert streamed.generation_config.eos_token_id == after.generation_config.eos_token_id and not streamed.training
    with torch.no_grad():
        assert torch.equal(streamed(X).logits, after(X).logits)


def test_loading_holds_one_full_precision_layer_at_a_time(tiny_llama):
    held = []

    def quantizer(model):
        quantize = qlora.layer_quantizer(qlora.Config(), model)

        def spy(name, layer):
            held.append(len({id(p) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                             for p in m.parameters(recurse=False) if not p.is_meta}))
            return quantize(name, layer)

        return spy

    model = load_model(ModelConfig(name=str(tiny_llama)), quantize=quantizer).model
    assert len(held) == 2 * 9 + 3 and max(held) == 1  # 2 blocks of 7 linears and 2 norms; table, tied head, norm
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert isinstance(model.lm_head, QuantEmbedding) and model.lm_head is model.model.embed_tokens


def test_renamed_tensors_load_whole_with_a_notice(tiny_llama, tmp_path, capsys):
    shutil.copytree(tiny_llama, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")  # saved without the base model's prefix, which
    # transformers maps back and the layer-by-layer reader leaves to it
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "m" / "model.safetensors")
    loaded = load_model(ModelConfig(name=str(tmp_path / "m")), quantize=_quantizer(qlora.Config()))
    assert "tensor names that are not the model's (model.embed_tokens.weight is missing)" in capsys.readouterr().out
    assert not any(isinstance(m, QuantWeight) for m in loaded.model.modules())  # whole; qlora.apply quantizes it
    with torch.no_grad():
        assert torch.equal(loaded.model(X).logits, _load(tiny_llama)(X).logits)


def test_prepare_loads_a_qlora_base_quantized(tiny_recipe, monkeypatch):
    asked = []
    monkeypatch.setattr(api, "load_model", lambda cfg, device, quantize=None, *rest: asked.append(quantize) or load_model(
        cfg, device, quantize, *rest))
    tiny_recipe["method"] = {"name": "qlora", "r": 4, "target_modules": "all-linear"}
    loaded, _ = api.prepare(load_recipe(tiny_recipe), torch.device("cpu"))
    assert asked[0].func is qlora.layer_quantizer and asked[0].args[0].name == "qlora"
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj.base_layer, QuantLinear)
    assert layer_quantizer(method_config({"name": "lora"})) is None  # other methods load as before


def _write_random_model(path, config, tokenizer):
    """A checkpoint of random bf16 weights, one safetensors shard per block, as hub models are sharded,
    written shard by shard so this process never holds the model either."""
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # the head is the table: not in the files, as save_pretrained writes a tied model
    shards: dict[str, list] = {}
    for name, p in model.named_parameters():
        shards.setdefault(name.split(".")[2] if ".layers." in name else "rest", []).append((name, p.shape))
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, params in enumerate(shards.values()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator)
                   for n, shape in params}, path / file)
        weight_map.update(dict.fromkeys([n for n, _ in params], file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.numel() for p in model.parameters())


LOAD_AND_MEASURE = """
import functools, json, sys
from unitune.config import ModelConfig
from unitune.methods import qlora
from unitune.models import load_model
# VmHWM: this process's own peak since exec. ru_maxrss is not: the kernel carries the pre-exec peak over, and
# a child forked (or vforked) from a large pytest process starts with the parent's RSS as its "peak".
peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before = peak()
quantize = functools.partial(qlora.layer_quantizer, qlora.Config())
model = load_model(ModelConfig(name=sys.argv[1]), quantize=quantize).model
print(json.dumps({"before": before, "peak": peak(), "quantized": qlora.quantized_bytes(model)[0]}))
"""


@pytest.mark.slow  # ~35 s on 2 cores: 1.8 GB written, then read and quantized
def test_a_1b_model_loads_within_its_quantized_size_plus_one_layer(tmp_path, tokenizer):
    """Peak RSS while loading a 0.89B Llama for QLoRA, in a fresh process. Measured on 2 CPU cores: 1.36 GiB
    (0.72 of it Python, torch and transformers before any weight; the quantized model 0.46 GiB), where
    loading it whole at fp32 first, as before, peaked at 5.68 GiB."""
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True)
    weights = _write_random_model(tmp_path, config, tokenizer)
    child = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path)], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    m = json.loads(child.stdout.splitlines()[-1])
    assert weights > 0.85e9 and m["quantized"] < 0.3 * 2 * weights  # NF4 blocks and an 8-bit table
    # the quantized model plus the layer in hand (its bf16 read and fp32 copy: 0.28 GB for an MLP matrix)
    assert m["peak"] - m["before"] < m["quantized"] + 0.4 * 2**30
    # under half of what the fp32 model alone takes (an absolute ceiling would also measure the imports'
    # footprint, which moves by megabytes between fresh environments)
    assert m["peak"] < 4 * weights / 2


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
