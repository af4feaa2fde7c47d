"""
Training-step throughput of train.py's step (forward, CLIP loss, backward, grad clipping, AdamW, logit-scale clamp).

Times `train.train_step` exactly as `train()` runs it (same optimizer groups, same precision policy: bf16 autocast
on CUDA and on CPUs with bf16 matrix instructions, else fp32) on random data, with captions that fill the context.
The default is the CoM-PT "tiny" model at 224 px, batch 32, context 77, CLIP BPE vocab. For the comparison with
open_clip, side by side, see benchmarks/speed_vs_openclip.py.

    python benchmarks/train_step.py                                   # tiny @ 224 px, batch 32, this CPU
    python benchmarks/train_step.py --size base --batch-size 128 --device cuda
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import recipe  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--size", default="tiny", help=f"model size: {', '.join(vit.SIZES)}")
parser.add_argument("--batch-size", type=int, default=32, help="images (and captions) per step")
parser.add_argument("--image-size", type=int, default=224, help="input resolution in pixels")
parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size in pixels")
parser.add_argument("--context-length", type=int, default=77, help="text length in tokens")
parser.add_argument("--vocab-size", type=int, default=49408, help="49408 (CLIP BPE) or 259 (byte tokenizer)")
parser.add_argument("--steps", type=int, default=5, help="timed training steps")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
parser.add_argument("--grad-clip", type=float, default=1.0, help="train.py's clipping norm (0: off, open_clip's default)")
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
device = runtime.pick_device(args.device)

cfg = vit.config(args.size, image_size=args.image_size, patch_size=args.patch_size,
                 context_length=args.context_length, vocab_size=args.vocab_size)
model = vit.CLIP(cfg).to(device).train()
model.set_grad_checkpointing(args.grad_checkpointing)
settings = train.Settings()
objective = train.Objective(model)
optimizer = recipe.make_optimizer(model, settings.lr, settings.wd, device)

images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
tokens = torch.randint(1, args.vocab_size - 1, (args.batch_size, args.context_length), device=device)
tokens[:, -1] = args.vocab_size - 1  # end-of-text token (the largest id) last: captions fill the context


def step():
    train.train_step(objective, optimizer, images, tokens, settings.lr, args.grad_clip)  # syncs (.tolist())


for _ in range(args.warmup):
    step()
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
median = sorted(times)[len(times) // 2]
precision = runtime.default_precision(device)
print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
      f"params {vit.count_params(cfg) / 1e6:.2f}M, {vit.flops_per_sample(cfg) / 1e9:.2f} GFLOPs/sample forward")
print(f"{args.size} @ {args.image_size}px, batch {args.batch_size}, {precision}: median step {median:.3f} s, "
      f"{args.batch_size / median:.1f} samples/s (min {min(times):.3f} s, max {max(times):.3f} s over {args.steps} "
      f"steps), {3 * vit.flops_per_sample(cfg) * args.batch_size / median / 1e12:.2f} TFLOP/s (3 x forward)")
