"""
The model chain of Chain-of-Models Pre-Training (CoM-PT, Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 3) in one
command, with its cost ledger (ledger.py).

The smallest CLIP of the chain is trained from scratch. Every larger one starts from its trained predecessor's weights
(grow.py: the parameter-space transfer) and trains with the CLIP loss plus feature distillation towards the
predecessor (distill.py: the feature-space transfer), for far fewer epochs than training it alone would take.

    python chain.py --sizes tiny,small,base                  # the embedded synthetic set, on a CPU (README)
    python chain.py --sizes tiny,small,base,large --data 'cc3m/{00000..00331}.tar' --captions-per-image 7 \
        --batch-size 128                                     # the paper's CC3M chain (x 8 GPUs under torchrun)

A run writes one folder per stage (train.py's files, plus result.json once finished), manifest.json and report.md /
report.json; the same command, run by as many processes, resumes it; one that does not match the manifest is refused.

Deviations from the official code: one process runs the whole chain, handing each trained model to the next stage
with no manual conversion; the distillation projectors are saved with the students; the growth operator is a flag
(`inherit` is the official one; `lossless`, the default, preserves the predecessor's function exactly).
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import data
import evaluate
import flags
import grow
import interop
import ledger
import recipe
import runtime
import train
import vit

RESULT = "result.json"  # a finished stage's metrics, beside train.py's files
PER_STAGE = ("epochs", "steps", "warmup", "lr", "ema", "resume")  # flags.Settings fields the chain sets per stage
RUNTIME = flags.FREE_ON_RESUME + ("workers",)  # free on resume (train.resume refuses the workers of tar shards)


@dataclass
class Stage:
    size: str
    cfg: vit.CLIPConfig
    settings: flags.Settings  # this stage's schedule
    samples: int  # image-text pairs it will see
    dir: str  # its output folder
    label: str  # how it starts, for the console


# -----------------------------------------------------------------------------
# the chain


def run_chain(stages, model, teacher, grow_method, alpha):
    """The paper's loop: the first model trains (from scratch, or as main built it: --init-from, --teacher); every
    larger one is grown from its trained predecessor and trained with feature distillation towards it."""
    results = []
    for i, stage in enumerate(stages):
        if i > 0:
            teacher = model  # the trained predecessor
            model = grown(teacher, stage, grow_method)  # parameter space
        distill = train.distillation(model, teacher, alpha)  # feature space: FD towards the teacher
        results.append(train_stage(stage, model, teacher, distill))  # trains `model` in place
    return results


def grown(teacher, stage, method):
    """The stage's model, freshly initialised (it fills whatever the growth does not cover), then grown from the
    teacher's weights."""
    model = train.first_model(stage.cfg, stage.settings.seed)
    small = {k: v.cpu() for k, v in teacher.state_dict().items()}
    model.load_state_dict(grow.grow(small, model.state_dict(), teacher.cfg, model.cfg, method=method,
                                    seed=stage.settings.seed))
    return model


def train_stage(stage, model, teacher=None, distill=None):
    """Train `model` for one stage, once: a finished stage (result.json) is read back into `model`, an interrupted
    one resumes from its checkpoint. Under torchrun every rank trains; rank 0 writes result.json."""
    path = os.path.join(stage.dir, RESULT)
    if os.path.exists(path):
        ckpt = interop.load_checkpoint(os.path.join(stage.dir, interop.RUN_CHECKPOINT), model.cfg)  # of this model?
        model.load_state_dict(interop.trained_state(ckpt))
        return runtime.load_json(path, "stage result")
    if runtime.is_rank0():
        print(f"== {stage.label}", flush=True)
    result = json.loads(json.dumps(train.train(model, stage.settings, stage.dir, teacher=teacher, distill=distill)))
    if runtime.is_rank0():  # as it reads back
        runtime.save_json(result, path)
    return result


def run_baselines(stages, out, first_result):
    """Every size trained alone with the first stage's schedule; the smallest is the chain's first stage itself."""
    twins = [first_result]
    for stage in stages[1:]:
        twin = replace(stages[0], size=stage.size, cfg=stage.cfg, dir=os.path.join(out, f"baseline-{stage.size}"),
                       label=f"baseline: {stage.size} from scratch")
        twins.append(train_stage(twin, train.first_model(twin.cfg, twin.settings.seed)))
    return twins


# -----------------------------------------------------------------------------
# the plan: sizes in ascending order, one model config and schedule per stage


