"""LoRA against PEFT: same outputs given the same weights, and adapters loadable both ways."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from unitune.methods import io, lora
from unitune.methods.lora import Config

X = torch.randint(3, 300, (2, 17))


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomize(model):
    """LoRA B starts at zero; give every adapter weight a value so the comparison means something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("fixture,targets,rslora", [("tiny_llama", "all-linear", False),
                                                    ("tiny_llama", ["q_proj", "v_proj"], True),
                                                    ("tiny_gpt2", ["c_attn", "c_fc"], False)])
def test_saved_adapter_loads_in_peft_with_same_logits(request, tmp_path, fixture, targets, rslora):
    path = request.getfixturevalue(fixture)
    cfg = Config(r=4, alpha=8, target_modules=targets, rslora=rslora)
    ours = _randomize(lora.apply(_load(path), cfg))
    io.save_adapter(ours, tmp_path / "adapter", cfg, str(path))
    theirs = PeftModel.from_pretrained(_load(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(X).logits, _load(path)(X).logits, atol=1e-3)  # the adapter does something


def test_peft_adapter_loads_in_unitune(tiny_llama, tmp_path):
    peft_model = get_peft_model(_load(tiny_llama), LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "down_proj"],
                                                              use_rslora=True))
    _randomize(peft_model).save_pretrained(tmp_path / "peft")
    ours = io.load_adapter(_load(tiny_llama), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, peft_model(X).logits, atol=1e-5, rtol=1e-5)


def test_merge_and_disable(tiny_llama):
    model = _randomize(lora.apply(_load(tiny_llama), Config(r=4, target_modules="all-linear")))
    base = _load(tiny_llama)
    with torch.no_grad():
        tuned = model(X).logits
        with lora.disabled(model):
            torch.testing.assert_close(model(X).logits, base(X).logits)
        layer = lora.lora_layers(model)[0][1]
        layer.merge(), layer.unmerge()
        torch.testing.assert_close(model(X).logits, tuned, atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload(model)
        assert not lora.lora_layers(merged)
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-5)


def test_targets_and_freezing(tiny_llama):
    model = lora.apply(_load(tiny_llama), Config(target_modules="all-linear"))
    names = [n for n, _ in lora.lora_layers(model)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="matches no layer.*q_proj"):
        lora.apply(_load(tiny_llama), Config(target_modules=["query"]))


def test_adapter_that_does_not_fit_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    cfg = Config(r=4, target_modules=["q_proj"])
    io.save_adapter(lora.apply(_load(tiny_llama), cfg), tmp_path / "a", cfg, "x")
    with pytest.raises(ValueError, match="matches no layer"):
        io.load_adapter(_load(tiny_gpt2), tmp_path / "a")


