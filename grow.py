"""
Weight growth for Chain-of-Models Pre-Training: a trained CLIP's weights -> the initial weights of a larger CLIP.

CoM-PT (Fan et al., "Chain-of-Models Pre-Training", CVPR 2026, arXiv 2604.12391) trains a model family in
ascending size and starts every larger model from its trained predecessor: inverse knowledge transfer in the
parameter space (the paper's weight initialisation, Sec. 3; the feature-space half is distill.py). Two operators on
open_clip state dicts (no "module." prefix); results/grow-step0-*.md has their step-0 measurements.

method="inherit" is the official code (deep-optimization/CoM-PT, main_kd.py `weight_initialization`), as it
behaves. Each small tensor is copied into the leading slice of the big model's fresh tensor (scalar: copied;
1-D [:a]; 2-D [:a, :b]; conv [:a]). When the image tower's depth doubles (the official `--differ-width`), small
block i fills blocks 2i and 2i+1. Text blocks keep their index. Everything else keeps its fresh value. The quirks
stay, because the paper's numbers come from them:
  - in_proj's fused q/k/v rows are copied as one block. For 192 -> 384 the small k rows become the big q of heads
    3-5, the small v rows become the big k of heads 0-2, and the big v stays random;
  - LayerNorm statistics run over the random new coordinates, and about half of every tensor stays fresh;
  - each doubled image block is applied twice.
So the grown model is not its predecessor's function. method="inherit_qkv" (an ablation, not the paper) places
q, k and v each in its own block.

method="lossless" is function-preserving. It is LEMON's expansion (Wang et al., ICLR 2024) with a residual scale
instead of its LayerNorm eps edit (so every LayerNorm keeps its eps). For a width d -> D, k = D // d, r = D - k d, a = sqrt(D / (k d)),
the residual stream x becomes x' = M x = a [x; ...; x (k copies); mean(x) (r times)]. Its mean-removed variance
is that of x, so every eps stays, and LN'(x') is the small LN(x) on each copy and exactly 0 on the residue.
  writers (conv1, class/positional/token embeddings, rows of out_proj and c_proj): W -> M W
  LayerNorms in the stream: gain gamma / a on the copies, bias beta; on the residue gain mean(gamma) / a, bias 0
  readers (in_proj, c_fc, proj, text_projection): W -> W S^T / k + Z (I - P). Each copy reads W / k plus noise
    that sums to zero over the copies; the residue columns read zeros, so they get pure noise
  heads (the head dim stays 64) and MLP units: big unit u copies small unit u mod n, and the fan-out of a
    duplicated unit is W / count plus zero-sum noise. Duplicates compute the same sum but get different
    gradients. The plain equal split (Net2Net) never breaks that symmetry, so split_noise=0 is refused
  depth L -> L2: new blocks are spread after their sources (12 -> 24: block 2i grows small block i and 2i+1 is
    new, the official indices). A new block grows its source's readers and gets zero output projections
    (new_layers="zero") or zero-sum random ones ("cancel", LEMON): an exact identity either way
  logit_scale and the shared embed dim are kept.
Z ~ N(0, (split_noise / sqrt(fan_in))^2) comes from a torch.Generator seeded with `seed`; the rules are computed in
float64. big_state only supplies keys, shapes, dtypes and the device here.

The one inexact piece is the image tower's ln_pre. Its output is the stream itself, whose residue coordinates
should be a mean(gamma n + beta), and a LayerNorm can only put a constant there. So it is exact iff D % d == 0 or
the ln_pre gain is constant, which excludes base -> large (768 -> 1024) in general. Measured there at
full size in float64, with every LayerNorm gain 1 + 0.3 N(0, 1) (benchmarks/grow_bench.py): max |error| 6.1e-4 on
the normalised image embeddings and 8.2e-3 on the logits at scale 50; with a constant ln_pre gain, 4e-16. The
text tower is exact at every width.

In another codebase, map your keys to these names and back, and drop non-persistent buffers:

    big = BigModel(big_cfg)                                   # its own fresh init
    state = grow(small.state_dict(), big.state_dict(), small_cfg, big_cfg, method="lossless")
    big.load_state_dict(state)

A GPT-style causal LM is the text tower. Give configs without vision_* fields, e.g. dict(text_width=n_embd,
text_layers=n_layer, text_heads=n_head, context_length=block_size, vocab_size=V, embed_dim=V), and rename
wte -> token_embedding.weight, wpe -> positional_embedding, h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj} -> transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
ln_f -> ln_final, lm_head.weight.T -> text_projection (LayerNorms and linears with biases; Hugging Face's Conv1D
stores c_attn, c_proj and c_fc weights as (in, out): transpose them). A tied head (lm_head is wte) breaks the rule
for text_projection: tie the head to the grown token_embedding, whose logits are k a times too large, and divide
ln_final's weight and bias on the copies by k a to compensate. grow_recipes.py does all this for timm's
VisionTransformer and Hugging Face's CLIPModel and GPT2LMHeadModel, tested through their own forward passes.
"""

