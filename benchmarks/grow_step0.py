"""
Growth at step 0: train a CPU-scale CLIP on the synthetic set, grow it to the next size with each method of grow.py,
and evaluate every grown model before it takes a single training step, next to its predecessor and to a fresh init.
Lossless growth should reproduce the predecessor's numbers; the official operator (inherit) shows what it loses.

The predecessor is trained with train.py's defaults at the synthetic set's data shape (data.default_shape) into
OUT/SMALL; a finished run there is reused. Writes results/grow-step0-SMALL-BIG.md and .json. Evaluation: evaluate.evaluate on evaluate.build_eval_sets("synthetic")
(48-class zero-shot, 500-image retrieval with 5 captions each), plus the CLIP loss on the retrieval pairs
(first caption of each image).

    python benchmarks/grow_step0.py                                  # cpu-tiny -> cpu-small
    python benchmarks/grow_step0.py --small cpu-small --big cpu-base
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402
import grow  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from clip_loss import clip_loss  # noqa: E402
from results import header  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--small", default="cpu-tiny", help=f"predecessor size: {', '.join(vit.SIZES)}")
parser.add_argument("--big", default="cpu-small", help="successor size")
parser.add_argument("--steps", type=int, default=1000, help="training steps of the predecessor")
parser.add_argument("--batch-size", type=int, default=64, help="image-text pairs per training step")
parser.add_argument("--seed", type=int, default=0, help="seed of the inits, the data order and the growth noise")
parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
parser.add_argument("--out", default="runs/grow_step0", help="output folder of the predecessor's run")
parser.add_argument("--results", default="results", help="where grow-step0-SMALL-BIG.md / .json go")
parser.add_argument("--conditions", default="idle machine", help="what else ran beside it, for the header")
args = parser.parse_args()

shape = data.default_shape("synthetic")  # the synthetic set's image size, patch, context and tokenizer
tokenizer = data.get_tokenizer(shape["tokenizer"])
small_cfg, big_cfg = (vit.config(size, **shape, vocab_size=tokenizer.vocab_size) for size in (args.small, args.big))
device = runtime.pick_device(args.device)

torch.manual_seed(args.seed)
small = vit.CLIP(small_cfg)
settings = train.Settings(steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device,
                          eval_every=0, save_every=0, log_every=100, probes=0)
train.train(small, settings, os.path.join(args.out, args.small))  # resumes (and so skips) a finished run

torch.manual_seed(args.seed + 1)
fresh = vit.CLIP(big_cfg)  # the successor's own init, which supplies what the predecessor does not cover
models = {f"{args.small} (trained predecessor)": small, f"{args.big}, fresh init": fresh}
for method in ("inherit", "inherit_qkv", "lossless"):
    model = vit.CLIP(big_cfg)
    model.load_state_dict(grow.grow(small.state_dict(), fresh.state_dict(), small_cfg, big_cfg, method, args.seed))
    models[f"{args.big}, grown: {method}"] = model

eval_sets = evaluate.build_eval_sets("synthetic", tokenizer=tokenizer, image_size=small_cfg.image_size,
                                     context_length=small_cfg.context_length)
results = {}
for name, model in models.items():
    model.to(device).eval()
    with torch.no_grad():
        batches = eval_sets["retrieval"]["batches"]
        loss = sum(clip_loss(*model(x.to(device), t[:, 0].to(device))).item() * len(x) for x, t in batches)
    results[name] = {"clip_loss": loss / sum(len(x) for x, _ in batches),
                     **evaluate.evaluate(model, eval_sets, device, "fp32")}  # fp32: lossless growth is exact

columns = ["clip_loss", "zeroshot_top1", "zeroshot_top5", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"]
md = [*header(f"Growth at step 0: {args.small} -> {args.big}", args.conditions),
      f"The predecessor trained {args.steps} steps x {args.batch_size} with train.py's recipe (seed {args.seed}); every "
      "model evaluated in fp32 before any training step (the synthetic zero-shot task and 500-picture retrieval; %).",
      "", "| model | CLIP loss | zero-shot top-1 | top-5 | I->T R@1 | R@5 | T->I R@1 | R@5 |",
      "| --- |" + " ---: |" * len(columns)]
for name, metrics in results.items():
    cells = [f"{metrics['clip_loss']:.3f}"] + [f"{100 * metrics[c]:.1f}" for c in columns[1:]]
    md.append(f"| {name} | " + " | ".join(cells) + " |")
print("\n".join(md))
os.makedirs(args.results, exist_ok=True)
name = os.path.join(args.results, f"grow-step0-{args.small}-{args.big}")
runtime.save_text("\n".join(md) + "\n", name + ".md")
runtime.save_json({"args": vars(args), "results": results}, name + ".json")
