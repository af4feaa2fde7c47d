"""
What happens right after growth, and whether the first model leaves the colour-only plateau, on the synthetic set.

    python benchmarks/growth_dip.py             # about 40 minutes on 2 cores (shares its trainings with study.py)

1. The first stage: cpu-tiny, 1000 steps of 64, trained from scratch with the default recipe (peak lr 3e-4) for seeds
   0-9 and with the previous one (1e-3) for seeds 0-4: the final zero-shot top-1 of every seed. A seed that stays at
   the colour-only plateau ends near 15%; one that learns shape too ends above 30%.
2. The first grown stage: cpu-small grown from each cpu-tiny (lossless growth + FD) for 62 steps (1/16 of the first
   stage), with every grown recipe (recipe.py; benchmarks/study.py's RECIPES) and with the previous recipe, seeds
   0-2; each evaluated at step 0 and every tenth of the stage (zero-shot and retrieval, no probes): the curve against
   the predecessor's final score, its end and its lowest point.

Trainings go to runs/study/cpu/ (the same jobs as the study's are reused, not repeated); writes results/growth-dip.md,
results/growth-dip.json and results/growth-dip-zeroshot_top1.svg.
"""
import os
import statistics
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study  # noqa: E402  (and the repository's modules, through it)
from study import METRICS, RECIPE_LABELS, RECIPES, grown_job, measure, old_recipe  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402
from results import command, header  # noqa: E402
from svg import line_chart  # noqa: E402

COLOURS = {"scaled": "#1f77b4", "official": "#d62728", "no-average": "#2ca02c", "unscaled-lr": "#9467bd",
           "old-recipe": "#7f7f7f"}


def plan(config, first_seeds, old_seeds, dip_seeds, fraction):
    """The jobs by name, the first stages {(lr tag, seed): name} and the grown stages {(recipe, seed): name}."""
    jobs, firsts, grown = {}, {}, {}
    L = config.first_steps
    for seed in sorted(set(first_seeds) | set(dip_seeds) | set(old_seeds)):
        first = study.Job(f"s{seed}/{config.sizes[0]}-{L}", config.sizes[0], L, seed)  # as the study names it
        old_first = old_recipe(first)
        if seed in first_seeds or seed in dip_seeds:
            jobs[first.name], firsts["new", seed] = first, first.name
        if seed in old_seeds or seed in dip_seeds:
            jobs[old_first.name], firsts["old", seed] = old_first, old_first.name
        if seed in dip_seeds:
            scaled = grown_job(config.sizes[1], round(fraction * L), first, config.sizes[0],
                               warmup=recipe.official_warmup(round(fraction * L), True,
                                                             recipe.OFFICIAL_EPOCHS[0] * fraction))
            variants = {"scaled": scaled, **{tag: replace(scaled, name=f"{scaled.name}-{tag}", **change)
                                             for tag, change in RECIPES.items()}, "old-recipe": old_recipe(scaled)}
            for tag, job in variants.items():
                jobs[job.name], grown[tag, seed] = job, job.name
    return jobs, firsts, grown


