"""
The model chain of Chain-of-Models Pre-Training (CoM-PT, Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 3) in one
command, with its cost ledger.

The smallest CLIP of the chain is trained from scratch. Every larger one starts from its trained predecessor's weights
(grow.py: the parameter-space transfer) and trains with the CLIP loss plus feature distillation towards the
predecessor (distill.py: the feature-space transfer), for far fewer epochs than training it alone would take.

    python chain.py --sizes tiny,small,base                  # the embedded synthetic set, on a CPU (see README)
    python chain.py --sizes tiny,small,base,large --data 'cc3m/{00000..00331}.tar' --epochs 128,24,16,16 \
        --captions-per-image 7 --batch-size 128              # the paper's CC3M chain (x 8 GPUs under torchrun)

Schedule. `--epochs`, `--steps`, `--warmup` and `--lr` take one value per stage (or one for all). By default they
follow the official CC3M scripts: the smallest model 128 epochs with 8000 warmup steps, the grown ones 24, 16, 16
epochs (a longer chain repeats 16) with 1000, all at peak lr 1e-3; the warmups are kept as the same fraction of each
stage, but at least MIN_WARMUP steps. On the embedded synthetic set the defaults are sized for a CPU: 32 px images,
patch 8, 32 tokens, batch 32, SYNTHETIC_FIRST_STEPS steps for the smallest model and the official proportions for the
rest. The grown models keep the official peak lr: it costs a lossless-grown model some accuracy in its first steps,
which it wins back within a few hundred steps; a lower peak (2e-4) kept the grown models near their predecessor
instead (README, "First evidence").

Cost (notes/clip_ecosystem.md §4.6). A stage costs samples x (3 x student + 1 x teacher) forward FLOPs per sample
(vit.image_text_flops, the text cost x captions per image); the acceleration ratio is the cost of training every size
alone with the first stage's schedule over the chain's total, teachers included. `--dry-run` prints this ledger
without training; for the paper's schedule it gives 71.6% less than large alone and 5.5x against the four
independent runs (the paper: up to 72%, 5.68x). `--baseline` trains those independent runs too (the smallest one
is the chain's first stage itself: same init, same schedule) and puts their accuracy next to the chain's.

Output folder: manifest.json (the run's sizes, schedule and settings), one sub-folder per stage (train.py's
checkpoint.pt, metrics.jsonl, config.json, plus result.json once finished), baseline-<size>/ for --baseline,
report.md and report.json. Rerunning the same command resumes where it stopped (finished stages are not retrained,
an interrupted one resumes at its last checkpoint); a command that does not match the manifest is refused.

Deviations from the official code: one process runs the whole chain, handing each trained model to the next stage
with no manual conversion; the distillation projectors are saved with the student; the growth operator is a flag
(`inherit` is the official one; `lossless` preserves the predecessor's function exactly, see grow.py).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields, replace

import torch

import data
import grow
import interop
import train
import vit
from distill import FeatureDistill

OFFICIAL_EPOCHS = (128, 24, 16, 16)  # training_script/cc3m_vit: tiny from scratch, then small, base, large
OFFICIAL_WARMUP = (8000, 1000)       # steps: the smallest model, every grown one
CC3M_STEPS_PER_EPOCH = 2_905_954 // 1024  # the official global batch, 8 GPUs x 128
OFFICIAL_LR = 1e-3
MIN_WARMUP = 50  # ~1 / (1 - beta2) steps: AdamW's second-moment estimate needs about that long to settle
SYNTHETIC_FIRST_STEPS = 200  # the smallest model's steps on the synthetic set (tiny,small,base: minutes on 2 CPU cores)
SYNTHETIC_SHAPE = dict(image_size=32, patch_size=8, context_length=32)  # the chain's defaults on the synthetic set
DEFAULTS = dict(batch_size=32)  # the chain's own defaults for train.py's flags
PER_STAGE = ("epochs", "steps", "warmup", "lr", "resume")  # train.Settings fields the chain sets per stage
RUNTIME = ("device", "workers", "eval_every", "save_every", "log_every", "grad_checkpointing", "compile")  # free on resume


# -----------------------------------------------------------------------------
# the plan: sizes in ascending order, one model config and schedule per stage


def parse_sizes(text):
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    params = {s: vit.count_params(vit.config(s)) for s in sizes}  # unknown size: ValueError naming the valid ones
    for a, b in zip(sizes, sizes[1:]):
        if params[b] <= params[a] or any(vit.SIZES[b][k] < v for k, v in vit.SIZES[a].items()):
            fix = ",".join(sorted(dict.fromkeys(sizes), key=params.get))
            raise ValueError(f"--sizes must be in ascending order: {b} cannot follow {a} (it is not larger in every "
                             f"dimension); e.g. --sizes {fix}")
    return sizes


def per_stage(text, n, flag, kind=int):
    """A comma list with one value per stage, or one value for every stage."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected a comma list of {kind.__name__}s, one per stage") from None
    if len(values) not in (1, n) or min(values) < 0:
        raise ValueError(f"{flag} {text}: expected one value or {n} (one per size), none negative")
    return values * n if len(values) == 1 else values