def test_merged_path_gradients_match_the_textbook_form(tiny_gpt2, tiny_llama):
    """The one-matmul forward with hand-written backward gives the same values and gradients."""
    for path in (tiny_llama, tiny_gpt2):
        fast = _randomize(lora.apply(_load(path), Config(r=4, target_modules="all-linear"))).train()
        slow = _randomize(lora.apply(_load(path), Config(r=4, target_modules="all-linear", dropout=1e-9))).train()
        outs = []
        for m in (fast, slow):
            for mod in m.modules():  # GPT-2's own dropout off; LoRA's nn.Dropout keeps `slow` on the textbook path
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
            out = m(X).logits
            (out.square().mean()).backward()
            outs.append((out, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
        for n in outs[0][1]:
            torch.testing.assert_close(outs[0][1][n], outs[1][1][n], atol=1e-6, rtol=1e-4)


def test_few_tokens_take_the_low_rank_path_and_agree(tiny_llama, monkeypatch):
    """Decoding (a token or two a row) must not rebuild W + s·B·A per step: below in·out/(in+out) tokens
    the layer takes the thin low-rank path; both paths give the same output."""
    model = _randomize(lora.apply(_load(tiny_llama), Config(r=4, target_modules="all-linear"))).eval()
    layer = model.model.layers[0].self_attn.q_proj
    d_out, d_in = layer.base_layer.weight.shape
    few, many = torch.randn(2, 1, d_in), torch.randn(1, d_in * d_out // (d_in + d_out) + 1, d_in)
    assert not layer.merges_for(few) and layer.merges_for(many)
    merges = []
    real = lora._MergedLoRA.apply
    monkeypatch.setattr(lora._MergedLoRA, "apply", lambda *a: merges.append(1) or real(*a))
    with torch.no_grad():
        for x in (few, many):
            low_rank = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
            torch.testing.assert_close(layer(x), low_rank, atol=1e-5, rtol=1e-5)
    assert len(merges) == 1  # the long input only


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_for_generation_folds_each_layer_once_and_leaves_the_weights_exact(request, fixture):
    """Rollouts decode on W + s·B·A built once (the merged model's speed); the base weights are not
    touched, so training goes on from exactly where it was."""
    model = _randomize(lora.apply(_load(request.getfixturevalue(fixture)), Config(r=4, target_modules="all-linear")))
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        want = model(x).logits
        with lora.for_generation(model) as folded:
            assert folded.layers and all(m._folded is not None for m in folded.layers)
            got = model(x).logits
            greedy = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        unfolded = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy, unfolded)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bit-exact, not re-rounded
    assert all("_folded" not in m.__dict__ for m in folded.layers)


def test_dora_norm_is_kept_until_the_weights_change(tiny_llama):
    model = lora.apply(_load(tiny_llama), Config(r=4, target_modules=["q_proj"], dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    first = layer.dora_norm("default")
    assert layer.dora_norm("default") is first  # decoding reuses it
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.5)  # an optimizer step
    w = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(layer.dora_norm("default"), torch.linalg.norm(w, dim=1))
    assert not torch.allclose(layer.dora_norm("default"), first)


def test_loraplus_groups_match_peft(tiny_llama):
    from peft.optimizers import create_loraplus_optimizer

    from unitune.config import TrainConfig
    from unitune.engine.loop import make_optimizer
    from unitune.methods import lr_scale

    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    cfg = Config(r=4, target_modules=targets, loraplus_lr_ratio=16)
    ours_model = lora.apply(_load(tiny_llama), cfg)
    ours = make_optimizer(ours_model, TrainConfig(lr=1e-4), lr_scale(cfg, 1e-4))
    peft_model = get_peft_model(_load(tiny_llama), LoraConfig(r=4, target_modules=targets))
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)

    def lrs(opt, model):
        by_id = {id(p): n.replace("base_model.model.", "").replace(".default", "") for n, p in model.named_parameters()}
        return {by_id[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}

    ours_lrs, their_lrs = lrs(ours, ours_model), lrs(theirs, peft_model)
    assert ours_lrs == pytest.approx(their_lrs, rel=1e-12)
    assert {v for k, v in ours_lrs.items() if "lora_B" in k} == {1.6e-3}
    assert [v for k, v in ours_lrs.items() if "lora_embedding" in k] == pytest.approx([1e-6] * 2)


@pytest.mark.parametrize("fixture,targets", [("tiny_llama", "all-linear"), ("tiny_gpt2", ["c_attn", "c_fc"])])
def test_dora_matches_peft_both_ways_and_merges(request, tmp_path, fixture, targets):
    path = request.getfixturevalue(fixture)
    cfg = Config(r=4, alpha=8, target_modules=targets, dora=True)
    ours = _randomize(lora.apply(_load(path), cfg))  # magnitudes too: they are lora_ parameters
    io.save_adapter(ours, tmp_path / "ours", cfg, str(path))
    theirs = PeftModel.from_pretrained(_load(path), tmp_path / "ours").eval()
    with torch.no_grad():
        tuned = ours(X).logits
        torch.testing.assert_close(tuned, theirs(X).logits, atol=1e-5, rtol=1e-5)
        peft_model = _randomize(get_peft_model(_load(path), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       use_dora=True))).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    back = io.load_adapter(_load(path), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, peft_model(X).logits, atol=1e-5, rtol=1e-5)
        layer = lora.lora_layers(ours)[0][1]
        layer.merge(), layer.unmerge()
        torch.testing.assert_close(ours(X).logits, tuned, atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload(ours)
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # untied on merge, and saved so
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "merged")(X).logits, tuned, atol=1e-5, rtol=1e-5)


def test_dora_starts_at_the_base_model(tiny_llama):
    model = lora.apply(_load(tiny_llama), Config(r=4, target_modules="all-linear", dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, _load(tiny_llama)(X).logits, atol=1e-5, rtol=1e-5)


def test_named_adapters_switch_disable_delete(tiny_llama):
    one, two = Config(r=4, target_modules="all-linear"), Config(r=2, target_modules=["q_proj", "v_proj"], dora=True)
    single_a = _randomize(lora.apply(_load(tiny_llama), one, "a"))
    g = torch.Generator().manual_seed(5)
    model = lora.apply(_load(tiny_llama), one, "a")
    model.load_state_dict(single_a.state_dict())
    model = lora.apply(model, two, "b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".b." in n or n.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        base = _load(tiny_llama)(X).logits
        with_b = model(X).logits
        assert not torch.allclose(with_b, base, atol=1e-3)
        # Only b's parameters train while b is active: its A, B and DoRA magnitude on q and v, nothing else.
        b_params = {f"model.layers.{i}.self_attn.{proj}.{part}" for i in range(2) for proj in ("q_proj", "v_proj")
                    for part in ("lora_A.b.weight", "lora_B.b.weight", "lora_magnitude_vector.b")}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == b_params
        lora.set_adapter(model, "a")
        torch.testing.assert_close(model(X).logits, single_a(X).logits, atol=1e-6, rtol=1e-6)
        with lora.disabled(model):
            torch.testing.assert_close(model(X).logits, base)
        lora.delete_adapter(model, "a")
        with pytest.raises(ValueError, match=r"no adapter named 'a'.*\['b'\]"):
            lora.set_adapter(model, "a")
        lora.set_adapter(model, "b")
        torch.testing.assert_close(model(X).logits, with_b, atol=1e-6, rtol=1e-6)
        lora.delete_adapter(model, "b")
        assert not lora.lora_layers(model)
        torch.testing.assert_close(model(X).logits, base)


@pytest.mark.parametrize("fixture,targets", [("tiny_llama", ["embed_tokens", "q_proj"]), ("tiny_gpt2", ["wte", "c_attn"])])
def test_embedding_lora_matches_peft_both_ways(request, tmp_path, fixture, targets):
    path = request.getfixturevalue(fixture)
    cfg = Config(r=4, alpha=8, target_modules=targets)
    ours = _randomize(lora.apply(_load(path), cfg))
    assert any(isinstance(m, lora.LoRAEmbedding) for _, m in lora.lora_layers(ours))
    io.save_adapter(ours, tmp_path / "ours", cfg, str(path))
    theirs = PeftModel.from_pretrained(_load(path), tmp_path / "ours").eval()
    peft_model = _randomize(get_peft_model(_load(path), LoraConfig(r=4, lora_alpha=8, target_modules=targets))).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    back = io.load_adapter(_load(path), tmp_path / "peft")
    with torch.no_grad():
        tuned = ours.eval()(X).logits
        torch.testing.assert_close(tuned, theirs(X).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(X).logits, peft_model(X).logits, atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload(ours)
        torch.testing.assert_close(merged(X).logits, tuned, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # untied on merge, and saved so
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "merged")(X).logits, tuned, atol=1e-5, rtol=1e-5)


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.proj = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        h = self.proj(torch.relu(self.block(torch.relu(self.stem(x)))))
        return self.fc(h.mean((2, 3)))


def test_conv2d_lora_matches_peft_both_ways_and_merges(tmp_path):
    img = torch.randn(2, 3, 16, 16)
    cfg = Config(r=4, alpha=8, target_modules=["stem", "block", "proj", "fc"])
    ours = _randomize(lora.apply(TinyCNN(), cfg))
    assert {type(m).__name__ for _, m in lora.lora_layers(ours)} == {"LoRAConv2d", "LoRALinear"}
    io.save_adapter(ours, tmp_path / "ours", cfg, "tiny-cnn")
    theirs = PeftModel.from_pretrained(TinyCNN(), tmp_path / "ours").eval()
    with torch.no_grad():
        tuned = ours(img)
        torch.testing.assert_close(tuned, theirs(img), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tuned, TinyCNN()(img), atol=1e-3)
    peft_model = _randomize(get_peft_model(TinyCNN(), LoraConfig(r=4, lora_alpha=8, target_modules=["stem", "proj"])))
    peft_model.save_pretrained(tmp_path / "peft")
    back = io.load_adapter(TinyCNN(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(img), peft_model(img), atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload(ours)
        assert isinstance(merged.block, torch.nn.Conv2d)
        torch.testing.assert_close(merged(img), tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_matches_peft_and_saves_for_the_original_base(tiny_llama, tmp_path, init):
    cfg = Config(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init=init)
    ours = lora.apply(_load(tiny_llama), cfg)
    peft_model = get_peft_model(_load(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                              init_lora_weights=init))
    theirs = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in peft_model.named_parameters()}
    for n, p in ours.named_parameters():  # A, B and the residual base weights
        torch.testing.assert_close(p, theirs[n.replace(".base_layer", "")], atol=1e-5, rtol=1e-4)
    base = _load(tiny_llama)
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, base(X).logits, atol=1e-5, rtol=1e-4)  # step 0 is the base model
        for n, p in ours.named_parameters():  # "train": move A and B away from their start
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
        tuned = ours(X).logits
    io.save_adapter(ours, tmp_path / "a", cfg, str(tiny_llama))
    on_original = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "a").eval()  # rank 2r, plain LoRA
    assert on_original.peft_config["default"].r == 8
    with torch.no_grad():
        torch.testing.assert_close(on_original(X).logits, tuned, atol=1e-5, rtol=1e-4)
        lora.delete_adapter(ours, "default")  # hands the base back what the init took out
        torch.testing.assert_close(ours(X).logits, base(X).logits, atol=1e-5, rtol=1e-4)
