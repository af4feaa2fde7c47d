"""
The main command, `python chain.py --sizes tiny,small,base`, run as a user runs it, for several seeds: the wall time
of each run and every stage's zero-shot top-1 and retrieval R@1, with the mean and the min-max over the seeds, and
whether each grown model ends at or above its predecessor in every seed (the method's claim, on one machine).

    python benchmarks/main_command.py                              # seeds 0, 1, 2: half an hour on 2 idle cores
    python benchmarks/main_command.py --variants                   # and the grown stages' variants: 80 more minutes
    python benchmarks/main_command.py --variants --eval-sets 5     # and 5 evaluation sets each: 30 more minutes

Writes results/main-command.md and results/main-command.json (--name: another name, for another schedule). Each run
goes to runs/main-command/s<seed> and a rerun resumes or reuses it (its wall time is then the recorded one).
"""
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import interop  # noqa: E402
import ledger  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402
import synthetic  # noqa: E402
from results import command, header  # noqa: E402

SIZES = "tiny,small,base"
METRICS = {"zeroshot_top1": "zero-shot top-1", "retrieval_R1": "retrieval R@1 (mean of both ways)"}


def run(seed, runs, extra):
    """One main command (in its own process, as a user runs it); its report.json and wall time in seconds."""
    out = os.path.join(runs, f"s{seed}")
    argv = [sys.executable, os.path.join(HERE, "..", "chain.py"), "--sizes", SIZES, "--seed", str(seed), "--out", out,
            *extra]
    timing, report = os.path.join(out, "wall_time.json"), os.path.join(out, "report.json")
    if not os.path.exists(report):  # a run from scratch is timed; one that resumes or is reused is not
        fresh, t0 = not os.path.exists(out), time.time()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if fresh:
            runtime.save_json({"wall_time_s": time.time() - t0}, timing)
    wall = runtime.load_json(timing, "timing")["wall_time_s"] if os.path.exists(timing) else None
    return runtime.load_json(report, "chain report"), wall


# The second stage's variants (--variants): what happens over the first grown stage's length, growth aside and under
# other recipes, each from the same trained first model. tag: (label, size, grown with FD, peak lr, average fraction,
# steps), the last three of stage i from the chain's manifest m (steps None: the chain's, with its warmup).
LONG = 2 * recipe.MIN_WARMUP  # a stage long enough for a warmup that lets AdamW's second moments settle, and a decay
VARIANTS = {
    "control": ("the first model continued, no growth or FD (the grown-stage recipe at width ratio 1)", 0, False,
                lambda m, i: m["lr"][0], lambda m, i: m["ema"][i], None),
    "official": ("grown, the official recipe (the first stage's peak lr, the last weights)", 1, True,
                 lambda m, i: m["lr"][0], lambda m, i: 0.0, None),
    "whole-average": ("grown, the default peak lr, the average over the whole stage", 1, True,
                      lambda m, i: m["lr"][i], lambda m, i: 1.0, None),
    "length-lr": ("grown, the first stage's peak lr x the stage's share of its steps, the default average", 1, True,
                  lambda m, i: m["lr"][0] * m["steps"][i] / m["steps"][0], lambda m, i: m["ema"][i], None),
    "long": (f"grown, the default recipe, {LONG} steps (warmup {recipe.MIN_WARMUP})", 1, True,
             lambda m, i: m["lr"][i], lambda m, i: m["ema"][i], LONG),
}
CARRIED = ("whole-average", "length-lr", "long")  # carried on to the third stage, grown from their own second stage


def variant(seed, runs, tag, third=False):
    """Seed's second stage trained as VARIANTS[tag] says, from the chain's trained first model, or (third) its third
    stage, grown from that variant's second stage and distilled towards it; its final metrics."""
    _, size, grown, lr, ema, steps = VARIANTS[tag]
    m = runtime.load_json(os.path.join(runs, f"s{seed}", "manifest.json"), "chain manifest")
    i, start = (2, os.path.join(variant_dir(runs, seed, tag), interop.RUN_CHECKPOINT)) if third else \
        (1, os.path.join(runs, f"s{seed}", "1-" + m["sizes"][0], interop.RUN_CHECKPOINT))
    steps, warmup = (steps, recipe.official_warmup(steps, True, recipe.official_epochs(i + 1)[i])) if steps else \
        (m["steps"][i], m["warmup"][i])
    return stage_run(variant_dir(runs, seed, tag, third), m["sizes"][2 if third else size], start,
                     grown, steps, warmup, lr(m, i), ema(m, i), seed)


