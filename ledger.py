"""
The cost ledger of a model chain, and the chain's report (CoM-PT, Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 4:
a chain's training cost against training each of its models alone).

The FLOP convention: a training step costs 3 x the student's forward FLOPs per image-text pair (forward + backward)
plus 1 x its teacher's forward (vit.image_text_flops; the text tower once per caption), and each size alone trains
with the first stage's schedule. With it the official CC3M chain tiny -> small -> base -> large (128/24/16/16 epochs,
7 captions per image) costs 5.52x less than the four alone and 71.6% less than large alone (the paper: 5.68x for
four models, "up to 72%"; tests/test_chain.py pins both).
"""

import vit


def forward_flops(cfg, captions=1):
    """Forward FLOPs of one image with `captions` captions."""
    image, text = vit.image_text_flops(cfg)
    return image + captions * text


def training_flops(samples, student, teacher=0):
    """FLOPs of training on `samples` image-text pairs a model of `student` forward FLOPs per pair, distilled from a
    teacher of `teacher` forward FLOPs per pair (0: none): 3 x the student's (forward + backward) + the teacher's."""
    return samples * (3 * student + teacher)


def ledger(cfgs, samples, captions=1, teacher=None):
    """Training FLOPs of each stage (configs `cfgs`, `samples` pairs each; each stage's teacher is its predecessor, the
    first stage's is `teacher`: chain.py's --teacher config, or None) and of training each size alone, from scratch,
    with the first stage's samples; totals, the acceleration ratio and the saving against the largest model alone."""
    fwd = [forward_flops(cfg, captions) for cfg in cfgs]
    teachers = [forward_flops(teacher, captions) if teacher is not None else 0, *fwd[:-1]]
    rows = [dict(params=vit.count_params(cfg), flops_per_sample=f, samples=n, train_flops=training_flops(n, f, t),
                 independent_flops=training_flops(samples[0], f))
            for cfg, f, t, n in zip(cfgs, fwd, teachers, samples)]
    chain, independent = sum(r["train_flops"] for r in rows), sum(r["independent_flops"] for r in rows)
    return rows, dict(train_flops=chain, independent_flops=independent, speedup=independent / chain,
                      saving_vs_largest=1 - chain / rows[-1]["independent_flops"])


METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@1")  # the ones report.md shows (report.json: all)


def report(stages, ledger_rows, totals, results=None, twins=None):
    """report.json's content and report.md's text; ledger_rows, totals: ledger(); results / twins: train()'s metrics of
    the chain / the baselines."""
    def measured(r):
        return {k: v for k, v in r.items() if k in ("wall_time_s", "eval_s") or
                k.startswith(("zeroshot", "i2t", "t2i", "probe_"))}

    def cells(d, keys):
        return [f"{100 * d[k]:.1f}%" if d.get(k) is not None else "-" for k in keys]  # None: undefined (top-5 of 4)
    rows = [dict(size=st.size, **{k: r[k] for k in ("params", "flops_per_sample", "samples", "train_flops")},
                 **(measured(results[i]) if results else {})) for i, (st, r) in enumerate(zip(stages, ledger_rows))]
    md = ["| stage | size | params | GFLOPs/sample | samples | training FLOPs | wall (s) | zero-shot top-1 | top-5 | "
          "i2t R@1 | t2i R@1 |", "|" + " --- |" * 11]
    for i, row in enumerate(rows):
        md.append(f"| {i + 1} | {row['size']} | {row['params'] / 1e6:.1f}M | {row['flops_per_sample'] / 1e9:.3g} | "
                  f"{row['samples']} | {row['train_flops']:.3g} | {round(row['wall_time_s']) if results else '-'} | " +
                  " | ".join(cells(row, METRICS)) + " |")
    if results:
        totals["wall_time_s"] = sum(r["wall_time_s"] for r in results)
        totals["eval_s"] = sum(r.get("eval_s", 0.0) for r in results)  # a stage finished by an older version: none
    if twins:
        totals["alone_wall_time_s"] = sum(r["wall_time_s"] for r in twins)
    chain_wall = f" in {totals['wall_time_s']:.0f} s ({totals['eval_s']:.0f} s of it evaluating)" if results else ""
    alone_wall = f" in {totals['alone_wall_time_s']:.0f} s" if twins else ""
    md.append(f"\nChain: {totals['train_flops']:.3g} training FLOPs{chain_wall}. Each size alone with the first stage's "
              f"schedule: {totals['independent_flops']:.3g}{alone_wall}. The chain is **{totals['speedup']:.2f}x** "
              f"cheaper, and **{100 * totals['saving_vs_largest']:.1f}%** cheaper than training {stages[-1].size} "
              "alone.")
    if twins:  # each model of the chain against its twin trained alone; the chain's cost to reach it is cumulative
        md += ["\n| size | training FLOPs: chain up to it / alone | " + " | ".join(
            f"{k}: chain / alone" for k in METRICS) + " |", "|" + " --- |" * (2 + len(METRICS))]
        for i, (row, ledger_row, twin) in enumerate(zip(rows, ledger_rows, twins)):
            alone = ledger_row["independent_flops"]
            row["alone"] = dict(train_flops=alone, samples=stages[0].samples, **measured(twin))
            spent = sum(r["train_flops"] for r in rows[:i + 1])
            md.append(f"| {row['size']} | {spent:.3g} / {alone:.3g} | " + " | ".join(
                f"{a} / {b}" for a, b in zip(cells(row, METRICS), cells(row["alone"], METRICS))) + " |")
    probes = [k for k in rows[0] if k.startswith("probe_")] if results else []
    if probes:  # the synthetic set's attribute probes: what each image tower knows, beyond the zero-shot task
        md += ["\nLinear probes of the image features, top-1 per attribute" + (" (chain / alone)" if twins else "") +
               ":\n", "| size | " + " | ".join(k[6:] for k in probes) + " |", "|" + " --- |" * (1 + len(probes))]
        for row in rows:
            pairs = zip(cells(row, probes), cells(row["alone"], probes)) if twins else ((a,) for a in cells(row, probes))
            md.append(f"| {row['size']} | " + " | ".join(" / ".join(p) for p in pairs) + " |")
    return {"stages": rows, "totals": totals}, "\n".join(md) + "\n"