def schedule(args, settings, cfgs):
    """Steps, epochs, warmup, peak lr and weight average per stage. By default the official CC3M scripts' lengths
    (recipe.py): the smallest model 128 epochs with 8000 warmup steps, the grown ones 24, 16, 16 (a longer chain
    repeats 16) with 1000, the warmups kept as the same fraction of each stage, but at least MIN_WARMUP steps; on the
    synthetic set SYNTHETIC_FIRST_STEPS steps for the smallest model and the official proportions for the rest. Peak
    lr: the first stage's (1e-3, official; SYNTHETIC_LR on the synthetic set); the grown stages' follow the grown
    recipe (scaled: grown_lr and an average of the weights; official: the same lr, no average)."""
    n, official = len(cfgs), recipe.official_epochs(len(cfgs))
    if args.steps:
        steps, epochs = flags.per_stage(args.steps, n, "--steps"), [1] * n
    elif args.epochs or settings.data != "synthetic":
        epochs = flags.per_stage(args.epochs, n, "--epochs") if args.epochs else official
        num_samples = settings.num_samples or data.source_size(settings)  # as train.train reads it
        steps = [e * runtime.steps_per_epoch(num_samples, settings.batch_size, runtime.world_size()) for e in epochs]
    else:
        steps, epochs = [round(recipe.SYNTHETIC_FIRST_STEPS * e / official[0]) for e in official], [1] * n
    warmup = flags.per_stage(args.warmup, n, "--warmup") if args.warmup else [
        recipe.official_warmup(s, i > 0, e) for i, (s, e) in enumerate(zip(steps, official))]
    scaled = args.grown_recipe == "scaled"
    lr = flags.per_stage(args.lr, n, "--lr", float) if args.lr else \
        [recipe.SYNTHETIC_LR if settings.data == "synthetic" else recipe.OFFICIAL_LR] * n
    if "," not in args.lr:  # one value, the first stage's: the grown stages' follow the grown recipe
        lr = [recipe.grown_lr(lr[0], cfgs[0], c) if scaled and i else lr[0] for i, c in enumerate(cfgs)]
    ema = [recipe.EMA_FRACTION if scaled and i else 0.0 for i in range(n)]
    return [dict(steps=s, epochs=e, warmup=w, lr=r, ema=a) for s, e, w, r, a in zip(steps, epochs, warmup, lr, ema)]


def plan(args, settings, like=None):
    """One Stage per size. like: the config of --init-from / --teacher, whose data shape is then the default."""
    sizes = flags.parse_sizes(args.sizes)
    cfgs = [flags.model_config(size, args, like) for size in sizes]
    stages = []
    for i, (size, cfg, when) in enumerate(zip(sizes, cfgs, schedule(args, settings, cfgs))):
        start = (f"grown from {sizes[i - 1]} ({args.grow_method}) + FD" if i else
                 (f"from {args.init_from}" if args.init_from else "from scratch") +
                 (f" + FD towards {args.teacher}" if args.teacher else ""))
        samples = when["steps"] * settings.batch_size * runtime.world_size()  # the global batch's
        stage = Stage(size, cfg, replace(settings, **when), samples,
                      os.path.join(args.out, f"{i + 1}-{size}"), f"stage {i + 1}/{len(sizes)}: {size}, {start}")
        flags.check_settings(stage.settings)  # a bad value stops the run before any stage trains
        stages.append(stage)
    return stages


# -----------------------------------------------------------------------------
# command line: inputs checked before any work, the run's manifest, main


def check_manifest(out, manifest):
    """Write the run's manifest, or refuse a command that does not match the one already in `out`."""
    path = os.path.join(out, "manifest.json")
    manifest = json.loads(json.dumps(manifest))  # as it reads back
    if os.path.exists(path):
        old = runtime.load_json(path, "chain manifest")
        for key in [*manifest, *old]:  # in the manifest's order: sizes first, then the number of processes
            there, here = old.get(key), manifest.get(key)
            if there != here and key == "world_size" and there is not None:  # as train.py's refusal says it
                raise ValueError(f"{out} holds a chain run by {there} process{'es' * (there != 1)}, not {here}; resume "
                                 "it with as many (torchrun --nproc_per_node x --nnodes), or pass another --out")
            if there != here:
                raise ValueError(f"{out} holds another chain run ({key}: {there} there, {here} in this command); "
                                 "rerun its command to resume it, or pass another --out")
    runtime.from_rank0(None)  # under torchrun: every rank has read it before rank 0 rewrites it
    if runtime.is_rank0():
        os.makedirs(out, exist_ok=True)
        runtime.save_json(manifest, path)


def check_inputs(stage):
    """Open the stage's tokenizer, data and evaluation sets as train() will, so that a bad one stops the run before
    anything is written."""
    tokenizer = data.get_tokenizer(stage.cfg.tokenizer, stage.settings.bpe or None)
    data.train_data_for(stage.settings, stage.cfg, tokenizer, *runtime.rank_and_world())
    if runtime.is_rank0():  # the one that evaluates
        evaluate.eval_sets_for(stage.settings, stage.cfg, tokenizer)


