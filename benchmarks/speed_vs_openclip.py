"""
Training-step speed of this repo against open_clip, side by side in one process, alternating rounds.

Ours is train.train_step exactly as train() runs it (its default precision for the device, AdamW as recipe.make_optimizer
builds it, grad-norm clipping at 1.0, the logit-scale clamp, no text work after a batch's longest caption). open_clip's is its CLIP of the same shape with its
ClipLoss, torch's default AdamW and the clamp, at fp32 and under bf16 autocast (its --precision amp_bf16); the
ratio is ours over open_clip's best. Shapes: the CoM-PT tiny model at 224 px / patch 16 / 77 tokens, with captions
that fill the context (no padding to skip) and with captions of at most 32 tokens (web captions are shorter: CC3M's
average about a dozen words), and at the synthetic set's data shape with its own captions (the main command's first
stage); batch 32; random images. Both contenders get the same batches.

open_clip is not a dependency: run it from an environment that has it, e.g.
    python -m venv --system-site-packages /tmp/oc && /tmp/oc/bin/pip install open_clip_torch
    /tmp/oc/bin/python benchmarks/speed_vs_openclip.py               # ~3 min on 2 CPU cores
Without open_clip it times ours alone. Run it on an otherwise idle machine: two cores are easily swamped. Writes
results/speed-vs-openclip.md (--conditions states the machine's load there).
"""
import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import data  # noqa: E402
import recipe  # noqa: E402
import results  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from tokenizer import VOCAB_SIZES  # noqa: E402

try:
    import open_clip
except ImportError:
    open_clip = None

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--size", default="tiny", help=f"model size: {', '.join(vit.SIZES)}")
parser.add_argument("--batch-size", type=int, default=32, help="image-text pairs per step")
parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; each contender's best round counts")
parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--conditions", default="not stated (pass --conditions, e.g. 'idle machine')",
                    help="the machine's state, for the results file")
parser.add_argument("--out", default="speed-vs-openclip.md", help="results file name under results/")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
device = runtime.pick_device(args.device)
synthetic = data.default_shape("synthetic")
SHAPES = {  # name -> the data shape, and how long the captions of a batch are
    "224 px, patch 16, 77 tokens, captions of 77 tokens": (dict(image_size=224, patch_size=16, context_length=77,
                                                                vocab_size=VOCAB_SIZES["clip-bpe"]), 77),
    "224 px, patch 16, 77 tokens, captions of at most 32": (dict(image_size=224, patch_size=16, context_length=77,
                                                                 vocab_size=VOCAB_SIZES["clip-bpe"]), 32),
    f"{synthetic['image_size']} px, patch {synthetic['patch_size']}, {synthetic['context_length']} tokens, the synthetic "
    "set's captions (the main command's stage 1)": (dict(image_size=synthetic["image_size"],
                                                         patch_size=synthetic["patch_size"],
                                                         context_length=synthetic["context_length"],
                                                         vocab_size=VOCAB_SIZES["byte"]),
                                                    "synthetic")}


def batch(cfg, captions):
    """Random images; tokens of random captions whose longest has `captions` tokens, or a batch of the synthetic
    set's own captions."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    if captions == "synthetic":
        tokens = next(data.build_train_data("synthetic", tokenizer=synthetic["tokenizer"], image_size=cfg.image_size,
                                            context_length=cfg.context_length, batch_size=args.batch_size, workers=0,
                                            seed=0).batches(0))[1]
        return images, tokens.to(device)
    tokens = torch.randint(1, cfg.vocab_size - 1, (args.batch_size, cfg.context_length), generator=g)
    lengths = torch.randint(captions // 3, captions + 1, (args.batch_size,), generator=g)
    lengths[0] = captions  # the longest caption, end-of-text token included
    positions = torch.arange(cfg.context_length)
    tokens[positions >= lengths[:, None]] = 0  # padding after the caption
    tokens[torch.arange(args.batch_size), lengths - 1] = cfg.vocab_size - 1  # end-of-text (the largest id)
    return images, tokens.to(device)


def ours(cfg, captions):
    torch.manual_seed(0)
    model = vit.CLIP(cfg).to(device).train()
    settings = train.Settings(device=args.device)
    objective, optimizer = train.Objective(model), recipe.make_optimizer(model, settings.lr, settings.wd, device)
    images, tokens = batch(cfg, captions)
    return lambda: train.train_step(objective, optimizer, images, tokens, settings.lr, settings.grad_clip)


def theirs(cfg, captions, precision):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=dict(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width, layers=cfg.vision_layers),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                      heads=cfg.text_heads, layers=cfg.text_layers)).to(device).train()
    loss_fn = open_clip.ClipLoss()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1}],
                                  lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    images, tokens = batch(cfg, captions)

    def step():
        with runtime.autocast(device, precision):
            loss = loss_fn(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()
    return step


def time_round(step):
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * args.steps / (time.perf_counter() - t0)


lines = results.header("Training-step speed against open_clip", args.conditions) + [
    f"{device}; CPU bf16 matrix instructions: {runtime.has_bf16_matmul()}; our default precision: "
    f"{runtime.default_precision(device)}; open_clip {open_clip.__version__ if open_clip else 'not installed'}. "
    f"Samples/s, the best of {args.rounds} alternating rounds of {args.steps} steps per contender.", "",
    f"| shape ({args.size}, batch {args.batch_size}) | ours | open_clip fp32 | open_clip bf16 autocast | ours / "
    "open_clip's best |", "| --- | ---: | ---: | ---: | ---: |"]
print("\n".join(lines))
for name, (shape, captions) in SHAPES.items():
    cfg = vit.config(args.size, **shape)
    contenders = {"ours": ours(cfg, captions)}
    if open_clip:
        contenders.update({"fp32": theirs(cfg, captions, "fp32"), "bf16": theirs(cfg, captions, "bf16")})
    for step in contenders.values():  # warm up: first-call allocations, oneDNN primitive caches
        step(), step()
    best = {k: 0.0 for k in contenders}
    for _ in range(args.rounds):  # alternating, so that a change in the machine's load hits all alike
        for k, step in contenders.items():
            best[k] = max(best[k], time_round(step))
    theirs_best = max((v for k, v in best.items() if k != "ours"), default=float("nan"))
    cells = [f"{best.get(k, float('nan')):.1f}" for k in ("ours", "fp32", "bf16")]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {best['ours'] / theirs_best:.2f}x |")
    print(lines[-1], flush=True)
print(f"wrote {results.write(args.out, lines)}")
