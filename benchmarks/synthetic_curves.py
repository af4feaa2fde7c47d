"""
Learning curves on the synthetic set: train one model alone with train.py's recipe and measure, every N steps, what
it knows: zero-shot top-1/top-5, retrieval R@1 both ways, and a linear probe per attribute on its frozen image
features (what the image tower has learned, whether or not the captions made the model use it).

The recipe is train.py's own (train.Objective and train_step, recipe.make_optimizer and lr_at: the synthetic recipe
of recipe.py, grad clip 1, train.py's precision for the device) on synthetic.TrainData at the set's data shape
(synthetic.py: image size, patch, context, byte tokenizer). Prints a table; writes results/synthetic-curves-SIZE.md
(with --set: results/synthetic-curves-SIZE-NAME=VALUE.md) and OUT/SIZE.json.

    python benchmarks/synthetic_curves.py --size cpu-tiny --steps 1000 --eval-every 250     # about a minute, 1 thread
    python benchmarks/synthetic_curves.py --size cpu-base --steps 5000 --eval-every 1000
    python benchmarks/synthetic_curves.py --set TILTED=0 --out runs/upright       # another design of the set
"""
import argparse
import ast
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evaluate  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402
import synthetic  # noqa: E402
import tokenizer as tokenizers  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from results import header  # noqa: E402


def measure(model, eval_sets, device, precision):
    """Zero-shot and retrieval (evaluate.evaluate), and the linear probe of each attribute (evaluate.attribute_probes)."""
    metrics = evaluate.evaluate(model, eval_sets, device, precision)
    out = {k: metrics[k] for k in COLUMNS}
    out.update(evaluate.attribute_probes(model, eval_sets["probes"], device, precision))
    return out


def run(size, steps, eval_every, seed=0, batch_size=recipe.SYNTHETIC_BATCH, lr=recipe.SYNTHETIC_LR, warmup=recipe.SYNTHETIC_WARMUP,
        device="cpu", precision="", log=print):
    """Train `size` alone for `steps` steps; returns the list of evaluation records (step, metrics, time)."""
    device = torch.device(device)
    precision = precision or runtime.default_precision(device)
    tokenizer = tokenizers.get_tokenizer(synthetic.TOKENIZER)
    cfg = vit.config(size, image_size=synthetic.IMAGE_SIZE, patch_size=synthetic.PATCH_SIZE,
                     context_length=synthetic.CONTEXT_LENGTH, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name)
    torch.manual_seed(seed)
    model = vit.CLIP(cfg).to(device).train()
    settings = train.Settings(lr=lr, warmup=warmup, batch_size=batch_size, seed=seed)
    objective = train.Objective(model).to(device)
    optimizer = recipe.make_optimizer(model, settings.lr, settings.wd, device)
    data = synthetic.TrainData(synthetic.NUM_SAMPLES, batch_size, seed, tokenizer=tokenizer, device=device)
    eval_sets = synthetic.build_eval_sets(tokenizer, seed=seed)
    records, step, train_time = [], 0, 0.0
    while step < steps:
        epoch, first = divmod(step, data.steps_per_epoch)
        t0 = time.time()
        for images, tokens in data.batches(epoch, first):
            lr_now = recipe.lr_at(step, steps, settings.warmup, settings.lr)
            losses = train.train_step(objective, optimizer, images, tokens, lr_now, settings.grad_clip,
                                      precision=precision)
            step += 1
            if step % eval_every == 0 or step == steps:
                break
        train_time += time.time() - t0
        if step % eval_every == 0 or step == steps:
            record = {"step": step, "loss": losses["loss"], "train_s": round(train_time, 1),
                      "logit_scale": model.logit_scale.exp().item(), **measure(model, eval_sets, device, precision)}
            records.append(record)
            log(format_record(record))
    return records


COLUMNS = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@1")


def format_record(record):
    probes = " ".join(f"{k[6:]} {100 * v:.0f}" for k, v in record.items() if k.startswith("probe_"))
    main = " ".join(f"{k} {100 * record[k]:.1f}" for k in COLUMNS)
    return f"step {record['step']:5d} loss {record['loss']:.3f} {main} | probe: {probes} | {record['train_s']}s"


def table(size, records):
    names = [k for k in records[0] if k.startswith("probe_")]
    head = ["step", "zero-shot top-1", "top-5", "I->T R@1", "T->I R@1"] + [f"probe {n[6:]}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in records:
        lines.append("| " + " | ".join([str(r["step"])] + [f"{100 * r[k]:.1f}" for k in COLUMNS + tuple(names)]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", default="cpu-tiny", help=f"model size: {', '.join(vit.SIZES)}")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of batch --batch-size")
    parser.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps, and at the end")
    parser.add_argument("--batch-size", type=int, default=recipe.SYNTHETIC_BATCH, help="image-text pairs per step")
    parser.add_argument("--lr", type=float, default=recipe.SYNTHETIC_LR, help="peak learning rate (train.py's default)")
    parser.add_argument("--warmup", type=int, default=recipe.SYNTHETIC_WARMUP, help="linear warmup steps, then cosine to 0 at --steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and the eval sets")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="", help="fp32, bf16 or fp16 autocast (default: train.py's for the device)")
    parser.add_argument("--out", default="runs/synthetic_curves", help="output folder of SIZE.json")
    parser.add_argument("--results", default="results", help="where synthetic-curves-SIZE.md goes")
    parser.add_argument("--conditions", default="idle machine", help="what else ran beside it, for the header")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="another design of the set: a constant of synthetic.py, e.g. TILTED=0 or TWO_OBJECTS=0.5")
    args = parser.parse_args()
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        if not hasattr(synthetic, name) or not name.isupper():
            parser.error(f"--set {assignment}: synthetic.py has no constant {name}")
        setattr(synthetic, name, ast.literal_eval(value))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    records = run(args.size, args.steps, args.eval_every, args.seed, args.batch_size, args.lr, args.warmup,
                  device=args.device, precision=args.precision)
    print(f"\n{args.size}, batch {args.batch_size}, {args.threads} thread(s), {time.time() - t0:.0f} s in all\n")
    print(table(args.size, records))
    design = "".join(f"-{a}" for a in args.set)
    md = [*header(f"Learning curves on the synthetic set: {args.size}{' (' + ', '.join(args.set) + ')' if args.set else ''}",
                  args.conditions), f"Batch {args.batch_size}, peak lr {args.lr:g}, warmup "
          f"{args.warmup}, {args.threads} thread(s), {time.time() - t0:.0f} s in all.", "", table(args.size, records), ""]
    os.makedirs(args.results, exist_ok=True)
    runtime.save_text("\n".join(md), os.path.join(args.results, f"synthetic-curves-{args.size}{design}.md"))
    os.makedirs(args.out, exist_ok=True)
    runtime.save_json({"args": vars(args), "torch": torch.__version__, "records": records},
                      os.path.join(args.out, f"{args.size}.json"))


if __name__ == "__main__":
    main()
