"""grow.py: the official corner copy against an independent restatement, the lossless operator against its
predecessor's logits (every ascending pair, whole chains, fp32), new blocks, symmetry breaking, trainability,
determinism, text-only (GPT-style) growth and the errors. Reduced depth and tiny inputs, real width ratios."""
import functools
import itertools

import pytest
import torch

import grow
import vit
from clip_loss import clip_loss

OFFICIAL = ["nano", "tiny", "small", "medium", "base", "large"]
CPU = ["cpu-tiny", "cpu-small", "cpu-base"]
# reduced image depths that keep the steps that grow depth (base -> large, cpu-small -> cpu-base) growing it
VISION_LAYERS = {"nano": 1, "tiny": 1, "small": 1, "medium": 1, "base": 1, "large": 2,
                 "cpu-tiny": 1, "cpu-small": 1, "cpu-base": 2}


def cfg_of(size, **kw):
    kw = {"image_size": 32, "patch_size": 16, "context_length": 8, "vocab_size": 64, "tokenizer": "byte",
          "vision_layers": VISION_LAYERS[size], "text_layers": 1, **kw}
    return vit.config(size, **kw)


def model_of(cfg, state=None, dtype=torch.float64):
    if state is None:
        return vit.CLIP(cfg).to(dtype).eval()
    with torch.device("meta"):  # no init: the state dict supplies every tensor
        model = vit.CLIP(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_like(size, seed=0, ln_pre_constant=False, **kw):
    """A predecessor with non-trivial weights everywhere (a fresh init has LN gains 1 and zero biases, which
    would hide mistakes in their rules): LN gains 1 + 0.3 N, biases 0.1 N, logit scale ln 50."""
    cfg = cfg_of(size, **kw)
    torch.manual_seed(seed)
    model = model_of(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif ".ln" in name or name.startswith("ln"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.logit_scale.fill_(torch.tensor(50.0).log())
        if ln_pre_constant:
            model.visual.ln_pre.weight.fill_(1.3)
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def fresh(size, **kw):
    cfg = cfg_of(size, **kw)
    torch.manual_seed(123)
    return cfg, model_of(cfg).state_dict()


def batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), generator=g)
    for i in range(B):  # end-of-text (the largest id) at varying positions, zero padding after it
        eot = 1 + (2 * i) % (cfg.context_length - 1)
        tokens[i, eot] = cfg.vocab_size - 1
        tokens[i, eot + 1:] = 0
    return images, tokens


@torch.no_grad()
def outputs(model, images, tokens):
    image, text = model.encode_image(images.to(model.logit_scale.dtype)), model.encode_text(tokens)
    img_n, txt_n, scale = model(images.to(model.logit_scale.dtype), tokens)
    return image, text, img_n, txt_n, scale * img_n @ txt_n.T


def grown_model(small_size, big_size, method="lossless", small=None, **options):
    s_cfg, s_state = small or trained_like(small_size)
    b_cfg, b_state = fresh(big_size)
    return model_of(b_cfg, grow.grow(s_state, b_state, s_cfg, b_cfg, method=method, **options))


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_function(small_model, big_model, tol=1e-10, image=True):
    data = batch(small_model.cfg)
    small, big = outputs(small_model, *data), outputs(big_model, *data)
    for i, (x, y) in enumerate(zip(big, small)):  # unnormalised features, normalised features, logits
        if image or i in (1, 3):
            assert max_rel(x, y) < tol, (i, max_rel(x, y))


# -----------------------------------------------------------------------------
# inherit: the official corner copy


def corner_expected(small, fresh_big):
    # the official rule restated: small in the leading slice of the fresh tensor, the rest untouched
    out = fresh_big.clone()
    if small.dim() == 0:
        return small.clone()
    if small.dim() == 1:
        out[:small.shape[0]] = small
    elif small.dim() == 2:
        out[:small.shape[0], :small.shape[1]] = small
    else:  # conv: leading output channels, kernel and input channels equal
        out[:small.shape[0]] = small
    return out


def test_grow_keeps_the_model_head_dim():
    # grow.py keeps its own copy so that it can be pasted into another codebase with torch alone
    assert grow.HEAD_DIM == vit.HEAD_DIM


def test_inherit_is_the_official_corner_copy_with_its_qkv_misplacement():
    (s_cfg, s), (b_cfg, b) = trained_like("tiny"), fresh("small")  # vision 192 -> 384, text 256 -> 384
    b_before = {k: v.clone() for k, v in b.items()}
    out = grow.grow(s, b, s_cfg, b_cfg, method="inherit")
    assert set(out) == set(b) and all(torch.equal(b[k], b_before[k]) for k in b)  # the fresh init is only read
    for key in b:  # equal depth: every key keeps its index
        assert torch.equal(out[key], corner_expected(s[key], b[key])), key
    # the fused q/k/v rows, one block: small k becomes q of heads 3-5, small v becomes k of heads 0-2, v is fresh
    W, W_small, W_fresh = (x["visual.transformer.resblocks.0.attn.in_proj_weight"] for x in (out, s, b))
    assert torch.equal(W[0:192, :192], W_small[0:192])          # q -> q heads 0-2
    assert torch.equal(W[192:384, :192], W_small[192:384])      # k -> q heads 3-5
    assert torch.equal(W[384:576, :192], W_small[384:576])      # v -> k heads 0-2
    assert torch.equal(W[576:1152], W_fresh[576:1152])          # k heads 3-5 and all of v: fresh
    assert torch.equal(W[:576, 192:], W_fresh[:576, 192:])      # reads of the new coordinates: fresh
    assert torch.equal(out["logit_scale"], s["logit_scale"])
    assert not torch.equal(out["logit_scale"], b["logit_scale"])


def test_inherit_doubles_image_depth_only_and_keeps_text_indices():
    (s_cfg, s), (b_cfg, b) = trained_like("cpu-small"), fresh("cpu-base", text_layers=2)  # image 1 -> 2, text 1 -> 2
    out = grow.grow(s, b, s_cfg, b_cfg, method="inherit")
    for key in b:
        if "resblocks" not in key:
            assert torch.equal(out[key], corner_expected(s[key], b[key])), key
    for j in range(2):  # image block 0 fills blocks 0 and 1
        for name in ("attn.in_proj_weight", "attn.out_proj.bias", "mlp.c_fc.weight", "ln_2.weight"):
            key = f"visual.transformer.resblocks.{j}.{name}"
            assert torch.equal(out[key], corner_expected(s[f"visual.transformer.resblocks.0.{name}"], b[key]))
    for key in b:  # text block 0 keeps its index, text block 1 stays fresh
        if key.startswith("transformer.resblocks.0."):
            assert torch.equal(out[key], corner_expected(s[key], b[key])), key
        if key.startswith("transformer.resblocks.1."):
            assert torch.equal(out[key], b[key]), key
    # the flag off (the official run without --differ-width): image block 0 keeps its index, block 1 stays fresh
    off = grow.grow(s, b, s_cfg, b_cfg, method="inherit", double_depth=False)
    for key in b:
        if key.startswith("visual.transformer.resblocks.0."):
            assert torch.equal(off[key], corner_expected(s[key], b[key])), key
        if key.startswith("visual.transformer.resblocks.1."):
            assert torch.equal(off[key], b[key]), key


def test_inherit_qkv_places_each_projection_in_its_own_block():
    (s_cfg, s), (b_cfg, b) = trained_like("tiny"), fresh("small")
    out = grow.grow(s, b, s_cfg, b_cfg, method="inherit_qkv")
    W, W_small, W_fresh = (x["visual.transformer.resblocks.0.attn.in_proj_weight"] for x in (out, s, b))
    bias, bias_small = (x["transformer.resblocks.0.attn.in_proj_bias"] for x in (out, s))  # text 256 -> 384
    for j in range(3):
        assert torch.equal(W[j * 384:j * 384 + 192, :192], W_small[j * 192:(j + 1) * 192])
        assert torch.equal(W[j * 384 + 192:(j + 1) * 384], W_fresh[j * 384 + 192:(j + 1) * 384])
        assert torch.equal(bias[j * 384:j * 384 + 256], bias_small[j * 256:(j + 1) * 256])


# -----------------------------------------------------------------------------
# lossless: the grown model computes its predecessor's function


def ascending_pairs(sizes):
    def dims(size):
        return vit.SIZES[size]["vision_width"], vit.SIZES[size]["text_width"], VISION_LAYERS[size]
    return [(a, b) for a, b in itertools.combinations(sizes, 2) if all(x <= y for x, y in zip(dims(a), dims(b)))]


@pytest.mark.parametrize("small,big", ascending_pairs(OFFICIAL) + ascending_pairs(CPU))
def test_lossless_every_ascending_pair(small, big):
    integer = vit.SIZES[big]["vision_width"] % vit.SIZES[small]["vision_width"] == 0
    pre = trained_like(small, ln_pre_constant=not integer)  # a random ln_pre gain is exact at integer ratios only
    assert_same_function(model_of(pre[0], pre[1]), grown_model(small, big, small=pre))


def test_lossless_chain_nano_to_base_exact_then_large_bounded():
    cfg, state = trained_like("nano")
    first = model_of(cfg, state)
    for size in ["tiny", "small", "base"]:
        b_cfg, b_state = fresh(size)
        cfg, state = b_cfg, grow.grow(state, b_state, cfg, b_cfg)
    assert_same_function(first, model_of(cfg, state))
    # base -> large, 768 -> 1024: ln_pre (random gain, std 0.3) is the only inexact piece; text stays exact
    b_cfg, b_state = fresh("large")
    large = model_of(b_cfg, grow.grow(state, b_state, cfg, b_cfg))
    assert_same_function(first, large, image=False)
    data = batch(cfg)
    (_, _, img_a, _, logits_a), (_, _, img_b, _, logits_b) = outputs(first, *data), outputs(large, *data)
    assert 1e-8 < (img_a - img_b).abs().max() < 1e-2  # measured 1.2e-3; grow.py's docstring gives the full size
    assert (logits_a - logits_b).abs().max() < 0.1  # at scale 50; measured 0.02


def test_lossless_cpu_chain_at_registered_depth():
    first = trained_like("cpu-tiny", vision_layers=2, text_layers=2)
    cfg, state = first
    for size in ["cpu-small", "cpu-base"]:  # image depth 2 -> 2 -> 4
        b_cfg, b_state = fresh(size, vision_layers=vit.SIZES[size]["vision_layers"], text_layers=2)
        cfg, state = b_cfg, grow.grow(state, b_state, cfg, b_cfg)
    assert_same_function(model_of(*first), model_of(cfg, state))


def test_lossless_fp32_is_close():
    s_cfg, s = trained_like("tiny")
    b_cfg, b = fresh("small")
    s32 = {k: v.float() for k, v in s.items()}
    out = grow.grow(s32, {k: v.float() for k, v in b.items()}, s_cfg, b_cfg)
    assert all(v.dtype == torch.float32 for v in out.values())
    small, big = model_of(s_cfg, s32, torch.float32), model_of(b_cfg, out, torch.float32)
    data = batch(s_cfg)
    (_, _, i_a, t_a, _), (_, _, i_b, t_b, _) = outputs(small, *data), outputs(big, *data)
    assert (i_a - i_b).abs().max() < 1e-5 and (t_a - t_b).abs().max() < 1e-5


@pytest.mark.parametrize("new_layers,tol", [("zero", 0.0), ("cancel", 1e-12)])
def test_new_blocks_are_identities(new_layers, tol):
    model = grown_model("cpu-small", "cpu-base", new_layers=new_layers)  # image depth 1 -> 2: block 1 is new
    x = torch.randn(2, 5, 128, dtype=torch.float64)
    x = torch.cat([x, x], dim=-1)  # a grown stream: 128 -> 256 is two copies ("cancel" needs equal copies)
    with torch.no_grad():
        assert (model.visual.transformer.resblocks[1](x) - x).abs().max() <= tol
        assert (model.visual.transformer.resblocks[0](x) - x).abs().max() > 0.1  # a grown block is not
    c_proj = model.visual.transformer.resblocks[1].mlp.c_proj.weight
    assert (c_proj.abs().max() == 0) == (new_layers == "zero")


def test_duplicated_heads_and_units_get_different_gradients_at_step_0():
    model = grown_model("tiny", "small")  # image heads 3 -> 6 and MLP units 768 -> 1536: all duplicated
    images, tokens = batch(model.cfg, B=6)
    clip_loss(*model(images, tokens)).backward()
    block = model.visual.transformer.resblocks[0]
    g_q, g_fc = block.attn.in_proj_weight.grad, block.mlp.c_fc.weight.grad
    for a, b in [(g_q[0:64], g_q[192:256]), (g_fc[:768], g_fc[768:])]:  # head 0 vs head 3, unit u vs u + 768
        assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_grown_model_trains_below_its_predecessor():
    s_cfg, s = trained_like("cpu-tiny")
    small = model_of(s_cfg, s, torch.float32)
    model = grown_model("cpu-tiny", "cpu-small").float().train()
    batches = [batch(s_cfg, B=8, seed=seed) for seed in range(2)]

    def loss(m):
        with torch.no_grad():
            return sum(clip_loss(*m(i.float(), t)) for i, t in batches).item() / len(batches)

    before = loss(small)
    assert abs(loss(model) - before) < 1e-4  # same function at step 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(4):
        for images, tokens in batches:
            optimizer.zero_grad()
            clip_loss(*model(images.float(), tokens)).backward()
            optimizer.step()
    assert loss(model) < before - 0.05


def test_deterministic_for_a_seed():
    (s_cfg, s), (b_cfg, b) = trained_like("cpu-tiny"), fresh("cpu-small")
    one, two, other = (grow.grow(s, b, s_cfg, b_cfg, seed=seed) for seed in (0, 0, 1))
    as_dicts = grow.grow(s, b, s_cfg.to_dict(), b_cfg.to_dict())  # configs as plain dicts
    assert all(torch.equal(one[k], two[k]) and torch.equal(one[k], as_dicts[k]) for k in one)
    assert not torch.equal(one["visual.proj"], other["visual.proj"])


def test_text_only_configs_grow_a_gpt_style_tower():
    # a causal LM is the text tower: configs without vision fields, state dicts without visual keys
    (s_cfg, s), (b_cfg, b) = trained_like("tiny"), fresh("base")  # text 256 -> 512
    drop = ("embed_dim", "vocab_size", "context_length", "mlp_ratio", "text_width", "text_layers", "text_heads")
    text_cfg = [{f: getattr(c, f) for f in drop} for c in (s_cfg, b_cfg)]
    s_text, b_text = ({k: v for k, v in x.items() if not k.startswith("visual.") and k != "logit_scale"}
                      for x in (s, b))
    out = grow.grow(s_text, b_text, *text_cfg)
    assert set(out) == set(b_text)
    big = model_of(b_cfg, {**b, **out})
    _, tokens = batch(s_cfg)
    with torch.no_grad():
        a, c = model_of(s_cfg, s).encode_text(tokens), big.encode_text(tokens)
    assert max_rel(c, a) < 1e-10


# -----------------------------------------------------------------------------
# errors: one line naming the culprit


@pytest.mark.parametrize("small,big,kw,match", [
    ("small", "tiny", {}, "vision_width shrinks from 384 to 192"),
    ("tiny", "small", {"vision_heads": 4}, "vision_width 384 with vision_heads 4"),
    ("tiny", "small", {"patch_size": 8}, "patch_size changes from 16 to 8"),
    ("tiny", "small", {"image_size": 64}, "patch grid changes"),
    ("tiny", "small", {"vocab_size": 65}, "vocab_size changes"),
    ("tiny", "small", {"context_length": 9}, "context_length changes"),
    ("tiny", "small", {"embed_dim": 768}, "embed_dim changes"),
])
def test_config_errors(small, big, kw, match):
    (s_cfg, s), (b_cfg, b) = trained_like(small), fresh(big)
    with pytest.raises(ValueError, match=match):
        grow.grow(s, b, s_cfg, cfg_of(big, **kw))


def test_state_and_option_errors():
    (s_cfg, s), (b_cfg, b) = trained_like("cpu-tiny"), fresh("cpu-small")
    cases = [
        ({**s, "visual.extra": torch.zeros(1)}, b, {}, "small_state key 'visual.extra' is not in"),
        ({f"module.{k}": v for k, v in s.items()}, b, {}, "strip wrapper prefixes"),
        (s, {**b, "transformer.resblocks.9.ln_1.weight": torch.ones(128)}, {}, "big_state key .* cannot place"),
        ({k: v for k, v in s.items() if k != "ln_final.bias"}, b, {}, "small_state lacks 'ln_final.bias'"),
        (s, {**b, "visual.proj": b["visual.proj"][:, :8]}, {}, r"big_state\['visual.proj'\] has shape"),
        (s, b, {"method": "copy"}, "unknown growth method 'copy'"),
        (s, b, {"split_noise": 0.0}, "split_noise must be > 0"),
        (s, b, {"new_layers": "random"}, "unknown new_layers"),
        (s, b, {"method": "inherit", "double_depth": True}, "double_depth=True needs vision_layers to double"),
    ]
    for small_state, big_state, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            grow.grow(small_state, big_state, s_cfg, b_cfg, **kw)