import math
import re

import torch

HEAD_DIM = 64  # the family's head dim: vit.HEAD_DIM, copied so that this file needs torch alone (a test ties them)
METHODS = ("lossless", "inherit", "inherit_qkv")
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")

# -----------------------------------------------------------------------------
# tensor -> tensor rules of the lossless operator, in float64


def _tile(x, D, dim, fill):
    # [x; ...; x; fill] along dim: D // n copies of x, then the remaining D % n entries of fill (broadcast)
    shape = list(x.shape)
    k, shape[dim] = divmod(D, x.shape[dim])
    return torch.cat([x] * k + [fill.expand(shape)], dim)


def _write(x, D, dim):
    # M x: the residual stream's d coordinates along dim -> D coordinates, a [x; ...; x; mean(x)]
    d = x.shape[dim]
    return math.sqrt(D / (D // d * d)) * _tile(x, D, dim, x.mean(dim, keepdim=True))


def _noise(rows, cols, scale, g):  # drawn in float32 (twice as fast), used in float64
    return torch.randn(rows, cols, generator=g).double() * (scale / math.sqrt(cols))


def _read(w, D, scale, g):
    # W (o, d) that reads the stream -> (o, D) with W' S = W: the k copies share W, plus noise that sums to zero
    # over the copies; the residue columns read exact zeros, so they are free and get pure noise
    o, d = w.shape
    k = D // d
    z = _noise(o, D, scale, g)
    z[:, :k * d] -= z[:, :k * d].view(o, k, d).mean(1).repeat(1, k)
    return _tile(w / k, D, 1, w.new_zeros(())) + z


def _split(w, idx, scale, g):
    # W (o, n) that reads units, where big unit u copies small unit idx[u] -> (o, len(idx)) with W' H = W
    o, n = w.shape
    count = torch.bincount(idx, minlength=n).double()
    z = _noise(o, len(idx), scale, g)
    z_mean = torch.zeros(o, n, dtype=z.dtype).index_add_(1, idx, z) / count  # (o, n), noise mean per small unit
    return w[:, idx] / count[idx] + z - z_mean[:, idx]


def _lossless(name, x, t, new, split_noise, new_layers, g):
    # the grown value of one tensor; name is its key without "visual." and without the block prefix
    D, heads, units = t["D"], t["heads"], t["units"]
    if name == "logit_scale":
        return x
    if name in ("conv1.weight", "class_embedding"):
        return _write(x, D, 0)
    if name in ("positional_embedding", "token_embedding.weight"):
        return _write(x, D, 1)
    if name == "ln_pre.weight":  # ln_pre must output M LN(x); its residue gain multiplies zeros
        return _tile(x, D, 0, x.mean())
    if name == "ln_pre.bias":  # exact on the residue only if the gain is constant (module docstring)
        return _write(x, D, 0)
    if name in ("ln_1.weight", "ln_2.weight", "ln_post.weight", "ln_final.weight"):
        return _tile(x, D, 0, x.mean()) / t["a"]
    if name in ("ln_1.bias", "ln_2.bias", "ln_post.bias", "ln_final.bias"):
        return _tile(x, D, 0, x.new_zeros(()))
    if name in ("proj", "text_projection"):  # used as x @ proj, so proj.T is the reader
        return _read(x.T, D, split_noise, g).T
    if name == "attn.in_proj_weight":  # rows [q; k; v], each head-duplicated, then read from the stream
        return torch.cat([_read(w[heads], D, split_noise, g) for w in x.chunk(3)])
    if name == "attn.in_proj_bias":
        return torch.cat([b[heads] for b in x.chunk(3)])
    if name == "mlp.c_fc.weight":
        return _read(x[units], D, split_noise, g)
    if name == "mlp.c_fc.bias":
        return x[units]
    if name in ("attn.out_proj.weight", "mlp.c_proj.weight"):  # writes the stream, reads heads or units
        idx = heads if name.startswith("attn") else units
        if new:  # "zero": all zeros; "cancel": noise that sums to zero over duplicated units
            return _split(torch.zeros(D, x.shape[1], dtype=x.dtype), idx, split_noise * (new_layers == "cancel"), g)
        return _split(_write(x, D, 0), idx, split_noise, g)
    if name in ("attn.out_proj.bias", "mlp.c_proj.bias"):
        return torch.zeros(D, dtype=x.dtype) if new else _write(x, D, 0)
    raise ValueError(f"grow has no lossless rule for {name!r}")


def _corner(small, fresh, per_block):
    # the official rule: small goes into the leading slice of the fresh tensor; per_block: each third (q, k, v)
    # of a fused in_proj into its own third (the inherit_qkv ablation)
    out = fresh.detach().clone()
    big, small = (out.unflatten(0, (3, -1)), small.unflatten(0, (3, -1))) if per_block else (out, small)
    big[tuple(slice(0, n) for n in small.shape)] = small.detach().to(out)
    return out


# -----------------------------------------------------------------------------
# configs and the state-dict layout


def _config(cfg):
    c = dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))
    c.setdefault("mlp_ratio", 4)
    return c


