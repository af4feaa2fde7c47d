"""
The CLIP model of the CoM-PT model chain: a ViT image tower and a causal text tower, open_clip-compatible.

Chain-of-Models Pre-Training (CoM-PT, Fan et al., CVPR 2026, arXiv 2604.12391) trains a family of CLIP models in
ascending size. The family (paper Sec. 4, and the official code's model configs) is open_clip's ViT-*-16 with the
shared embedding dim fixed at 512 for every member, so that a model and its grown successor live in one space.

The structure mirrors open_clip's `CLIP` (and so OpenAI's) tensor for tensor: the state-dict keys and shapes are
identical, so open_clip checkpoints and the official CoM-PT model zoo load with `strict=True` and no key surgery:
  image: conv patch embedding (no bias) -> [class token; patches] + learned positions -> ln_pre
         -> pre-LN blocks (fused qkv, GELU MLP of ratio 4) -> ln_post on the class token -> @ proj
  text:  token + positional embedding -> causal pre-LN blocks -> ln_final -> pool at the end-of-text token
         (argmax of the ids: EOT has the largest id) -> @ text_projection
  logit_scale: a learnable scalar, initialised to log(1/0.07); the trainer clamps it at log(100).

Deviation: initialisation. open_clip leaves the image tower's block linears at PyTorch's defaults and inits the text
tower with a std scheme; here both towers use the text tower's scheme (attn std w^-0.5, output projections
w^-0.5 (2L)^-0.5, MLP-in (2w)^-0.5), all in one place (`CLIP._init_weights`). Growth (grow.py) only needs a fresh
init of the large model, whatever its scheme.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HEAD_DIM = 64  # fixed across the family: a wider model has more heads, not wider ones
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's input normalisation, per RGB channel
STD = (0.26862954, 0.26130258, 0.27577711)

# name -> tower shapes. The official family (open_clip's ViT-*-16, as configured in the CoM-PT code) and CPU-scale
# members of the same design (head dim 64, MLP ratio 4, embed dim 512) for laptops, tests and the CPU experiments.
SIZES = {
    "nano":      dict(vision_width=192,  vision_layers=6,  text_width=256, text_layers=12),
    "tiny":      dict(vision_width=192,  vision_layers=12, text_width=256, text_layers=12),
    "small":     dict(vision_width=384,  vision_layers=12, text_width=384, text_layers=12),
    "medium":    dict(vision_width=512,  vision_layers=12, text_width=448, text_layers=12),
    "base":      dict(vision_width=768,  vision_layers=12, text_width=512, text_layers=12),
    "large":     dict(vision_width=1024, vision_layers=24, text_width=768, text_layers=12),
    # CPU-scale: 1 to 4 image heads; cpu-nano is cpu-tiny at half the image depth (as nano is tiny), cpu-tiny ->
    # cpu-small doubles the widths (as tiny -> small), cpu-medium sits between small and base (1.5x the widths),
    # cpu-small -> cpu-base doubles the image width and depth (the chain's B -> L step in miniature).
    "cpu-nano":   dict(vision_width=64,  vision_layers=1, text_width=64,  text_layers=2),
    "cpu-tiny":   dict(vision_width=64,  vision_layers=2, text_width=64,  text_layers=2),
    "cpu-small":  dict(vision_width=128, vision_layers=2, text_width=128, text_layers=2),
    "cpu-medium": dict(vision_width=192, vision_layers=2, text_width=192, text_layers=2),
    "cpu-base":   dict(vision_width=256, vision_layers=4, text_width=192, text_layers=2),
}


@dataclass
class CLIPConfig:
    embed_dim: int = 512         # shared image-text embedding dim, the same for every member of a chain
    image_size: int = 224        # pixels (square)
    patch_size: int = 16         # pixels
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77     # tokens, start and end tokens included
    vocab_size: int = 49408      # the end-of-text token must be the largest id
    mlp_ratio: int = 4
    tokenizer: str = "clip-bpe"  # which tokenizer the model was trained with ("clip-bpe" or "byte"; see data.py)

    def __post_init__(self):
        for name, value in self.to_dict().items():
            if name != "tokenizer" and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                             "pick sizes so that the patches tile the image")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width {width} is not divisible by {tower}_heads {heads}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)


def config(size, **overrides):
    """A CLIPConfig for a registered size; data-dependent fields (image_size, patch_size, context_length,
    vocab_size, tokenizer) and, for experiments, any other field can be overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    shape = dict(SIZES[size])
    shape["vision_heads"] = shape["vision_width"] // HEAD_DIM
    shape["text_heads"] = shape["text_width"] // HEAD_DIM
    shape.update(overrides)
    return CLIPConfig(**shape)


# -----------------------------------------------------------------------------
# the transformer, shared by both towers


