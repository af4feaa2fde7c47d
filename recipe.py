"""
The training recipe of CoM-PT (Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 4) as numbers and two small functions:
open_clip's AdamW and warmup + cosine schedule, the official CC3M schedule of the chain, and the recipes this
repository uses on its embedded synthetic set. train.py, chain.py and evaluate.py's fine-tuning read them here.

Deviation from the paper: on the synthetic set the stages are counted in steps, not CC3M epochs, at a smaller batch
and (for the paper's 12-layer sizes) a lower peak lr; each constant below says why.
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
    fused = device.type in ("cuda", "cpu")  # one kernel for all the parameters' updates (README, "Speed")
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
# recipes on the embedded synthetic set (synthetic.py): two, for two kinds of model

# train.py's defaults, for its default size cpu-tiny: the 2-layer cpu-* sizes learn well at the official peak lr
# at batch 64 (the study in results/ trains them so), with 100 warmup steps
TRAIN_LR = 1e-3
TRAIN_BATCH = 64
TRAIN_WARMUP = 100

# chain.py's defaults, for the paper's 12-layer sizes (tiny, small, base): the official 1e-3 is for the official
# global batch of 1024; on the synthetic set at batch 32 these sizes learn only colour at 1e-3 (tiny, 500 steps: loss
# flat at 3.1, zero-shot 11.3%), at 3e-4 they learn shape too (loss 2.4, 24.5%); the cpu-* sizes want --lr 1e-3
CHAIN_LR = 3e-4
CHAIN_BATCH = 32
CHAIN_FIRST_STEPS = 500  # the smallest model's steps (tiny,small,base: under 10 min on 2 CPU cores); the others
# take the official proportions of it (OFFICIAL_EPOCHS)
