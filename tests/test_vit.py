"""vit.py: registry, config errors, attention paths, analytic FLOPs, gradients, grad checkpointing."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vit


def small_cfg(size="cpu-tiny", **kw):
    kw = {"image_size": 32, "patch_size": 8, "context_length": 16, "vocab_size": 300, "tokenizer": "byte", **kw}
    return vit.config(size, **kw)


def batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), generator=g)
    for i in range(B):  # end-of-text (the largest id) at varying positions, zero padding after it
        eot = 3 + 2 * i
        tokens[i, eot] = cfg.vocab_size - 1
        tokens[i, eot + 1:] = 0
    return images, tokens


def test_registry_shapes_and_heads():
    assert vit.SIZES["base"] == dict(vision_width=768, vision_layers=12, text_width=512, text_layers=12)
    assert vit.SIZES["large"]["vision_layers"] == 24
    for size in vit.SIZES:
        cfg = vit.config(size)
        assert cfg.vision_width // cfg.vision_heads == 64 and cfg.text_width // cfg.text_heads == 64
        assert cfg.embed_dim == 512


def test_config_errors():
    with pytest.raises(ValueError, match="valid sizes: nano"):
        vit.config("huge")
    with pytest.raises(ValueError, match="patch_size"):
        vit.config("tiny", image_size=100)
    with pytest.raises(ValueError, match="unknown CLIPConfig field"):
        vit.CLIPConfig.from_dict({"widht": 3})
    cfg = small_cfg()
    assert vit.CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_param_count_matches_official_family():
    # parameter counts of the official CoM-PT configs (measured with the official fork's create_model)
    for size, millions in [("tiny", 27.9), ("small", 62.4), ("base", 149.6), ("large", 427.3)]:
        assert abs(vit.count_params(vit.config(size)) / 1e6 - millions) < 0.05


def test_analytic_flops_match_open_clip_profile():
    # open_clip's docs/model_profile.csv (GFLOPs, image / text), embed dim 512 changes them by < 0.01
    for size, image, text in [("small", 9.20, 3.38), ("base", 35.13, 5.96), ("large", 123.11, 13.30)]:
        got_image, got_text = vit.image_text_flops(vit.config(size))
        assert abs(got_image / 1e9 - image) < 0.01 and abs(got_text / 1e9 - text) < 0.01


@pytest.mark.parametrize("size", ["cpu-tiny", "cpu-base", "nano", "small"])
def test_flops_against_flop_counter(size, monkeypatch):
    # the manual attention path runs plain matmuls, which FlopCounterMode counts on every backend
    monkeypatch.setattr(vit.Attention, "use_sdpa", False)
    cfg = small_cfg(size, image_size=64, patch_size=16, context_length=24)
    model = vit.CLIP(cfg)
    images, tokens = batch(cfg, B=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(images)
        model.encode_text(tokens)
    measured = counter.get_total_flops() / 2
    assert abs(measured - vit.flops_per_sample(cfg)) / measured < 0.02


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_manual_attention(causal):
    q, k, v = torch.randn(3, 2, 4, 7, 64, dtype=torch.float64).unbind(0)
    fast = vit.attention(q, k, v, causal, use_sdpa=True)
    slow = vit.attention(q, k, v, causal, use_sdpa=False)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_model_paths_agree_and_text_is_causal(monkeypatch):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = vit.CLIP(cfg).double().eval()
    images, tokens = batch(cfg)
    images = images.double()
    monkeypatch.setattr(vit.Attention, "use_sdpa", True)
    fast = model(images, tokens)
    monkeypatch.setattr(vit.Attention, "use_sdpa", False)
    slow = model(images, tokens)
    monkeypatch.setattr(vit.Attention, "use_sdpa", None)  # the default: SDPA on GPUs, the matmuls on a CPU
    for a, b in zip(model(images, tokens), slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)
    # causal: tokens after the end-of-text token cannot change the pooled text feature
    changed = tokens.clone()
    changed[0, 10:] = 5
    assert changed[0].argmax() == tokens[0].argmax()
    torch.testing.assert_close(model.encode_text(changed)[0], model.encode_text(tokens)[0])


def test_forward_contract_and_every_parameter_gets_a_gradient():
    cfg = small_cfg()
    model = vit.CLIP(cfg)
    images, tokens = batch(cfg)
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (3, 512)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert torch.isclose(scale, torch.tensor(1 / 0.07))
    (img @ txt.T * scale).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_same_gradients():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = vit.CLIP(cfg)
    images, tokens = batch(cfg)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        img, txt, scale = model(images, tokens)
        (img @ txt.T * scale).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_trimmed_tokens_give_the_same_text_features():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = vit.CLIP(cfg).double().eval()
    _, tokens = batch(cfg)
    trimmed = vit.trim_tokens(tokens)
    longest = int(tokens.argmax(-1).max()) + 1
    assert trimmed.shape[-1] % 8 == 0 and longest <= trimmed.shape[-1] < longest + 8
    assert torch.equal(trimmed, tokens[:, :trimmed.shape[-1]])
    torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), rtol=1e-12, atol=1e-12)