def main(argv=None):
    p = runtime.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default="cpu", choices=["cpu", "smoke"], help="cpu, or smoke (a pipeline check)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="trainings at once, one thread each")
    p.add_argument("--runs", default="runs/study", help="where the trainings go (shared with benchmarks/study.py)")
    p.add_argument("--out", default="results", help="where growth-dip.md / .json / .svg go")
    p.add_argument("--conditions", default="idle machine", help="what else ran beside it, for the header")
    args = p.parse_args(argv)
    config = study.CONFIGS[args.config]
    smoke = args.config == "smoke"
    first_seeds, old_seeds, dip_seeds = ((0, 1), (0,), (0,)) if smoke else (range(10), range(5), range(3))
    fraction = 1 / 4 if smoke else 1 / 16
    root = os.path.join(args.runs, args.config)
    jobs, firsts, grown = plan(config, first_seeds, old_seeds, dip_seeds, fraction)
    try:
        print(f"{len(jobs)} trainings into {root}, {args.workers} at a time", flush=True)
        study.run_all(jobs, config, root, args.workers)
        results = {n: runtime.load_json(os.path.join(root, n, "result.json"), "result") for n in jobs}
    except runtime.USER_ERRORS as e:
        runtime.exit_with(e)
    # 1. the first stage, per seed
    first_md = ["| first stage: peak lr | " + " | ".join(f"seed {s}" for s in sorted({s for _, s in firsts}))
                + " | lowest |", "| --- |" + " ---: |" * (len({s for _, s in firsts}) + 1)]
    first = {}
    for tag, lr, seeds in (("new", recipe.SYNTHETIC_LR, first_seeds), ("old", study.OLD_LR, old_seeds)):
        first[tag] = {s: measure(results[firsts[tag, s]], "zeroshot_top1") for s in seeds}
        first_md.append(f"| {lr:g}{' (default)' if tag == 'new' else ' (previous)'} | " + " | ".join(
            f"{first[tag][s]:.1f}" if s in first[tag] else "-" for s in sorted({s for _, s in firsts}))
            + f" | {min(first[tag].values()):.1f} |")
    # 2. the grown stage against its predecessor, per recipe
    steps = jobs[grown["scaled", dip_seeds[0]]].steps
    dip_md = [f"| {config.sizes[1]}, {steps} steps after {config.sizes[0]} | " + " | ".join(
        f"{label}: end, per seed (mean) | lowest point" for label in METRICS.values()) + " |",
        "| --- |" + " --- | ---: |" * len(METRICS)]
    dips, series = {}, []
    for tag in ("scaled", *RECIPES, "old-recipe"):
        d = [study.dip(root, jobs[grown[tag, s]], results) for s in dip_seeds]
        dips[tag] = {m: dict(end=[x[m]["end"] for x in d], lowest=[x[m]["lowest"] for x in d]) for m in METRICS}
        label = RECIPE_LABELS.get(tag, study.ABLATION_LABELS.get(tag, tag))
        dip_md.append(f"| {label} | " + " | ".join(
            ", ".join(f"{v:+.1f}" for v in dips[tag][m]["end"]) + f" ({statistics.mean(dips[tag][m]['end']):+.1f}) | "
            f"{min(dips[tag][m]['lowest']):+.1f}" for m in METRICS) + " |")
        curves = [study.curve(root, jobs[grown[tag, s]]) for s in dip_seeds]
        before = [measure(results[jobs[grown[tag, s]].start], "zeroshot_top1") for s in dip_seeds]
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        points = [(100 * x, statistics.mean(c[x]["zeroshot_top1"] - b for c, b in zip(curves, before)),
                   min(c[x]["zeroshot_top1"] - b for c, b in zip(curves, before)),
                   max(c[x]["zeroshot_top1"] - b for c, b in zip(curves, before))) for x in xs]
        series.append(dict(label=tag, colour=COLOURS.get(tag, "#000000"), points=points, dashed=tag != "scaled"))
    figure = "growth-dip-zeroshot_top1.svg"
    os.makedirs(args.out, exist_ok=True)
    runtime.save_text(line_chart(series, f"{config.sizes[1]} after growth: zero-shot top-1 minus its predecessor's",
                                 "% of the grown stage", "points (mean of seeds, min-max)"),
                      os.path.join(args.out, figure))
    md = [*header("After growth, and the first stage", args.conditions,
                  command(None if argv is None else ["benchmarks/growth_dip.py", *argv])),
          f"## 1. The first stage: {config.sizes[0]}, {config.first_steps} steps of {config.batch_size}, warmup "
          f"{recipe.SYNTHETIC_WARMUP}, zero-shot top-1 (%)", "", *first_md, "",
          f"## 2. The first grown stage against its predecessor (points; seeds {list(dip_seeds)}; evaluated at step 0 "
          "and every tenth of the stage)", "", *dip_md, "", f"![curves]({figure})", ""]
    runtime.save_json(dict(first_stage=first, after_growth=dips, seeds=dict(first=list(first_seeds),
                           old=list(old_seeds), grown=list(dip_seeds)), results=results),
                      os.path.join(args.out, "growth-dip.json"))
    runtime.save_text("\n".join(md), os.path.join(args.out, "growth-dip.md"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