def _towers(c):
    # (config prefix, key prefix) of each tower present: configs without vision_* fields are text-only (a GPT)
    return [("vision", "visual.")] * ("vision_width" in c) + [("text", "")]


def _layout(c):
    # key -> shape of open_clip's CLIP for config c
    E, shapes = c["embed_dim"], {}
    for t, p in _towers(c):
        w, h = c[f"{t}_width"], c["mlp_ratio"] * c[f"{t}_width"]
        for i in range(c[f"{t}_layers"]):
            b = f"{p}transformer.resblocks.{i}."
            shapes |= {b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                       b + "attn.out_proj.weight": (w, w), b + "mlp.c_fc.weight": (h, w), b + "mlp.c_fc.bias": (h,),
                       b + "mlp.c_proj.weight": (w, h), b + "attn.out_proj.bias": (w,), b + "mlp.c_proj.bias": (w,)}
            shapes |= {f"{b}{ln}.{wb}": (w,) for ln in ("ln_1", "ln_2") for wb in ("weight", "bias")}
    if "vision_width" in c:
        w, p, g = c["vision_width"], c["patch_size"], c["image_size"] // c["patch_size"]
        shapes |= {"visual.conv1.weight": (w, 3, p, p), "visual.class_embedding": (w,),
                   "visual.positional_embedding": (g * g + 1, w), "visual.proj": (w, E), "logit_scale": ()}
        shapes |= {f"visual.{ln}.{wb}": (w,) for ln in ("ln_pre", "ln_post") for wb in ("weight", "bias")}
    w = c["text_width"]
    shapes |= {"token_embedding.weight": (c["vocab_size"], w), "positional_embedding": (c["context_length"], w),
               "text_projection": (w, E), "ln_final.weight": (w,), "ln_final.bias": (w,)}
    return shapes


