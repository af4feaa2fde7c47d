"""
Training-step throughput of open_clip's own CLIP, the yardstick for benchmarks/train_step.py.

Builds open_clip's `CLIP` with the CoM-PT "tiny" shape (ViT-T-16-text-w256 in the official code: vision
192 wide x 12 layers, text 256 wide x 12 layers, 4 heads, embed dim 512, patch 16, image 224, context 77),
and times full training steps (forward, open_clip's ClipLoss, backward, AdamW step, logit-scale clamp) on
random data. open_clip is not a dependency of this repo: run this script from a throwaway environment,
e.g. `python -m venv --system-site-packages /tmp/ocvenv && /tmp/ocvenv/bin/pip install open_clip_torch`,
then `/tmp/ocvenv/bin/python benchmarks/openclip_step.py`.
"""
import argparse
import math
import time

import torch

try:
    import open_clip
except ImportError:
    raise SystemExit("error: open_clip is not installed; run this with a Python that has open_clip_torch")

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--batch-size", type=int, default=32, help="images (and captions) per step")
parser.add_argument("--image-size", type=int, default=224, help="input resolution in pixels")
parser.add_argument("--steps", type=int, default=5, help="timed training steps")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
device = torch.device(args.device)

# -----------------------------------------------------------------------------
# the model: open_clip's CLIP with the official ViT-T-16-text-w256 shape
model_cfg = dict(
    embed_dim=512,
    vision_cfg=dict(image_size=args.image_size, layers=12, width=192, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=12),
)
model = open_clip.CLIP(**model_cfg).to(device).train()
loss_fn = open_clip.ClipLoss()
# open_clip's parameter groups: no weight decay on gains, biases and logit_scale
no_decay = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
params = list(model.named_parameters())
optimizer = torch.optim.AdamW(
    [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
     {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": 0.1}],
    lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
)
n_params = sum(p.numel() for p in model.parameters())

images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
tokens = torch.randint(1, 49406, (args.batch_size, 77), device=device)
tokens[:, 20] = 49407  # end-of-text token (the largest id) where argmax pooling reads the caption


def step():
    image_features, text_features, logit_scale = model(images, tokens)
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


for _ in range(args.warmup):
    step()
sync()
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t0)
median = sorted(times)[len(times) // 2]
print(f"open_clip {open_clip.__version__}, torch {torch.__version__}, device {device}, "
      f"threads {torch.get_num_threads()}, params {n_params / 1e6:.2f}M")
print(f"tiny (ViT-T-16-text-w256) @ {args.image_size}px, batch {args.batch_size}, fp32: "
      f"median step {median:.3f} s, {args.batch_size / median:.1f} samples/s "
      f"(min {min(times):.3f} s, max {max(times):.3f} s over {args.steps} steps)")
