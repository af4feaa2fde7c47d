"""
grow.py at full size: the wall time of one growth step (both methods) and, for lossless growth, how far the grown
model is from its predecessor on the same inputs in float64: exact to rounding except for the image tower's ln_pre
at a non-integer width ratio (base -> large, 768 -> 1024: the one inexact piece, grow.py's docstring).

The predecessor is "trained-like" (random, but no LayerNorm at gain 1 and no zero bias, which would hide the
ln_pre error): LN gains 1 + std N(0, 1), biases 0.1 N(0, 1), logit scale ln 50. Timed on fp32 state dicts, as a
training run would hand them over; the check runs in float64 with a constant and with a random ln_pre gain.

    python benchmarks/grow_bench.py                        # base -> large: ~1-2 min on 2 CPU cores, ~8 GB memory
    python benchmarks/grow_bench.py --small tiny --big small --gain-std 0.1
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import grow  # noqa: E402
import vit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--small", default="base", help=f"predecessor size: {', '.join(vit.SIZES)}")
parser.add_argument("--big", default="large", help="successor size")
parser.add_argument("--gain-std", type=float, default=0.3, help="spread of the predecessor's LayerNorm gains")
parser.add_argument("--repeats", type=int, default=2, help="timed growths per method (the best is reported)")
parser.add_argument("--skip-check", action="store_true", help="time only, no float64 comparison")
args = parser.parse_args()

small_cfg, big_cfg = vit.config(args.small), vit.config(args.big)
torch.manual_seed(0)
small, big = vit.CLIP(small_cfg).eval(), vit.CLIP(big_cfg).eval()
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # a trained-like predecessor
    for name, p in small.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif ".ln" in name or name.startswith("ln"):
            p.copy_(1 + args.gain_std * torch.randn(p.shape, generator=g))
    small.logit_scale.fill_(torch.tensor(50.0).log())
small_state, big_state = small.state_dict(), big.state_dict()
print(f"{args.small} ({vit.count_params(small_cfg) / 1e6:.1f}M) -> {args.big} ({vit.count_params(big_cfg) / 1e6:.1f}M)"
      f", {torch.get_num_threads()} threads")

for method in ("lossless", "inherit"):
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        grow.grow(small_state, big_state, small_cfg, big_cfg, method=method)
        times.append(time.perf_counter() - t0)
    print(f"grow {method:8s}: {min(times):6.2f} s (best of {args.repeats})")

if not args.skip_check:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, small_cfg.image_size, small_cfg.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, small_cfg.vocab_size - 1, (4, small_cfg.context_length), generator=g)
    for i, eot in enumerate([5, 20, 40, 76]):  # end of text (the largest id) at varying positions, then padding
        tokens[i, eot], tokens[i, eot + 1:] = small_cfg.vocab_size - 1, 0
    big64 = {k: v.double() for k, v in big_state.items()}
    del big, big_state

    def features(cfg, state):
        with torch.device("meta"):
            model = vit.CLIP(cfg)
        model.load_state_dict(state, assign=True)
        with torch.no_grad():
            image, text = model.encode_image(images), model.encode_text(tokens)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1), model.logit_scale.exp()

    for gain in ("random", "constant"):
        state = {k: v.double() for k, v in small_state.items()}
        if gain == "constant":
            state["visual.ln_pre.weight"].fill_(1.3)
        img_a, txt_a, scale = features(small_cfg, state)
        img_b, txt_b, _ = features(big_cfg, grow.grow(state, big64, small_cfg, big_cfg, method="lossless"))
        logits = (scale * img_a @ txt_a.T - scale * img_b @ txt_b.T).abs().max()
        print(f"lossless, {gain:8s} ln_pre gain: max |diff| normalised image {(img_a - img_b).abs().max():.1e}, "
              f"text {(txt_a - txt_b).abs().max():.1e}, logits at scale {scale:.0f} {logits:.1e}")
