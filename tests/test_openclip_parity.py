"""vit.CLIP against open_clip's CLIP of the same shape: identical state-dict keys and shapes, open_clip weights load
with strict=True, and image/text embeddings agree in float64. Skipped where open_clip is not installed (it is not a
dependency: `pip install open_clip_torch` in a throwaway venv to run it).

The numeric check keeps every tower shape of the family (widths, depths, heads, embed dim) and shrinks only the
data-dependent fields (image 32 px = 2x2 patches, context 16, a 1000-token vocabulary), which change the positional /
token embedding rows identically on both sides. The key/shape check runs on the meta device at the real shapes
(224 px, context 77, vocab 49408) for every official size.
"""
import pytest
import torch

import vit

open_clip = pytest.importorskip("open_clip")

OFFICIAL = ["nano", "tiny", "small", "medium", "base", "large"]


def open_clip_model(cfg):
    # open_clip's CLIP built from model_cfg dicts, its defaults left alone (GELU, LayerNorm eps 1e-5, causal text
    # mask, argmax pooling, no projection bias, learnable positions, no layer scale, no attentional pooling)
    return open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                        layers=cfg.vision_layers, head_width=cfg.vision_width // cfg.vision_heads,
                        mlp_ratio=cfg.mlp_ratio),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                      heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio),
    )


@pytest.mark.parametrize("size", OFFICIAL)
def test_state_dict_keys_and_shapes_match_open_clip(size):
    cfg = vit.config(size)
    with torch.device("meta"):
        ours, theirs = vit.CLIP(cfg).state_dict(), open_clip_model(cfg).state_dict()
    # same names and shapes (the order differs: open_clip registers the text transformer before token_embedding)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("size", ["nano", "tiny", "small", "base"])
def test_open_clip_weights_give_the_same_embeddings(size):
    cfg = vit.config(size, image_size=32, context_length=16, vocab_size=1000)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # build open_clip's model in float64 directly: no second copy
    try:
        theirs = open_clip_model(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # move the LayerNorms off (1, 0) and the zero-initialised biases, so that each one matters
        for p in theirs.parameters():
            if p.ndim < 2:
                p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = vit.CLIP(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # takes open_clip's tensors as they are
    ours.eval()

    B = 3
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, dtype=torch.float64)
    tokens = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length))
    for i, eot in enumerate([5, 9, cfg.context_length - 1]):  # EOT (the largest id) at varying places, zero padding
        tokens[i, eot], tokens[i, eot + 1:] = cfg.vocab_size - 1, 0

    def rel_err(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) < 1e-4
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) < 1e-4
        for a, b in zip(ours(images, tokens), theirs(images, tokens)):  # normalised features, logit_scale.exp()
            assert rel_err(a, b) < 1e-4