def variant_dir(runs, seed, tag, third=False):
    """Where a variant's second stage (or, third, its third) trains: beside the seed's chain."""
    return os.path.join(runs, f"s{seed}-{tag}" + "-3" * third)


def stage_run(out, size, start, grown, steps, warmup, lr, ema, seed):
    """train.py in its own process, as a user runs it: `size` from the checkpoint `start` (grown when smaller, and
    distilled towards it when `grown`); its final metrics, kept in out/result.json (a rerun reuses them)."""
    result = os.path.join(out, "result.json")
    if not os.path.exists(result):
        argv = [sys.executable, os.path.join(HERE, "..", "train.py"), "--size", size, "--init-from", start,
                *(["--teacher", start] if grown else []), "--steps", str(steps), "--warmup", str(warmup), "--lr",
                str(lr), "--ema", str(ema), "--seed", str(seed), "--out", out]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        runtime.save_json(train_result(out), result)
    return runtime.load_json(result, "stage result")


def train_result(out):
    """train.py's final evaluation, the last record of its metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "zeroshot_top1" in line][-1]


def values(stage):
    return {"zeroshot_top1": 100 * stage["zeroshot_top1"], "retrieval_R1": 50 * (stage["i2t_R@1"] + stage["t2i_R@1"])}


def speedup(report, manifest, steps):
    """The cost ledger's ratio (each size alone over the chain) of the chain of `report` and `manifest`, had every
    grown stage trained for `steps` steps at the same batch (None: as it did)."""
    rows = report["stages"]
    samples = [r["samples"] * steps / n if steps and i else r["samples"]
               for i, (r, n) in enumerate(zip(rows, manifest["steps"]))]
    forward = [r["flops_per_sample"] for r in rows]
    chain = sum(ledger.training_flops(n, f, t) for n, f, t in zip(samples, forward, [0, *forward[:-1]]))
    return report["totals"]["independent_flops"] / chain


def on_eval_sets(folder, k):
    """values() of the model in `folder` (a chain stage or a variant's run) on the synthetic set's evaluation sets of
    eval seeds 0..k-1: seed 0's is the one every run is scored on; the others are as large and independent of it and
    of each other. In the device's default precision, as train.py scores a run (bf16 on bf16 CPUs). Cached in
    folder/eval-sets.json."""
    path = os.path.join(folder, "eval-sets.json")
    cache = runtime.load_json(path, "evaluation cache") if os.path.exists(path) else {}
    missing = [j for j in range(k) if str(j) not in cache]
    if missing:
        model = interop.load_model(folder)
        tokenizer = data.get_tokenizer(model.cfg.tokenizer)
        for j in missing:
            sets = evaluate.build_eval_sets(tokenizer=tokenizer, image_size=model.cfg.image_size,
                                            context_length=model.cfg.context_length, seed=j, probes=0)
            cache[str(j)] = values(evaluate.evaluate(model, sets, torch.device("cpu")))
            runtime.save_json(cache, path)
    return [cache[str(j)] for j in range(k)]


def resampled(runs, seeds, sizes, k, names):
    """The grown-minus-predecessor differences of the chain and of carried variants (`names`) on k evaluation sets:
    {name: {seed: [stage 2, stage 3, ...] of {metric: [difference per set]}}}."""
    out = {}
    for name in names:
        out[name] = {}
        for s in seeds:
            chain = os.path.join(runs, f"s{s}")
            folders = [os.path.join(chain, f"{i + 1}-{size}") for i, size in enumerate(sizes)] if name == "chain" else \
                [os.path.join(chain, f"1-{sizes[0]}"), variant_dir(runs, s, name), variant_dir(runs, s, name, True)]
            scores = [on_eval_sets(f, k) for f in folders]
            out[name][s] = [{m: [b[j][m] - a[j][m] for j in range(k)] for m in METRICS}
                            for a, b in zip(scores, scores[1:])]
    return out


def resampled_lines(spread, seeds, sizes, k):
    """The markdown of resampled(): per chain and seed, each difference's mean over the k sets (min-max), the verdict
    on those means, and how far one difference moves between sets (its standard deviation over them)."""
    md = [f"On {k} evaluation sets (`--eval-sets {k}`): every model of {' and '.join(spread)} scored on the synthetic "
          f"set's evaluation sets drawn with eval seeds 0-{k - 1} (seed 0's is the one above; each as large: "
          f"{synthetic.ZEROSHOT_PER_CLASS * len(synthetic.CLASSNAMES):,} zero-shot pictures, "
          f"{synthetic.RETRIEVAL_SIZE} "
          f"retrieval pictures with {synthetic.FULL_CAPTIONS} captions each), in the precision train.py scores a run "
          f"in. Grown minus predecessor, the mean over the {k} sets (min-max), points:", ""]
    for name, by_seed in spread.items():
        md += [f"| {name}: seed | " + " | ".join(f"{b} - {a}: {label}" for a, b in zip(sizes, sizes[1:])
                                                 for label in METRICS.values()) + " |",
               "| --- |" + " ---: |" * (len(sizes) - 1) * len(METRICS)]
        for s in seeds:
            md.append(f"| {s} | " + " | ".join(f"{statistics.mean(d[m]):+.1f} ({min(d[m]):+.1f} to {max(d[m]):+.1f})"
                                               for d in by_seed[s] for m in METRICS) + " |")
        held = all(statistics.mean(d[m]) >= 0 for s in seeds for d in by_seed[s] for m in METRICS)
        md += ["", f"{name}: every grown model at or above its predecessor on both metrics in every seed, on the "
               f"mean of the {k} sets: **{'yes' if held else 'no'}**.", ""]
    for m, label in METRICS.items():
        sd = [statistics.stdev(d[m]) for by_seed in spread.values() for s in seeds for d in by_seed[s]]
        md.append(f"One difference's standard deviation between evaluation sets, {label}: {statistics.mean(sd):.1f} "
                  f"points (mean over the {len(sd)} differences; the largest {max(sd):.1f}).  ")
    return md + [""]


def main(argv=None):
    p = runtime.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--runs", default="runs/main-command", help="where the chains go (reused on a rerun)")
    p.add_argument("--out", default="results", help="where the results files go")
    p.add_argument("--name", default="main-command", help="the results files' name: <out>/<name>.md and .json")
    p.add_argument("--conditions", default="idle machine", help="what else ran beside the measurement")
    p.add_argument("--eval-sets", type=int, default=0, help="also score the chains and the long variant on this many "
                   "independent evaluation sets of the same size (the measurement's own noise; 0: off)")
    p.add_argument("--variants", action="store_true", help="also train each seed's second stage as VARIANTS say, "
                   "from the chain's first model (runs/main-command/s<seed>-<variant>)")
    args, extra = p.parse_known_args(argv)  # anything else goes to chain.py
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = {s: run(s, args.runs, extra) for s in seeds}
    variants = {tag: {s: values(variant(s, args.runs, tag)) for s in seeds} for tag in VARIANTS} if args.variants \
        else {}
    third = {tag: {s: values(variant(s, args.runs, tag, third=True)) for s in seeds} for tag in CARRIED} \
        if args.variants else {}
    sizes = SIZES.split(",")
    table = {s: [values(st) for st in rep["stages"]] for s, (rep, _) in reports.items()}
    gains = {s: [{m: rows[i][m] - rows[i - 1][m] for m in METRICS} for i in range(1, len(sizes))]
             for s, rows in table.items()}
    holds = all(g[m] >= 0 for gs in gains.values() for g in gs for m in METRICS)
    timed = {s: (w, sum(st.get("eval_s", 0.0) for st in rep["stages"])) for s, (rep, w) in reports.items()
             if w is not None}
    md = [*header(f"The main command: `python chain.py --sizes {SIZES}{' ' + ' '.join(extra) if extra else ''}`",
                  args.conditions, command(argv and ["benchmarks/main_command.py", *argv])),
          f"Seeds {seeds}; wall time per run, the evaluations included: " + (
              ", ".join(f"seed {s} {w:.0f} s ({e:.0f} s, {100 * e / w:.0f}%, evaluating)" for s, (w, e) in
                        timed.items()) or "not timed") + " (only a run this script starts from scratch is timed).", "",
          "| stage | size | " + " | ".join(f"{label}: mean (min-max)" for label in METRICS.values()) + " |",
          "| --- | --- |" + " --- |" * len(METRICS)]
    for i, size in enumerate(sizes):
        cells = []
        for m in METRICS:
            v = [table[s][i][m] for s in seeds]
            cells.append(f"{statistics.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        md.append(f"| {i + 1} | {size} | " + " | ".join(cells) + " |")
    md += ["", "Each grown model minus its predecessor, per seed (points):", "",
           "| seed | " + " | ".join(f"{b} - {a}: {label}" for a, b in zip(sizes, sizes[1:]) for label in METRICS.values())
           + " |", "| --- |" + " ---: |" * (len(sizes) - 1) * len(METRICS)]
    for s in seeds:
        md.append(f"| {s} | " + " | ".join(f"{g[m]:+.1f}" for g in gains[s] for m in METRICS) + " |")
    md += ["", f"Every grown model at or above its predecessor on both metrics in every seed: **{'yes' if holds else 'no'}**.",
           ""]
    if variants:
        md += [f"The second stage's variants (`--variants`), each trained for {sizes[1]}'s steps (the same warmup) "
               f"from the chain's trained {sizes[0]} unless its line says otherwise; their end minus that {sizes[0]}, "
               "zero-shot top-1 / retrieval R@1 (points):", "",
               "| second stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
               "| --- |" + " ---: |" * (len(seeds) + 1)]
        rows = {f"{sizes[1]}: the chain's (the default recipe)": {s: table[s][1] for s in seeds},
                **{VARIANTS[tag][0]: by_seed for tag, by_seed in variants.items()}}
        for label, by_seed in rows.items():
            diffs = {s: [by_seed[s][m] - table[s][0][m] for m in METRICS] for s in seeds}
            means = [statistics.mean(diffs[s][j] for s in seeds) for j in range(len(METRICS))]
            md.append(f"| {label} | " + " | ".join(" / ".join(f"{d:+.1f}" for d in diffs[s]) for s in seeds) +
                      " | " + " / ".join(f"{d:+.1f}" for d in means) + " |")
        md += ["", f"{len(CARRIED)} variants carried on: {sizes[2]} grown from the variant's {sizes[1]} with the same "
               f"rule ({sizes[2]}'s steps and warmup, or the variant's own). Each grown model minus its predecessor, "
               "zero-shot top-1 / retrieval R@1 (points):", "",
               "| seed | " + " | ".join(f"{tag}: {b} - {a}" for tag in CARRIED for a, b in zip(sizes, sizes[1:]))
               + " |",
               "| --- |" + " ---: |" * 2 * len(CARRIED)]
        steps = {tag: {s: [{m: variants[tag][s][m] - table[s][0][m] for m in METRICS},
                           {m: third[tag][s][m] - variants[tag][s][m] for m in METRICS}] for s in seeds}
                 for tag in CARRIED}
        for s in seeds:
            md.append(f"| {s} | " + " | ".join(" / ".join(f"{g[m]:+.1f}" for m in METRICS)
                                               for tag in CARRIED for g in steps[tag][s]) + " |")
        md.append("")
        for tag in CARRIED:
            held = all(g[m] >= 0 for s in seeds for g in steps[tag][s] for m in METRICS)
            md.append(f"Every model of the {tag} chain at or above its predecessor on both metrics in every seed: "
                      f"**{'yes' if held else 'no'}**.  ")
        md += ["", "Each carried chain's models, zero-shot top-1 / retrieval R@1, mean over the seeds:", ""]
        report = reports[seeds[0]][0]
        manifest = runtime.load_json(os.path.join(args.runs, f"s{seeds[0]}", "manifest.json"), "chain manifest")
        for tag in CARRIED:
            chain = [{s: table[s][0] for s in seeds}, variants[tag], third[tag]]
            md.append(f"- {tag}: " + " -> ".join(
                f"{size} " + " / ".join(f"{statistics.mean(by_seed[s][m] for s in seeds):.1f}" for m in METRICS)
                for size, by_seed in zip(sizes, chain)) +
                f"; {speedup(report, manifest, VARIANTS[tag][5]):.2f}x cheaper than each size alone (the chain's "
                f"ledger: {report['totals']['speedup']:.2f}x)")
        md.append("")
    spread = resampled(args.runs, seeds, sizes, args.eval_sets, ("chain", "long") if args.variants else ("chain",)) \
        if args.eval_sets > 1 else {}
    if spread:
        md += resampled_lines(spread, seeds, sizes, args.eval_sets)
    os.makedirs(args.out, exist_ok=True)
    runtime.save_json(dict(seeds=seeds, wall_time_s={s: w for s, (_, w) in reports.items()}, metrics=table,
                           gains=gains, holds=holds, variants=variants, third_stage=third, eval_sets=spread,
                           reports={s: rep for s, (rep, _) in reports.items()}),
                      os.path.join(args.out, args.name + ".json"))
    runtime.save_text("\n".join(md), os.path.join(args.out, args.name + ".md"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
