"""
grow.py in other codebases: lossless growth (CoM-PT's weight initialisation, Sec. 3) of timm's VisionTransformer and
Hugging Face's CLIPModel and GPT2LMHeadModel, through a map of each library's tensor names to open_clip's and back.

grow.py works on open_clip's names: visual.conv1.weight, visual.class_embedding, visual.positional_embedding,
visual.ln_pre, visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}, visual.ln_post, visual.proj, token_embedding.weight, positional_embedding,
transformer.resblocks.{i}.(the same), ln_final, text_projection, logit_scale. A linear weight is (out, in), except
visual.proj and text_projection: (width, embed_dim), used as x @ proj. Each section below is a key map (a list of
(their name, open_clip's name) templates, read both ways), a config translation to grow.py's fields, and one
grow_<library>(small, big) that returns big's grown state dict; its docstring says where the library breaks an
exactness rule and what is done about it. To copy one, take grow.py, the helpers up to the first section and that
section. Imports: torch and grow.py only (timm and transformers are needed by the models passed in, never here).
tests/test_grow_recipes.py pins each recipe through the library's own forward pass.

For all three:
  - grow keeps the head dim at 64 and one MLP ratio: width = 64 x heads in every model, and MLP width / width the
    same in both towers and both models (grow refuses anything else with a one-line error);
  - the grown tensors take big's dtype. grow computes in float64, so a float32 big model is exact up to float32
    rounding (~1e-6 relative): check exactness with a float64 big model;
  - the zero-sum split noise (std split_noise / sqrt(fan_in)) cancels exactly only in exact arithmetic. When the
    small model's weights are much smaller than it, as in an untrained timm or GPT-2 model (std 0.02, GPT-2's
    output projections smaller still), a deep grown model amplifies float32 rounding through it layer by layer:
    a fresh GPT-2 384 x 6 -> 768 x 12 in float32 gives logits off by 1.6 (of 1.9) at split_noise=1, 1.9e-6 at
    split_noise=0.3; with weights at the noise's scale, N(0, 1 / fan_in), 1.8e-6 at split_noise=1. Grow trained
    weights, or pass a split_noise near the small model's weight scale;
  - buffers (position ids, masks) are not weights: the big model keeps its own;
  - small may be a model or its state dict; a state dict's widths and depths come from its shapes, its head count
    from the big model's head dim;
  - the fixes below are for method="lossless". method="inherit", the official corner copy, gets the key maps only.
"""

import math
import re

import torch

from grow import grow

# template fields: {i} a block index, {wb} weight or bias, {n} LayerNorm 1 or 2, {p} q, k or v
FIELDS = {"i": r"(?P<i>\d+)", "wb": "(?P<wb>weight|bias)", "n": "(?P<n>[12])", "p": "(?P<p>[qkv])"}


def _open_clip_name(key, keys):
    # (open_clip's name of key, the template's fields, transposed?) under keys: (their name, open_clip's[, "T"])
    for theirs, ours, *transposed in keys:
        m = re.fullmatch(re.sub(r"\\\{(\w+)\\\}", lambda f: FIELDS[f.group(1)], re.escape(theirs)), key)
        if m:
            return ours.format(**m.groupdict()), m.groupdict(), bool(transposed)
    raise ValueError(f"{key!r} has no open_clip counterpart, so grow cannot grow it: grow_recipes.py says which "
                     "tensors each library's recipe handles")


def to_open_clip(state, keys):
    """A state dict in another library's names -> open_clip's. Weights marked "T" are transposed (a bias under the
    same template is 1-D and stays); separate q, k, v projections ({p}) are stacked into one in_proj, rows [q; k; v]."""
    out, qkv = {}, {}
    for key, value in state.items():
        name, fields, transposed = _open_clip_name(key, keys)
        value = value.t() if transposed else value  # t() leaves 0-D and 1-D tensors as they are
        if "p" in fields:
            qkv.setdefault(name, {})[fields["p"]] = value
        else:
            out[name] = value
    return out | {name: torch.cat([parts[p] for p in "qkv"]) for name, parts in qkv.items()}