def attention(q, k, v, causal, use_sdpa=True):
    """Multi-head attention on (B, nh, T, hs) tensors: SDPA's fused kernels, or two matmuls and a softmax (the readable
    reference, and the faster path on a CPU). A test checks that they agree."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    if causal:
        T = q.size(-2)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        att = att.masked_fill(future, float("-inf"))
    fp32_or_more = torch.promote_types(att.dtype, torch.float32)  # the softmax in fp32 at least, as fused kernels do
    return att.softmax(dim=-1, dtype=fp32_or_more).to(v.dtype) @ v  # (B, nh, T, hs)


class Attention(nn.Module):
    # parameter names and layout are nn.MultiheadAttention's (as in open_clip): rows of in_proj are [q; k; v]
    # SDPA on GPUs; on a CPU its fused kernel is slower than the two matmuls for this family's short sequences (17-197
    # tokens: 1.4-1.5x per bf16 training step on the CPUs measured). A class-wide switch: True or False forces a path.
    use_sdpa = None

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        fused = self.use_sdpa if self.use_sdpa is not None else x.device.type != "cpu"
        y = attention(q, k, v, self.causal, fused)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads side by side
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width, ratio):
        super().__init__()
        self.c_fc = nn.Linear(width, ratio * width)
        self.c_proj = nn.Linear(ratio * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    # pre-LN residual block, open_clip's ResidualAttentionBlock
    def __init__(self, width, heads, mlp_ratio, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, causal):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # recompute activations in backward, save memory
            else:
                x = block(x)
        return x


# -----------------------------------------------------------------------------
# the two towers and the CLIP model


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.vision_width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio, causal=False)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, cfg.embed_dim))

    def forward(self, images):
        x = self.conv1(images)  # (B, w, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, w)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, w)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, w), N = grid*grid + 1
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E): the class token


class CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        # the text tower lives at the top level, under open_clip's names and in its order
        w = cfg.text_width
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, causal=True)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # open_clip's text-tower scheme, applied to both towers; LayerNorms stay at (1, 0), biases at 0
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # open_clip's (and OpenAI CLIP's) values
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width, layers in ((self.visual.transformer, self.cfg.vision_width, self.cfg.vision_layers),
                                     (self.transformer, self.cfg.text_width, self.cfg.text_layers)):
            attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.zeros_(block.mlp.c_fc.bias)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
                nn.init.zeros_(block.mlp.c_proj.bias)
        scale = self.cfg.vision_width ** -0.5
        for p in (self.visual.class_embedding, self.visual.positional_embedding, self.visual.proj):
            nn.init.normal_(p, std=scale)
        nn.init.normal_(self.text_projection, std=self.cfg.text_width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):
        return self.visual(images)  # (B, E), unnormalised

    def encode_text(self, tokens):
        T = tokens.shape[-1]  # context_length, or fewer: see trim_tokens
        x = self.token_embedding(tokens) + self.positional_embedding[:T].to(self.token_embedding.weight.dtype)  # (B,T,w)
        x = self.ln_final(self.transformer(x))
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (B, E), unnormalised

    def forward(self, images, tokens):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def trim_tokens(tokens, multiple=8):
    """Tokens (..., C) cut after the batch's longest caption (rounded up to a multiple of 8, so that few shapes occur).
    Exact: the text tower is causal and pools at the end-of-text token, so no later position can reach a pooled one;
    the cut positions are pure padding work (on CLIP data most of the 77)."""
    longest = int(tokens.argmax(dim=-1).max()) + 1  # the end-of-text token has the largest id
    return tokens[..., :min(tokens.shape[-1], -(-longest // multiple) * multiple)]


# -----------------------------------------------------------------------------
# cost: parameters and analytic forward FLOPs (the currency of the chain's ledger)


def count_params(cfg):
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in CLIP(cfg).parameters())


def _transformer_flops(width, layers, tokens, mlp_ratio):
    # per block, multiply-add = 2 FLOPs: qkv 6Td^2, out 2Td^2, MLP 2*2*ratio*Td^2, and the two attention
    # matmuls (QK^T, AV) 2*2*T^2*d. The causal mask is not credited (kernels and FlopCounterMode count it all).
    d, T = width, tokens
    return layers * ((8 + 4 * mlp_ratio) * T * d * d + 4 * T * T * d)


def image_text_flops(cfg):
    """(image, text) forward FLOPs of one image-text pair: matmuls and the patch convolution, multiply-add = 2 FLOPs.
    Norms, activations, softmax and the batch's similarity matrix are left out (< 1%, as in FlopCounterMode).
    Kept apart so that a ledger can count several captions per image."""
    patches = cfg.grid ** 2
    image = 2 * patches * (3 * cfg.patch_size ** 2) * cfg.vision_width  # patch embedding
    image += _transformer_flops(cfg.vision_width, cfg.vision_layers, patches + 1, cfg.mlp_ratio)
    image += 2 * cfg.vision_width * cfg.embed_dim  # proj, class token only
    text = _transformer_flops(cfg.text_width, cfg.text_layers, cfg.context_length, cfg.mlp_ratio)
    text += 2 * cfg.text_width * cfg.embed_dim  # text_projection, EOT token only
    return image, text


def flops_per_sample(cfg):
    """Forward FLOPs of one image-text pair (see image_text_flops)."""
    return sum(image_text_flops(cfg))
