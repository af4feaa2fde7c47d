"""
The training recipe of CoM-PT (Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 4) as numbers and two small functions:
open_clip's AdamW and warmup + cosine schedule, the official CC3M schedule of the chain, and the recipes this
repository uses on its embedded synthetic set. train.py, chain.py and evaluate.py's fine-tuning read them here.

Deviations from the paper: grown stages train by default at a width-scaled peak lr and deliver an average of their
weights (the "scaled" recipe; --grown-recipe official is the paper's); on the synthetic set the stages are counted in
steps, not CC3M epochs, at a smaller batch and a lower peak lr. Each constant below says why.
"""

import math

import torch

# -----------------------------------------------------------------------------
# optimisation: open_clip's (and CLIP's) AdamW, schedule and temperature bound

BETAS = (0.9, 0.98)  # CLIP (Radford et al., 2021) and open_clip: beta2 0.98 for stability at large batch
EPS = 1e-6           # CLIP and open_clip
WEIGHT_DECAY = 0.1   # the official CoM-PT scripts'; only on matrices (param_groups)
LOGIT_SCALE_MAX = math.log(100)  # CLIP: the learned temperature is clipped so that logits are scaled by at most 100


def param_groups(model, wd, distill=None):
    """open_clip's AdamW groups: no weight decay for gains, biases and logit_scale (ndim < 2, or bn/ln/bias/logit_scale
    in the name); the distillation projector gets its own group with weight decay (as in CoM-PT's KD stage)."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
              {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0}]
    head = list(distill.parameters()) if distill is not None else []
    if head:
        groups.append({"params": head, "weight_decay": wd})
    return groups


def make_optimizer(model, lr, wd, device, distill=None):
    """AdamW over param_groups with CLIP's betas and eps."""
    fused = device.type in ("cuda", "cpu")  # one kernel for all the parameters' updates
    return torch.optim.AdamW(param_groups(model, wd, distill), lr=lr, betas=BETAS, eps=EPS, fused=fused)


def lr_at(step, total_steps, warmup, base_lr):
    """open_clip's cosine schedule: lr * (step+1) / warmup during warmup, then cosine from lr to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


# -----------------------------------------------------------------------------
# the official CC3M chain (the CoM-PT code's training_script/cc3m_vit)

OFFICIAL_EPOCHS = (128, 24, 16, 16)  # tiny from scratch, then small, base, large; a longer chain repeats the last
OFFICIAL_WARMUP = (8000, 1000)       # steps: the smallest model, every grown one
OFFICIAL_LR = 1e-3                   # peak AdamW lr of every stage
OFFICIAL_BATCH = 1024                # global batch: 8 GPUs x 128
OFFICIAL_CAPTIONS = 7                # captions per image in the paper's long-caption mode
CC3M_SAMPLES = 2_905_954             # CC3M's training pairs: open_clip's reference size, pixparse/cc3m-wds's count
CC3M_STEPS_PER_EPOCH = CC3M_SAMPLES // OFFICIAL_BATCH
MIN_WARMUP = 50  # ~1 / (1 - beta2) steps: AdamW's second-moment estimate needs about that long to settle


def official_epochs(n):
    """The official CC3M epochs of each model of a chain of n: 128, 24, 16, 16, then 16 for any further one."""
    return [OFFICIAL_EPOCHS[min(i, len(OFFICIAL_EPOCHS) - 1)] for i in range(n)]


def official_warmup(steps, grown, epochs):
    """The official warmup (8000 steps for the first model, 1000 for a grown one, over `epochs` CC3M epochs) as the
    same fraction of a stage of `steps` steps: at least MIN_WARMUP, at most half the stage."""
    return min(steps // 2, max(MIN_WARMUP, round(steps * OFFICIAL_WARMUP[grown] / (epochs * CC3M_STEPS_PER_EPOCH))))


# -----------------------------------------------------------------------------
# the grown stages: how a grown model trains without first losing what it inherited

# A function-preserving growth starts the larger model at its predecessor's function, yet the official recipe (a
# fresh AdamW re-warmed to the first stage's peak lr) makes it fall below its predecessor in its first steps: with
# fresh moments, Adam's first updates are sign-like, about lr per coordinate, and growing the width by k spreads each
# inherited unit over k coordinates that all move at once, so the function moves about k times as far per step as
# the predecessor's did (the muP argument, Yang et al., 2022: Adam's lr scales as 1 / width). The default recipe
# ("scaled") divides the grown stage's peak lr by its width ratio to the first model and delivers an exponential
# moving average of its weights, which starts at the grown (= predecessor's) weights; "official" is the paper's.
# results/growth-dip.md measures both (benchmarks/growth_dip.py).
GROWN_RECIPES = ("scaled", "official")
EMA_FRACTION = 0.25  # the average's horizon, as a fraction of the stage: 1 / (1 - decay) = 0.25 x steps


def grown_lr(lr, first_cfg, cfg):
    """The "scaled" recipe's peak lr of a grown model of config `cfg`: the first model's lr x its vision width / this
    model's vision width (AdamW's per-coordinate step, scaled so that the function moves as far per step)."""
    return lr * first_cfg.vision_width / cfg.vision_width


def ema_decay(fraction, total_steps):
    """The per-step decay of an average whose horizon is `fraction` of a stage of `total_steps` steps."""
    return 1 - 1 / max(1.0, fraction * total_steps)


# -----------------------------------------------------------------------------
# the recipe on the embedded synthetic set (synthetic.py), for every size and both scripts

# The official peak lr 1e-3 is for a global batch of 1024. On the synthetic set it leaves some seeds at the
# colour-only plateau (cpu-tiny 1000 steps x 64, seeds 0-4: seed 2 at 17.7% zero-shot), and the paper's 12-layer
# tiny learnt only colour at it (500 steps x 32: loss flat at 3.1); at 3e-4 every one of seeds 0-9 of cpu-tiny learns
# shape too (results/growth-dip.md, part 1), and so does the 12-layer tiny (results/main-command.md).
SYNTHETIC_LR = 3e-4
SYNTHETIC_BATCH = 64
SYNTHETIC_WARMUP = MIN_WARMUP
SYNTHETIC_FIRST_STEPS = 250  # the main command's smallest model (the others: the official proportions of it)