def model_config(size, a):
    """The stage's CLIPConfig: 0 means the chain's default (SYNTHETIC_SHAPE on the synthetic set, else CLIP's)."""
    shape = SYNTHETIC_SHAPE if a.data == "synthetic" else dict(image_size=224, patch_size=16, context_length=77)
    tokenizer = data.get_tokenizer("clip-bpe" if a.bpe else "byte", a.bpe or None)
    return vit.config(size, **{k: getattr(a, k) or v for k, v in shape.items()}, vocab_size=tokenizer.vocab_size,
                      tokenizer=tokenizer.name)


def plan(args, settings):
    """Per stage: size, config, the train.Settings of that stage, and its planned number of samples."""
    sizes = parse_sizes(args.sizes)
    n, world = len(sizes), int(os.environ.get("WORLD_SIZE", "1"))
    cfgs = [model_config(s, args) for s in sizes]
    num_samples = settings.num_samples or data.build_train_data(  # as train.train reads it
        settings.data, tokenizer=data.get_tokenizer(cfgs[0].tokenizer, settings.bpe or None),
        image_size=cfgs[0].image_size, context_length=cfgs[0].context_length, batch_size=settings.batch_size,
        workers=0, seed=settings.seed, data_root=settings.data_root or None, csv_img_key=settings.csv_img_key,
        csv_caption_key=settings.csv_caption_key, caption_sep=settings.caption_sep or None).num_samples
    steps_per_epoch = num_samples // (settings.batch_size * world)
    official = [OFFICIAL_EPOCHS[min(i, len(OFFICIAL_EPOCHS) - 1)] for i in range(n)]
    if args.steps:
        steps, epochs = per_stage(args.steps, n, "--steps"), [1] * n
    elif args.epochs or settings.data != "synthetic":
        epochs = per_stage(args.epochs, n, "--epochs") if args.epochs else official
        steps = [e * steps_per_epoch for e in epochs]
    else:  # the synthetic set: the official proportions, in steps
        steps, epochs = [round(SYNTHETIC_FIRST_STEPS * e / official[0]) for e in official], [1] * n
    if args.warmup:
        warmup = per_stage(args.warmup, n, "--warmup")
    else:  # the official warmup as a fraction of its stage, at least MIN_WARMUP steps (at most half the stage)
        warmup = [min(s // 2, max(MIN_WARMUP, round(s * OFFICIAL_WARMUP[i > 0] / (e * CC3M_STEPS_PER_EPOCH))))
                  for i, (s, e) in enumerate(zip(steps, official))]
    if args.lr:
        lr = per_stage(args.lr, n, "--lr", float)
    else:  # the official peak, for every stage
        lr = [OFFICIAL_LR] * n
    stages = [dict(size=size, cfg=cfg, settings=replace(settings, steps=s, epochs=e, warmup=w, lr=r),
                   samples=s * settings.batch_size * world)
              for size, cfg, s, e, w, r in zip(sizes, cfgs, steps, epochs, warmup, lr)]
    for st in stages:
        train.check_settings(st["settings"])  # a bad value stops the run before any stage trains
    return stages


def ledger(cfgs, samples, captions=1):
    """Training FLOPs of each stage (samples x (3 x student + 1 x teacher) forward FLOPs, text x captions) and of
    training each size independently with the first stage's samples; totals, ratio and saving against the largest."""
    fwd = [image + captions * text for image, text in map(vit.image_text_flops, cfgs)]
    rows = [dict(params=vit.count_params(cfg), flops_per_sample=f, samples=n,
                 train_flops=n * (3 * f + (fwd[i - 1] if i else 0)), independent_flops=samples[0] * 3 * f)
            for i, (cfg, f, n) in enumerate(zip(cfgs, fwd, samples))]
    chain, independent = sum(r["train_flops"] for r in rows), sum(r["independent_flops"] for r in rows)
    return rows, dict(train_flops=chain, independent_flops=independent, speedup=independent / chain,
                      saving_vs_largest=1 - chain / rows[-1]["independent_flops"])


# -----------------------------------------------------------------------------
# the chain


def load_model(stage_dir):
    ckpt = torch.load(os.path.join(stage_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    model = vit.CLIP(vit.CLIPConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def run_stage(stage_dir, build):
    """Train once: a finished stage (result.json) is read back, an interrupted one resumes from its checkpoint.
    Under torchrun every rank trains (train() returns rank 0's metrics everywhere); rank 0 writes result.json."""
    path = os.path.join(stage_dir, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = json.loads(json.dumps(build()))  # as it reads back
    if train.is_rank0():
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run_chain(stages, out, grow_method, alpha, init_from="", first_teacher=""):
    results, previous = [], None
    for i, st in enumerate(stages):
        stage_dir = os.path.join(out, f"{i + 1}-{st['size']}")
        if train.is_rank0():
            print(f"== stage {i + 1}/{len(stages)}: {st['size']}" +
                  (f", grown from {previous} ({grow_method}) + FD" if previous else
                   f", from {init_from}" if init_from else ", from scratch"), flush=True)

        def build(st=st, previous=previous):
            torch.manual_seed(st["settings"].seed)
            model = vit.CLIP(st["cfg"])  # fresh init: it fills whatever the growth does not cover
            if previous is None:  # the smallest model: from scratch, or from --init-from; FD towards --teacher
                if init_from:
                    train.initialise(model, *interop.load_state_dict_any(init_from), method=grow_method,
                                     seed=st["settings"].seed, source=f"--init-from {init_from}")
                teacher = interop.load_model(first_teacher) if first_teacher else None
                distill = FeatureDistill(model.cfg.embed_dim, teacher.cfg.embed_dim, alpha) if teacher else None
                return train.train(model, st["settings"], stage_dir, teacher=teacher, distill=distill)
            teacher = load_model(previous)  # the trained predecessor
            model.load_state_dict(grow.grow(teacher.state_dict(), model.state_dict(), teacher.cfg, model.cfg,
                                            method=grow_method, seed=st["settings"].seed))  # parameter space
            distill = FeatureDistill(model.cfg.embed_dim, teacher.cfg.embed_dim, alpha)  # feature space
            return train.train(model, st["settings"], stage_dir, teacher=teacher, distill=distill)

        results.append(run_stage(stage_dir, build))
        previous = stage_dir
    return results


def run_baselines(stages, out, first):
    """Every size trained alone with the first stage's schedule; the smallest is the chain's first stage itself."""
    twins = [first]
    for st in stages[1:]:
        if train.is_rank0():
            print(f"== baseline: {st['size']} from scratch", flush=True)

        def build(st=st):
            torch.manual_seed(st["settings"].seed)
            return train.train(vit.CLIP(st["cfg"]), stages[0]["settings"], os.path.join(out, f"baseline-{st['size']}"))

        twins.append(run_stage(os.path.join(out, f"baseline-{st['size']}"), build))
    return twins


# -----------------------------------------------------------------------------
# manifest and report


def check_manifest(out, manifest):
    """Write the run's manifest, or refuse a command that does not match the one already in `out`."""
    path = os.path.join(out, "manifest.json")
    manifest = json.loads(json.dumps(manifest))  # as it reads back
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key in [*manifest, *old]:  # in the manifest's order: sizes first
            if old.get(key) != manifest.get(key):
                raise ValueError(f"{out} holds another chain run ({key}: {old.get(key)} there, {manifest.get(key)} "
                                 "in this command); rerun its command to resume it, or pass another --out")
    train.from_rank0(None)  # under torchrun: every rank has read it before rank 0 rewrites it
    if train.is_rank0():
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=2)


METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@1")  # the ones report.md shows (report.json: all)


def report(stages, totals, results=None, twins=None):
    """report.json's content and report.md's text; results / twins: train()'s metrics of the chain / the baselines."""
    def measured(r):
        return {k: v for k, v in r.items() if k == "wall_time_s" or k.startswith(("zeroshot", "i2t", "t2i"))}

    def cells(d, keys):
        return [f"{100 * d[k]:.1f}%" if k in d else "-" for k in keys]
    rows = [{k: st[k] for k in ("size", "params", "flops_per_sample", "samples", "train_flops")} for st in stages]
    md = ["| stage | size | params | GFLOPs/sample | samples | training FLOPs | wall (s) | zero-shot top-1 | top-5 | "
          "i2t R@1 | t2i R@1 |", "|" + " --- |" * 11]
    for i, row in enumerate(rows):
        row.update(measured(results[i]) if results else {})
        md.append(f"| {i + 1} | {row['size']} | {row['params'] / 1e6:.1f}M | {row['flops_per_sample'] / 1e9:.3g} | "
                  f"{row['samples']} | {row['train_flops']:.3g} | {round(row['wall_time_s']) if results else '-'} | " +
                  " | ".join(cells(row, METRICS)) + " |")
    if results:
        totals["wall_time_s"] = sum(r["wall_time_s"] for r in results)
    if twins:
        totals["alone_wall_time_s"] = sum(r["wall_time_s"] for r in twins)
    chain_wall = f" in {totals['wall_time_s']:.0f} s" if results else ""
    alone_wall = f" in {totals['alone_wall_time_s']:.0f} s" if twins else ""
    md.append(f"\nChain: {totals['train_flops']:.3g} training FLOPs{chain_wall}. Each size alone with the first stage's "
              f"schedule: {totals['independent_flops']:.3g}{alone_wall}. The chain is **{totals['speedup']:.2f}x** "
              f"cheaper, and **{100 * totals['saving_vs_largest']:.1f}%** cheaper than training {stages[-1]['size']} "
              "alone.")
    if twins:  # each model of the chain against its twin trained alone; the chain's cost to reach it is cumulative
        md += ["\n| size | training FLOPs: chain up to it / alone | " + " | ".join(
            f"{k}: chain / alone" for k in METRICS) + " |", "|" + " --- |" * (2 + len(METRICS))]
        for i, (row, st, twin) in enumerate(zip(rows, stages, twins)):
            row["alone"] = dict(train_flops=st["independent_flops"], samples=stages[0]["samples"], **measured(twin))
            spent = sum(r["train_flops"] for r in rows[:i + 1])
            md.append(f"| {row['size']} | {spent:.3g} / {st['independent_flops']:.3g} | " + " | ".join(
                f"{a} / {b}" for a, b in zip(cells(row, METRICS), cells(row["alone"], METRICS))) + " |")
    return {"stages": rows, "totals": totals}, "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a CoM-PT model chain: the smallest from scratch, each next one "
                                "grown from its predecessor and distilled towards it; report the cost ledger.")
    # the chain
    p.add_argument("--sizes", required=True, help=f"comma list in ascending order, from: {', '.join(vit.SIZES)}")
    p.add_argument("--epochs", default="", help="epochs per stage, comma list (default: 128,24,16,16..., official)")
    p.add_argument("--steps", default="", help="optimizer steps per stage, comma list; overrides --epochs "
                   f"(default on synthetic data: {SYNTHETIC_FIRST_STEPS} for the first, the official proportions after)")
    p.add_argument("--warmup", default="", help="warmup steps per stage, comma list (default: the official "
                   "8000 / 1000 steps as the same fraction of each stage)")
    p.add_argument("--lr", default="", help="peak AdamW learning rate per stage, comma list (default: "
                   f"{OFFICIAL_LR:g}, official)")
    p.add_argument("--grow", default="lossless", choices=grow.METHODS, help="growth operator (see grow.py)")
    p.add_argument("--alpha", type=float, default=500.0, help="weight of the feature-distillation loss")
    p.add_argument("--init-from", default="", help="start the first stage from this checkpoint (open_clip, the CoM-PT "
                   "zoo or ours): loaded when it has the first size's shape, grown (--grow) when smaller")
    p.add_argument("--teacher", default="", help="distil the first stage towards this checkpoint too (--alpha)")
    p.add_argument("--baseline", action="store_true", help="also train every size alone with the first stage's "
                   "schedule, and compare")
    p.add_argument("--out", default="runs/chain", help="output folder of the run")
    p.add_argument("--dry-run", action="store_true", help="print the planned cost ledger and exit")
    # the models' data-dependent shape (0: the data's default)
    p.add_argument("--image-size", type=int, default=0, help="input resolution in pixels (0: 224, or "
                   f"{SYNTHETIC_SHAPE['image_size']} on synthetic data)")
    p.add_argument("--patch-size", type=int, default=0, help="ViT patch size in pixels (0: 16, or "
                   f"{SYNTHETIC_SHAPE['patch_size']} on synthetic data)")
    p.add_argument("--context-length", type=int, default=0, help="text length in tokens (0: 77, or "
                   f"{SYNTHETIC_SHAPE['context_length']} on synthetic data)")
    train.add_settings_args(p, skip=PER_STAGE, defaults=DEFAULTS)  # train.py's flags, for every stage
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = train.Settings(**{f.name: getattr(args, f.name) for f in fields(train.Settings) if f.name not in PER_STAGE})
    try:
        train.check_settings(settings)
        train.init_distributed(train.pick_device(settings.device))  # under torchrun: one process group, all stages
        stages = plan(args, settings)
        rows, totals = ledger([st["cfg"] for st in stages], [st["samples"] for st in stages],
                              settings.captions_per_image)
        for st, row in zip(stages, rows):
            st.update(row)
        if args.dry_run:
            print(report(stages, totals)[1])
            return report(stages, totals)[0]
        check_manifest(args.out, dict(
            sizes=[st["size"] for st in stages], grow=args.grow, alpha=args.alpha, init_from=args.init_from,
            teacher=args.teacher,
            **{k: [getattr(st["settings"], k) for st in stages] for k in ("steps", "warmup", "lr")},
            **{k: v for k, v in asdict(settings).items() if k not in RUNTIME + PER_STAGE},
            models=[st["cfg"].to_dict() for st in stages]))
        t0 = time.time()
        results = run_chain(stages, args.out, args.grow, args.alpha, args.init_from, args.teacher)
        twins = run_baselines(stages, args.out, results[0]) if args.baseline else None
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        train.destroy_distributed()
    if not train.is_rank0():
        return None
    out, md = report(stages, totals, results, twins)
    out.update(command=sys.argv if argv is None else ["chain.py", *argv], git=train.git_hash(),
               session_wall_time_s=time.time() - t0)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return out


if __name__ == "__main__":
    main()