def _check(small_state, big_state, s, b):
    if ("vision_width" in s) != ("vision_width" in b):
        raise ValueError("one config has an image tower and the other not: give both configs the same fields")
    for c, which in ((s, "small_cfg"), (b, "big_cfg")):
        for t, _ in _towers(c):
            w, h = c[f"{t}_width"], c[f"{t}_heads"]
            if w != HEAD_DIM * h:
                raise ValueError(f"{which}: {t}_width {w} with {t}_heads {h} is not a head dim of {HEAD_DIM}: "
                                 f"set {t}_heads = {t}_width / {HEAD_DIM} (grow keeps the head dim fixed)")
    fixed = ["embed_dim", "vocab_size", "context_length", "mlp_ratio"] + ["patch_size"] * ("vision_width" in s)
    for f in fixed:
        if s[f] != b[f]:
            raise ValueError(f"{f} changes from {s[f]} to {b[f]}: growth keeps it fixed; use one {f} for the chain")
    if "vision_width" in s and s["image_size"] // s["patch_size"] != b["image_size"] // b["patch_size"]:
        raise ValueError(f"the patch grid changes (image_size {s['image_size']} -> {b['image_size']}): growth keeps "
                         "the positional embedding's length; use one image_size for the chain")
    for t, _ in _towers(s):
        for f in (f"{t}_width", f"{t}_layers"):
            if b[f] < s[f]:
                raise ValueError(f"{f} shrinks from {s[f]} to {b[f]}: grow only grows; pass the smaller model first")
    for state, c, which in ((small_state, s, "small_state"), (big_state, b, "big_state")):
        layout = _layout(c)
        for key, x in state.items():
            if key not in layout:
                raise ValueError(f"{which} key {key!r} is not in the open_clip CLIP layout of its config, so grow "
                                 "cannot place it: strip wrapper prefixes ('module.') and check the config")
            if tuple(x.shape) != layout[key]:
                raise ValueError(f"{which}[{key!r}] has shape {tuple(x.shape)} but its config implies "
                                 f"{layout[key]}: pass the config the state dict was made with")
        missing = [key for key in layout if key not in state]
        if missing:
            raise ValueError(f"{which} lacks {missing[0]!r} ({len(missing)} keys missing): pass the full state dict")


# -----------------------------------------------------------------------------
# the operator: one loop over the big model's keys


def grow(small_state, big_state, small_cfg, big_cfg, method="lossless", seed=0, *,
         split_noise=1.0, new_layers="zero", double_depth=None):
    """The big model's state dict grown from the small one's. big_state is the big model's fresh init (read, not
    modified); configs are CLIPConfig objects or dicts with its fields. Options: split_noise (lossless, > 0) scales
    the zero-sum noise; new_layers (lossless) is "zero" or "cancel"; double_depth (inherit) forces the official
    image-depth doubling on (True) or off (False); None means "when the image depth doubles"."""
    s, b = _config(small_cfg), _config(big_cfg)
    if method not in METHODS:
        raise ValueError(f"unknown growth method {method!r}; choose one of {', '.join(METHODS)}")
    if not split_noise > 0:
        raise ValueError(f"split_noise must be > 0 (got {split_noise}): the equal split never breaks the symmetry "
                         "between copies, so they could never learn different features")
    if new_layers not in ("zero", "cancel"):
        raise ValueError(f"unknown new_layers {new_layers!r}; choose 'zero' or 'cancel'")
    _check(small_state, big_state, s, b)
    towers = {}
    for t, p in _towers(s):
        d, D, L, L2 = s[f"{t}_width"], b[f"{t}_width"], s[f"{t}_layers"], b[f"{t}_layers"]
        if method == "lossless":  # small block i, then its share of the L2 - L new blocks
            blocks = [(i, n > 0) for i in range(L) for n in range(1 + (i + 1) * (L2 - L) // L - i * (L2 - L) // L)]
        else:
            double = t == "vision" and (L2 == 2 * L if double_depth is None else double_depth)  # text: never
            if double and L2 != 2 * L:
                raise ValueError(f"double_depth=True needs {t}_layers to double, got {L} -> {L2}")
            blocks = [(j // 2, False) if double else (j, False) if j < L else None for j in range(L2)]
        head = torch.arange(D // HEAD_DIM) % (d // HEAD_DIM)  # big head -> the small head it copies
        towers[p] = dict(D=D, a=math.sqrt(D / (D // d * d)), blocks=blocks,
                         heads=(head[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten(),
                         units=torch.arange(s["mlp_ratio"] * D) % (s["mlp_ratio"] * d))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, fresh in big_state.items():
        p = "visual." if key.startswith("visual.") else ""
        t, m = towers[p], _BLOCK.fullmatch(key)
        name, src, new = key[len(p):], key, False
        if m:
            name, source = m.group(3), t["blocks"][int(m.group(2))]
            src, new = (f"{p}transformer.resblocks.{source[0]}.{name}", source[1]) if source else (None, False)
        if method == "lossless":
            x = small_state[src].detach().to("cpu", torch.float64)
            value = _lossless(name, x, t, new, split_noise, new_layers, g)
        else:  # a block with no source keeps its fresh value
            value = fresh.detach().clone() if src is None else _corner(
                small_state[src], fresh, method == "inherit_qkv" and name.startswith("attn.in_proj"))
        out[key] = value.to(fresh.device, fresh.dtype)
    return out