def parse_args(argv=None):
    p = runtime.ArgumentParser(description="Train a CoM-PT model chain: the smallest from scratch, each next one "
                                "grown from its predecessor and distilled towards it; report the cost ledger.")
    p.add_argument("--sizes", required=True, help=f"comma list in ascending order, from: {', '.join(vit.SIZES)}")
    p.add_argument("--epochs", default="", help="epochs per stage, comma list (default: "
                   f"{','.join(map(str, recipe.OFFICIAL_EPOCHS))}..., official)")
    p.add_argument("--steps", default="", help="optimizer steps per stage, comma list; overrides --epochs (default on "
                   f"synthetic data: {recipe.SYNTHETIC_FIRST_STEPS} for the first, the official proportions after)")
    p.add_argument("--warmup", default="", help="warmup steps per stage, comma list (default: the official "
                   f"{' / '.join(map(str, recipe.OFFICIAL_WARMUP))} steps as the same fraction of each stage)")
    p.add_argument("--lr", default="", help="peak AdamW learning rate: one value, the first stage's (the grown "
                   "stages' follow --grown-recipe), or a comma list, one per stage (default: "
                   f"{recipe.OFFICIAL_LR:g}, official; synthetic data: {recipe.SYNTHETIC_LR:g})")
    p.add_argument("--grown-recipe", default="scaled", choices=recipe.GROWN_RECIPES, help="how grown stages train: "
                   "scaled (peak lr / width ratio to the first model, an average of the weights delivered) or official "
                   "(the paper's: the first stage's peak lr, the last weights)")
    p.add_argument("--baseline", action="store_true", help="also train every size alone with the first stage's "
                   "schedule, and compare")
    p.add_argument("--out", default="runs/chain", help="output folder of the run")
    p.add_argument("--dry-run", action="store_true", help="print the cost ledger this command would report, and "
                   "exit; no data is read (a real source needs --num-samples), and the models are those of --data "
                   "(synthetic: the byte tokenizer; the paper's CLIP-vocabulary models: add --tokenizer clip-bpe)")
    flags.add_model_args(p)  # the data shape; --init-from, --teacher: the first stage's; --grow-method, --alpha: all
    flags.add_settings_args(p, skip=PER_STAGE)  # train.py's flags, for every stage
    return p.parse_args(argv)


@runtime.stops_cleanly(runtime.RERUN_TO_RESUME)  # Ctrl-C, SIGTERM: one line, exit 130 / 143
def main(argv=None):
    args = parse_args(argv)
    settings = flags.Settings(**{f.name: getattr(args, f.name) for f in fields(flags.Settings)
                                 if f.name not in PER_STAGE})
    try:  # every input is checked before anything is written
        flags.check_settings(settings)
        runtime.init_distributed(runtime.pick_device(settings.device))  # under torchrun: one process group
        init = interop.load_state_dict_any(args.init_from) if args.init_from else None
        teacher = interop.load_model(args.teacher) if args.teacher else None
        stages = plan(args, settings, like=init[1] if init else teacher.cfg if teacher else None)
        rows, totals = ledger.ledger([st.cfg for st in stages], [st.samples for st in stages],
                                     settings.captions_per_image, teacher.cfg if teacher else None)
        if args.dry_run:
            summary, md = ledger.report(stages, rows, totals)
            cfg = stages[0].cfg  # the data shape, the same at every stage
            print(f"Models for {settings.data} data: {cfg.image_size} px in {cfg.patch_size} px patches, "
                  f"{cfg.context_length} tokens, {cfg.tokenizer} tokenizer ({cfg.vocab_size} ids).\n\n{md}")
            return summary
        runtime.check_out_dir(args.out)
        check_inputs(stages[0])
        model = train.first_model(stages[0].cfg, settings.seed, init, args.grow_method, args.init_from)
        runtime.hold_out_dir(args.out)  # one run at a time in --out, until main returns (the report included)
        check_manifest(args.out, dict(
            sizes=[st.size for st in stages], world_size=runtime.world_size(),  # with batch_size: the global batch
            grow_method=args.grow_method, grown_recipe=args.grown_recipe, alpha=args.alpha, init_from=args.init_from,
            teacher=args.teacher,
            **{k: [getattr(st.settings, k) for st in stages] for k in ("steps", "warmup", "lr", "ema")},
            **{k: v for k, v in asdict(settings).items() if k not in RUNTIME + PER_STAGE},
            models=[st.cfg.to_dict() for st in stages]))
        t0 = time.time()
        results = run_chain(stages, model, teacher, args.grow_method, args.alpha)
        twins = run_baselines(stages, args.out, results[0]) if args.baseline else None
    except runtime.USER_ERRORS as e:  # one line, no traceback: 2 for bad input, 1 for a run that stopped (NaN, disk)
        runtime.exit_with(e)
    finally:
        runtime.destroy_distributed()
    if not runtime.is_rank0():
        return None
    out, md = ledger.report(stages, rows, totals, results, twins)
    out.update(command=sys.argv if argv is None else ["chain.py", *argv], git=runtime.git_hash(),
               session_wall_time_s=time.time() - t0)
    try:
        runtime.save_json(out, os.path.join(args.out, "report.json"))
        runtime.save_text(md, os.path.join(args.out, "report.md"))
    except OSError as e:
        runtime.exit_with(e)
    print(md)
    return out


if __name__ == "__main__":
    main()