def from_open_clip(state, like, keys):
    """The inverse: an open_clip-named state dict -> the names and shapes of like (the target model's own state
    dict), each target key mapped forward to find its tensor."""
    out = {}
    for key, target in like.items():
        name, fields, transposed = _open_clip_name(key, keys)
        value = state[name].chunk(3)["qkv".index(fields["p"])] if "p" in fields else state[name]
        out[key] = (value.t() if transposed else value).reshape(target.shape)  # timm's leading 1s
    return out


def _weights(model_or_state, buffers):
    # a model's or state dict's tensors without the buffers (position ids, masks)
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return {k: v for k, v in state.items() if k not in buffers}


def _buffers(model):
    # persistent buffers of model's state dict (the big model keeps its own)
    state = model.state_dict()
    return {name: state[name] for name, _ in model.named_buffers() if name in state}


def _small_config(big_cfg, state):
    # big_cfg with the widths, depths and heads of an open_clip-named state dict, at the big model's head dim
    cfg = dict(big_cfg)
    for tower, prefix, embedding in (("vision", "visual.", "visual.class_embedding"),
                                     ("text", "", "token_embedding.weight")):
        if f"{tower}_width" in cfg:
            width, head_dim = state[embedding].shape[-1], cfg[f"{tower}_width"] // cfg[f"{tower}_heads"]
            layers = sum(re.fullmatch(rf"{prefix}transformer\.resblocks\.\d+\.ln_1\.weight", k) is not None
                         for k in state)
            cfg |= {f"{tower}_width": width, f"{tower}_heads": width // head_dim, f"{tower}_layers": layers}
    return cfg


def _grow(small, big, s, b, config, method, seed, options):
    # grow.grow with both configs: small's own when it is a model, else read from its shapes
    big_cfg = config(big)
    small_cfg = _small_config(big_cfg, s) if isinstance(small, dict) else config(small)
    return grow(s, b, small_cfg, big_cfg, method, seed, **options)


# -----------------------------------------------------------------------------
# timm VisionTransformer

TIMM_KEYS = [  # (timm, open_clip)
    ("patch_embed.proj.weight", "visual.conv1.weight"),     # its bias: folded into pos_embed (timm_to_open_clip)
    ("cls_token", "visual.class_embedding"),                 # (1, 1, d) -> (d,)
    ("pos_embed", "visual.positional_embedding"),            # (1, 1 + n, d) -> (1 + n, d): the class row first
    ("norm_pre.{wb}", "visual.ln_pre.{wb}"),                 # only with pre_norm=True
    ("blocks.{i}.norm{n}.{wb}", "visual.transformer.resblocks.{i}.ln_{n}.{wb}"),
    ("blocks.{i}.attn.qkv.{wb}", "visual.transformer.resblocks.{i}.attn.in_proj_{wb}"),  # rows [q; k; v]
    ("blocks.{i}.attn.proj.{wb}", "visual.transformer.resblocks.{i}.attn.out_proj.{wb}"),
    ("blocks.{i}.mlp.fc1.{wb}", "visual.transformer.resblocks.{i}.mlp.c_fc.{wb}"),
    ("blocks.{i}.mlp.fc2.{wb}", "visual.transformer.resblocks.{i}.mlp.c_proj.{wb}"),
    ("norm.{wb}", "visual.ln_post.{wb}"),                    # class-token pooling: norm, then the class token
    ("fc_norm.{wb}", "visual.ln_post.{wb}"),                 # average pooling: the mean, then fc_norm
    ("head.weight", "visual.proj", "T"),                     # (classes, d) -> (d, classes); head.bias: kept
]
# grow always grows a text tower and logit_scale: a vision-only model gets a dummy one, width 64 and no blocks
NO_TEXT = dict(text_width=64, text_layers=0, text_heads=1, context_length=1, vocab_size=1)


def timm_config(model):
    """grow.py's config of a timm VisionTransformer; embed_dim is its class count (1 without a head)."""
    return dict(vision_width=model.embed_dim, vision_layers=len(model.blocks),
                vision_heads=model.blocks[0].attn.num_heads, patch_size=model.patch_embed.patch_size[0],
                image_size=model.patch_embed.img_size[0], embed_dim=max(model.num_classes, 1),
                mlp_ratio=model.blocks[0].mlp.fc1.out_features // model.embed_dim, **NO_TEXT)


def timm_to_open_clip(state, no_embed_class=False):
    """A timm VisionTransformer state dict -> open_clip's names, plus the tensors grow expects and timm lacks (ln_pre,
    a head, a text tower), which grow_timm drops again. head.bias is left out: it is copied unchanged."""
    state = {k: v for k, v in state.items() if k != "head.bias"}
    patch_bias = state.pop("patch_embed.proj.bias", None)
    s = to_open_clip(state, TIMM_KEYS)
    d = s["visual.conv1.weight"].shape[0]
    pos = s["visual.positional_embedding"].reshape(-1, d)
    if no_embed_class:  # DeiT-3: no position for the class token, so a zero row
        pos = torch.cat([pos.new_zeros(1, d), pos])
    if patch_bias is not None:  # conv1 has no bias: add it to every patch row (exact: the writer rule is linear)
        pos = torch.cat([pos[:1], pos[1:] + patch_bias])
    s |= {"visual.class_embedding": s["visual.class_embedding"].reshape(d), "visual.positional_embedding": pos}
    s.setdefault("visual.ln_pre.weight", pos.new_ones(d))  # timm's default pre_norm=False: no ln_pre
    s.setdefault("visual.ln_pre.bias", pos.new_zeros(d))
    s.setdefault("visual.proj", pos.new_zeros(d, 1))  # num_classes=0: no head
    E, w = s["visual.proj"].shape[1], NO_TEXT["text_width"]
    return s | {"token_embedding.weight": pos.new_zeros(1, w), "positional_embedding": pos.new_zeros(1, w),
                "ln_final.weight": pos.new_ones(w), "ln_final.bias": pos.new_zeros(w),
                "text_projection": pos.new_zeros(w, E), "logit_scale": pos.new_zeros(())}


def open_clip_to_timm(state, like, no_embed_class=False):
    """The inverse, into the names and shapes of like (a timm model's state dict): the grown patch bias is 0 (its
    value lives in pos_embed) and head.bias is left for the caller."""
    pos = state["visual.positional_embedding"]
    state = state | {"visual.positional_embedding": pos[1:] if no_embed_class else pos}
    out = from_open_clip(state, {k: v for k, v in like.items() if k not in ("patch_embed.proj.bias", "head.bias")},
                         TIMM_KEYS)
    if "patch_embed.proj.bias" in like:
        out["patch_embed.proj.bias"] = torch.zeros_like(like["patch_embed.proj.bias"])
    return out


def grow_timm(small, big, method="lossless", seed=0, **options):
    """big's state dict grown from small (a timm VisionTransformer or its state dict); big.load_state_dict(it).
    Where timm differs from open_clip, and what is done:
      - no ln_pre by default (pre_norm=False). grow gets one with gain 1 and bias 0, whose grown value is dropped;
        the stream entering block 0 is then exactly the writers' M x, so growth is exact at every width ratio
        (grow.py's one inexact piece, ln_pre at D % d != 0, does not arise). With pre_norm=True (CLIP-style),
        norm_pre is ln_pre and is inexact at D % d != 0 unless its gain is constant: use integer width ratios;
      - the patch conv has a bias (open_clip's conv1 has none): it is added to pos_embed's patch rows, exactly,
        and the grown bias is 0;
      - cls_token and pos_embed carry a leading 1, and pos_embed's class row comes first, as in open_clip. With
        no_embed_class=True (DeiT-3) pos_embed has no class row: a zero row is added, grows to zero, is dropped;
      - norm (class-token pooling) or fc_norm (average pooling) is ln_post; both are exact, since the mean over
        tokens commutes with the stream's linear map. The grown pre-logits features are the small model's on each
        of the D // d copies and 0 on the D % d residue; head.weight.T is visual.proj and head.bias is copied
        unchanged (the classes stay). Without a head (num_classes=0) a dummy one is grown and dropped;
      - reg_token, dist_token, LayerScale (init_values), attention pooling ("map") and qk_norm have no open_clip
        tensor: grow_timm raises naming the key (a prefix token would grow as class_embedding does: M x). Without
        a class token (class_token=False) or a final norm (final_norm=False), grow refuses the missing key.
    """
    buffers = _buffers(big)
    small_state, like = _weights(small, buffers), _weights(big, buffers)
    s, b = (timm_to_open_clip(x, big.no_embed_class) for x in (small_state, like))
    grown = _grow(small, big, s, b, timm_config, method, seed, options)
    out = open_clip_to_timm(grown, like, big.no_embed_class) | buffers
    if "head.bias" in like:
        out["head.bias"] = small_state["head.bias"].to(like["head.bias"])
    return out


# -----------------------------------------------------------------------------
# Hugging Face CLIPModel

HF_CLIP_BLOCK = [  # (one encoder layer of HF CLIP, one resblock of open_clip)
    ("layer_norm{n}.{wb}", "ln_{n}.{wb}"),
    ("self_attn.{p}_proj.{wb}", "attn.in_proj_{wb}"),  # separate q, k, v -> one in_proj, rows [q; k; v]
    ("self_attn.out_proj.{wb}", "attn.out_proj.{wb}"),
    ("mlp.fc1.{wb}", "mlp.c_fc.{wb}"),
    ("mlp.fc2.{wb}", "mlp.c_proj.{wb}"),
]
HF_CLIP_KEYS = [  # (Hugging Face CLIPModel, open_clip)
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.{wb}", "visual.ln_pre.{wb}"),  # sic: "layrnorm"
    *[("vision_model.encoder.layers.{i}." + a, "visual.transformer.resblocks.{i}." + b) for a, b in HF_CLIP_BLOCK],
    ("vision_model.post_layernorm.{wb}", "visual.ln_post.{wb}"),
    ("visual_projection.weight", "visual.proj", "T"),  # nn.Linear without bias: (E, d) -> (d, E)
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    *[("text_model.encoder.layers.{i}." + a, "transformer.resblocks.{i}." + b) for a, b in HF_CLIP_BLOCK],
    ("text_model.final_layer_norm.{wb}", "ln_final.{wb}"),
    ("text_projection.weight", "text_projection", "T"),
    ("logit_scale", "logit_scale"),
]


def hf_clip_config(model):
    """grow.py's config of a Hugging Face CLIPModel."""
    v, t = model.config.vision_config, model.config.text_config
    if v.intermediate_size * t.hidden_size != t.intermediate_size * v.hidden_size:
        raise ValueError("the towers' intermediate_size / hidden_size differ: grow takes one MLP ratio for both")
    return dict(vision_width=v.hidden_size, vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                patch_size=v.patch_size, image_size=v.image_size, text_width=t.hidden_size,
                text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                embed_dim=model.config.projection_dim, mlp_ratio=v.intermediate_size // v.hidden_size)


def grow_hf_clip(small, big, method="lossless", seed=0, **options):
    """big's state dict grown from small (a Hugging Face CLIPModel or its state dict); big.load_state_dict(it).
    Where HF CLIP differs from open_clip, and what is done:
      - q, k and v are separate projections: stacked into in_proj for grow, split back in thirds;
      - pre_layrnorm is ln_pre: exact at integer width ratios (D % d == 0) only, unless its gain is constant.
        Elsewhere (e.g. 768 -> 1024) the image embeddings are off by a bounded amount (grow.py's docstring and the
        test give figures); the text tower is exact at every width. Choose integer image-width ratios to be exact;
      - hidden_act (quick_gelu in OpenAI's CLIP, gelu in open_clip's default) does not matter to growth: an
        elementwise activation commutes with duplicating units, as long as small and big use the same one;
      - position_ids is a buffer (non-persistent in current transformers; older versions saved it): not grown;
      - both projections are nn.Linear without bias (bias=False), transposed into open_clip's (width, E);
        logit_scale is copied; the text tower pools at the end-of-text position, which growth does not move.
    """
    buffers = _buffers(big)
    like = _weights(big, buffers)
    s, b = (to_open_clip(x, HF_CLIP_KEYS) for x in (_weights(small, buffers), like))
    grown = _grow(small, big, s, b, hf_clip_config, method, seed, options)
    return from_open_clip(grown, like, HF_CLIP_KEYS) | buffers


# -----------------------------------------------------------------------------
# Hugging Face GPT2LMHeadModel: the text tower without its pooling, and a head over the vocabulary

GPT2_KEYS = [  # (Hugging Face GPT2LMHeadModel, open_clip); "T": Conv1D stores its weight (in, out)
    ("transformer.wte.weight", "token_embedding.weight"),
    ("transformer.wpe.weight", "positional_embedding"),
    ("transformer.h.{i}.ln_{n}.{wb}", "transformer.resblocks.{i}.ln_{n}.{wb}"),
    ("transformer.h.{i}.attn.c_attn.{wb}", "transformer.resblocks.{i}.attn.in_proj_{wb}", "T"),  # [q; k; v]
    ("transformer.h.{i}.attn.c_proj.{wb}", "transformer.resblocks.{i}.attn.out_proj.{wb}", "T"),
    ("transformer.h.{i}.mlp.c_fc.{wb}", "transformer.resblocks.{i}.mlp.c_fc.{wb}", "T"),
    ("transformer.h.{i}.mlp.c_proj.{wb}", "transformer.resblocks.{i}.mlp.c_proj.{wb}", "T"),
    ("transformer.ln_f.{wb}", "ln_final.{wb}"),
    ("lm_head.weight", "text_projection", "T"),  # (V, n) -> (n, V): embed_dim is the vocabulary
]


def gpt2_config(model):
    """grow.py's config of a Hugging Face GPT2LMHeadModel (text only: no vision_* fields)."""
    c = model.config
    return dict(text_width=c.n_embd, text_layers=c.n_layer, text_heads=c.n_head, context_length=c.n_positions,
                vocab_size=c.vocab_size, embed_dim=c.vocab_size, mlp_ratio=(c.n_inner or 4 * c.n_embd) // c.n_embd)


def _scale_queries(state, factor):
    # multiply the query rows of block i's in_proj by factor(i)
    out = dict(state)
    for key, value in state.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
            out[key] = torch.cat([q * factor(int(m.group(1))), kv])
    return out


def grow_gpt2(small, big, method="lossless", seed=0, **options):
    """big's state dict grown from small (a Hugging Face GPT2LMHeadModel or its state dict);
    big.load_state_dict(it). Where GPT-2 differs from open_clip's text tower, and what is done:
      - Conv1D (c_attn, c_proj, c_fc) stores its weight (in, out): transposed both ways;
      - the head is tied to wte (tie_word_embeddings=True, the default), so grow's text_projection cannot be
        used: it is dropped, and the head reads the grown wte, whose logits come out k a times too large
        (k = D // d, a = sqrt(D / (k d))). ln_f's weight and bias are divided by k a to compensate (exact).
        An untied head is an ordinary reader (lm_head.weight.T is text_projection). A state dict saved without
        lm_head.weight (save_pretrained drops tied copies) is read as tied;
      - scale_attn_by_inverse_layer_idx=True scales block i's attention by 1 / (i + 1), so a block that moves
        to index j would change. The factor is folded into the small model's queries before growth and
        unfolded from the big model's after (exact). Small and big must be configured alike (this flag, tying);
      - any activation_function works (elementwise, the same in both models); cross-attention blocks
        (add_cross_attention) have no open_clip tensor and raise naming the key.
    """
    buffers = _buffers(big)
    small_state, like = _weights(small, buffers), _weights(big, buffers)
    small_state.setdefault("lm_head.weight", small_state["transformer.wte.weight"])
    s, b = (to_open_clip(x, GPT2_KEYS) for x in (small_state, like))
    lossless = method == "lossless"
    by_layer = big.config.scale_attn_by_inverse_layer_idx and lossless
    if by_layer:
        s = _scale_queries(s, lambda i: 1 / (i + 1))
    grown = _grow(small, big, s, b, gpt2_config, method, seed, options)
    if by_layer:
        grown = _scale_queries(grown, lambda j: j + 1)
    if big.lm_head.weight is big.transformer.wte.weight:  # tied: the head is the grown token embedding
        if lossless:
            d, D = s["token_embedding.weight"].shape[1], b["token_embedding.weight"].shape[1]
            ka = D // d * math.sqrt(D / (D // d * d))
            grown |= {"ln_final.weight": grown["ln_final.weight"] / ka, "ln_final.bias": grown["ln_final.bias"] / ka}
        grown["text_projection"] = grown["token_embedding.weight"].t()
    return from_open_clip(grown, like, GPT2_KEYS) | buffers
