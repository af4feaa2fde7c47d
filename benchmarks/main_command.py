"""
The main command, `python chain.py --sizes tiny,small,base`, run as a user runs it, for several seeds: the wall time
of each run and every stage's zero-shot top-1 and retrieval R@1, with the mean and the min-max over the seeds, and
whether each grown model ends at or above its predecessor in every seed (the method's claim, on one machine).

    python benchmarks/main_command.py               # seeds 0, 1, 2: about half an hour on 2 idle cores
    python benchmarks/main_command.py --variants    # and the second stage's variants: 20 more minutes

Writes results/main-command.md and results/main-command.json. Each run goes to runs/main-command/s<seed> and a rerun
resumes or reuses it (its wall time is then the recorded one).
"""
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import interop  # noqa: E402
import runtime  # noqa: E402
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
# other recipes, each from the same trained first model. tag: (label, size, grown with FD, peak lr, average fraction),
# the last two of stage i from the chain's manifest m.
VARIANTS = {
    "control": ("the first model continued, no growth or FD (the grown-stage recipe at width ratio 1)", 0, False,
                lambda m, i: m["lr"][0], lambda m, i: m["ema"][i]),
    "official": ("grown, the official recipe (the first stage's peak lr, the last weights)", 1, True,
                 lambda m, i: m["lr"][0], lambda m, i: 0.0),
    "whole-average": ("grown, the default peak lr, the average over the whole stage", 1, True,
                      lambda m, i: m["lr"][i], lambda m, i: 1.0),
    "length-lr": ("grown, the first stage's peak lr x the stage's share of its steps, the default average", 1, True,
                  lambda m, i: m["lr"][0] * m["steps"][i] / m["steps"][0], lambda m, i: m["ema"][i]),
}
CARRIED = ("whole-average", "length-lr")  # carried on to the third stage, grown from their own second stage


def variant(seed, runs, tag, third=False):
    """Seed's second stage trained as VARIANTS[tag] says, from the chain's trained first model, or (third) its third
    stage, grown from that variant's second stage and distilled towards it; its final metrics."""
    _, size, grown, lr, ema = VARIANTS[tag]
    m = runtime.load_json(os.path.join(runs, f"s{seed}", "manifest.json"), "chain manifest")
    i, start = (2, os.path.join(runs, f"s{seed}-{tag}", interop.RUN_CHECKPOINT)) if third else \
        (1, os.path.join(runs, f"s{seed}", "1-" + m["sizes"][0], interop.RUN_CHECKPOINT))
    return stage_run(os.path.join(runs, f"s{seed}-{tag}" + "-3" * third), m["sizes"][2 if third else size], start,
                     grown, m["steps"][i], m["warmup"][i], lr(m, i), ema(m, i), seed)


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


def main(argv=None):
    p = runtime.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--runs", default="runs/main-command", help="where the chains go (reused on a rerun)")
    p.add_argument("--out", default="results", help="where main-command.md / .json go")
    p.add_argument("--conditions", default="idle machine", help="what else ran beside the measurement")
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
    md = [*header(f"The main command: `python chain.py --sizes {SIZES}`{' ' + ' '.join(extra) if extra else ''}",
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
        md += [f"The second stage's variants (`--variants`), each trained for {sizes[1]}'s steps (the same warmup) from "
               f"the chain's trained {sizes[0]}; their end minus that {sizes[0]}, zero-shot top-1 / retrieval R@1 "
               "(points):", "", "| second stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
               "| --- |" + " ---: |" * (len(seeds) + 1)]
        rows = {f"{sizes[1]}: the chain's (the default recipe)": {s: table[s][1] for s in seeds},
                **{VARIANTS[tag][0]: by_seed for tag, by_seed in variants.items()}}
        for label, by_seed in rows.items():
            diffs = {s: [by_seed[s][m] - table[s][0][m] for m in METRICS] for s in seeds}
            means = [statistics.mean(diffs[s][j] for s in seeds) for j in range(len(METRICS))]
            md.append(f"| {label} | " + " | ".join(" / ".join(f"{d:+.1f}" for d in diffs[s]) for s in seeds) +
                      " | " + " / ".join(f"{d:+.1f}" for d in means) + " |")
        md += ["", f"Two variants carried on: {sizes[2]} grown from the variant's {sizes[1]} with the same rule "
               f"({sizes[2]}'s steps and warmup). Each grown model minus its predecessor, zero-shot top-1 / retrieval "
               "R@1 (points):", "", "| seed | " + " | ".join(f"{tag}: {b} - {a}" for tag in CARRIED for a, b in
                                                              zip(sizes, sizes[1:])) + " |",
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
        md.append("")
    os.makedirs(args.out, exist_ok=True)
    runtime.save_json(dict(seeds=seeds, wall_time_s={s: w for s, (_, w) in reports.items()}, metrics=table,
                           gains=gains, holds=holds, variants=variants, third_stage=third,
                           reports={s: rep for s, (rep, _) in reports.items()}),
                      os.path.join(args.out, "main-command.json"))
    runtime.save_text("\n".join(md), os.path.join(args.out, "main-command.md"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
