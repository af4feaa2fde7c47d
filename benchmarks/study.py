"""
The paper's claims, measured: models of a chain against the same models trained alone, on the synthetic set.

    python benchmarks/study.py                  # the CPU configuration (cpu-* sizes), about 1 hour on 2 cores
    python benchmarks/study.py --config gpu     # tiny, small, base, for a GPU
    python benchmarks/study.py --report         # only rewrite results/ from the trainings already finished

Every training runs once, into runs/study/<config>/<job>/, and a rerun resumes or reuses it (chain.train_stage); the
trainings run in as many processes as there are cores, one thread each. It writes results/study-<config>.md,
results/study-<config>.json and results/study-<config>-*.svg. What is measured, with settings fixed before any run:

1. Accuracy against cost. Each larger size trained alone, with its own full schedule, for 1/8, 1/4, 1/2 and 1 of
   the first stage's steps L; and chained: grown (lossless) from the trained predecessor and distilled towards it
   (alpha 500) for 1/16, 1/8, 1/4 and 1/2 of L, the predecessor itself chained with the same fraction. The cost of a
   chained model is cumulative: its predecessors' training and the teachers' forward passes included (the ledger's
   convention). Several seeds: mean and spread (min to max). Alone runs are separate runs rather than points of one
   long run, because a point in the middle of a cosine schedule has not annealed and would understate training alone.
2. The paper's schedule, and family size: chains of 3 and 4 models with the official stage lengths (128 : 24 : 16 :
   16 ...), the acceleration ratio of each, and every member against its twin trained alone for L steps.
3. Ablations of the first grown stage, from the same trained first stage: growth and FD (the method), growth only
   (alpha 0), FD only (fresh init + FD), neither; the official growth operator (inherit); the grown recipes
   (recipe.py: the official one, no weight average, the first stage's lr); and the previous recipe (peak lr 1e-3 for
   both stages, the official grown stage).
4. The ledger of the official CC3M chain (chain.py --dry-run).
5. After growth: every grown stage is evaluated at step 0 and every tenth of its steps; its end and its lowest point
   against its predecessor's final score.
"""
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import chain  # noqa: E402
import data  # noqa: E402
import interop  # noqa: E402
import ledger  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from distill import ALPHA  # noqa: E402
from results import command, header  # noqa: E402
from svg import line_chart  # noqa: E402


@dataclass(frozen=True)
class Config:
    sizes: tuple  # the chain of part 1, smallest first
    first_steps: int  # L
    batch_size: int
    seeds: tuple
    fractions: tuple  # part 1: grown-stage lengths, as fractions of L
    alone: tuple  # part 1: alone-run lengths, as fractions of L
    families: tuple  # part 2: chains with the official stage lengths
    ablation_fraction: float  # part 3: the grown stage's length, as a fraction of L
    ablation_seeds: tuple
    device: str = "cpu"


CONFIGS = {
    "cpu": Config(sizes=("cpu-tiny", "cpu-small", "cpu-base"), first_steps=1000, batch_size=64, seeds=(0, 1, 2),
                  fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2), alone=(1 / 8, 1 / 4, 1 / 2, 1),
                  families=(("cpu-tiny", "cpu-small", "cpu-base"), ("cpu-tiny", "cpu-small", "cpu-medium", "cpu-base")),
                  ablation_fraction=1 / 4, ablation_seeds=(0,)),
    "gpu": Config(sizes=("tiny", "small", "base"), first_steps=4000, batch_size=256, seeds=(0, 1, 2),
                  fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2), alone=(1 / 8, 1 / 4, 1 / 2, 1),
                  families=(("tiny", "small", "base"), ("tiny", "small", "medium", "base"),
                            ("nano", "tiny", "small", "medium", "base")),
                  ablation_fraction=1 / 4, ablation_seeds=(0,), device="cuda"),
    "smoke": Config(sizes=("cpu-tiny", "cpu-small"), first_steps=16, batch_size=8, seeds=(0, 1), fractions=(1 / 4,),
                    alone=(1 / 2, 1), families=(("cpu-tiny", "cpu-small"),), ablation_fraction=1 / 4,
                    ablation_seeds=(0,)),  # a minute: checks the pipeline, not the claims
}
CC3M_CHAIN = "tiny,small,base,large"  # part 4: the paper's four-model chain
METRICS = {"zeroshot_top1": "zero-shot top-1", "retrieval_R@1": "retrieval R@1 (mean of both ways)"}


@dataclass(frozen=True)
class Job:
    name: str  # its folder under runs/study/<config>/
    size: str
    steps: int
    seed: int
    start: str = ""  # the job whose trained model this one is grown from ("": a fresh init)
    teacher: str = ""  # the job whose trained model this one is distilled towards ("": none)
    grow_method: str = "lossless"
    alpha: float = ALPHA
    lr: float = recipe.SYNTHETIC_LR
    warmup: int = recipe.SYNTHETIC_WARMUP
    ema: float = 0.0  # train.py's --ema: the weight average's horizon as a fraction of the stage
    eval_steps: int = 0  # evaluate every this many steps from step 0 (the curves after growth)


def fraction_name(f):
    return f"{f.as_integer_ratio()[0]}-{f.as_integer_ratio()[1]}" if f < 1 else f"{f:g}"


# -----------------------------------------------------------------------------
# the trainings


def plan(config):
    """Every training of the study, by name "s<seed>/<key>" (each job after the ones it starts from), and the keys
    of each part of the report: alone and chained (per size), family (the chains), ablation ((tag, key) pairs)."""
    L, jobs = config.first_steps, {}
    E = recipe.OFFICIAL_EPOCHS[0]  # L steps stand for the first model's official CC3M epochs
    parts = dict(alone={s: [] for s in config.sizes[1:]}, chained={s: [] for s in config.sizes[1:]}, family=[],
                 ablation=[])

    def add(job, part=None):
        jobs.setdefault(job.name, job)
        if part is not None and key(job.name) not in part:
            part.append(key(job.name))
        return job

    def alone(size, steps, seed):  # the first stage's official warmup fraction
        return Job(f"s{seed}/{size}-{steps}", size, steps, seed, warmup=recipe.official_warmup(steps, False,
                                                                                               E * steps / L))

    def grown(size, steps, predecessor, first=config.sizes[0]):  # the official warmup fraction, the default recipe
        return grown_job(size, steps, predecessor, first, warmup=recipe.official_warmup(steps, True, E * steps / L))

    for seed in sorted(set(config.seeds) | set(config.ablation_seeds)):
        first = add(alone(config.sizes[0], L, seed))
        if seed in config.seeds:  # part 1
            for size in config.sizes[1:]:
                for f in config.alone:
                    add(alone(size, round(f * L), seed), parts["alone"][size])
            for f in config.fractions:
                predecessor = first
                for size in config.sizes[1:]:
                    predecessor = add(grown(size, round(f * L), predecessor), parts["chained"][size])
        if seed in config.ablation_seeds:  # part 3: the first grown stage, one setting changed at a time
            method = add(grown(config.sizes[1], round(config.ablation_fraction * L), first))
            if seed == config.ablation_seeds[0]:
                parts["ablation"].append(("method", key(method.name)))
            for tag, change in ablations(method.steps):
                variant = add(replace(method, name=f"{method.name}-{tag}", eval_steps=0, **change))  # no curve
                if seed == config.ablation_seeds[0]:
                    parts["ablation"].append((tag, key(variant.name)))
            add(old_recipe(first))  # the previous recipe, first stage included
            old = add(replace(old_recipe(method), eval_steps=0))
            if seed == config.ablation_seeds[0]:
                parts["ablation"].append(("old-recipe", key(old.name)))
    for family in config.families:  # part 2: the official stage lengths, seed 0, and every member's twin
        predecessor, keys = add(alone(family[0], L, 0)), [f"{family[0]}-{L}"]
        for size, epochs in zip(family[1:], recipe.official_epochs(len(family))[1:]):
            predecessor = add(grown(size, round(L * epochs / E), predecessor, family[0]))
            keys.append(key(predecessor.name))
            add(alone(size, L, 0))
        parts["family"].append(keys)
    return jobs, parts


def key(name):
    return name.split("/", 1)[1]


def grown_job(size, steps, predecessor, first, **kw):
    """`size` grown from the job `predecessor` and distilled towards it for `steps` steps, with the default grown
    recipe (recipe.py: the peak lr scaled by the width ratio to the chain's `first` size, the weight average
    delivered) and a curve: evaluated at step 0 and every tenth of the stage."""
    return Job(f"s{predecessor.seed}/{size}-after-{key(predecessor.name)}-{steps}", size, steps, predecessor.seed,
               start=predecessor.name, teacher=predecessor.name, ema=recipe.EMA_FRACTION,
               lr=recipe.grown_lr(recipe.SYNTHETIC_LR, shape(first), shape(size)), eval_steps=max(1, steps // 10), **kw)


# the grown recipes (what changes from the default): results/growth-dip.md and part 3 of the study compare them
RECIPES = {"official": dict(lr=recipe.SYNTHETIC_LR, ema=0.0),  # the paper's: the first stage's peak lr, last weights
           "no-average": dict(ema=0.0), "unscaled-lr": dict(lr=recipe.SYNTHETIC_LR)}
RECIPE_LABELS = {"scaled": "scaled lr + weight average (the default)",
                 "official": "the official recipe (the first stage's lr, the last weights)",
                 "no-average": "scaled lr, the last weights", "unscaled-lr": "the first stage's lr + weight average"}
OLD_LR = 1e-3  # the previous recipe's peak lr of every stage (the official one), kept for comparison


def old_recipe(job):
    """The job as the previous recipe ran it: every stage at peak lr 1e-3, the official grown stage."""
    changes = dict(name=old_recipe_name(job.name), lr=OLD_LR, ema=0.0)
    if job.start:
        changes.update(start=old_recipe_name(job.start), teacher=old_recipe_name(job.teacher))
    return replace(job, **changes)


def old_recipe_name(name):
    return f"{name}-lr1e-3"


def ablations(steps):
    """(tag, what changes from the method) for part 3; the method is lossless growth + FD (alpha 500), default recipe."""
    return [("growth-only", dict(teacher="")), ("fd-only", dict(start="")), ("neither", dict(start="", teacher="")),
            ("inherit", dict(grow_method="inherit")), *RECIPES.items()]


ABLATION_LABELS = {"growth-only": "growth only (no FD)", "fd-only": "FD only (fresh init + FD)",
                   "neither": "neither (fresh init, no FD)", "inherit": "the official operator (inherit) + FD",
                   "old-recipe": f"the previous recipe: peak lr {OLD_LR:g} for both stages, official grown stage",
                   **RECIPE_LABELS}


def shape(size):
    tokenizer = data.default_shape("synthetic")["tokenizer"]
    return vit.config(size, **data.default_shape("synthetic"), vocab_size=data.get_tokenizer(tokenizer).vocab_size)


def load(root, name):
    return interop.load_model(os.path.join(root, name))  # the job's checkpoint.pt


def run_job(job, config, root):
    """Train one job (in a worker process, one thread)."""
    torch.set_num_threads(1)
    settings = train.Settings(steps=job.steps, batch_size=config.batch_size, seed=job.seed, lr=job.lr,
                              warmup=job.warmup, ema=job.ema, device=config.device, eval_every=0,
                              eval_steps=job.eval_steps, log_every=max(1, job.steps // 10),
                              save_every=max(1, job.steps // 4), probes=synthetic.PROBES)
    stage = chain.Stage(job.size, shape(job.size), settings, job.steps * config.batch_size,
                        os.path.join(root, job.name), job.name)
    model = train.first_model(stage.cfg, job.seed)
    if job.start:
        model = chain.grown(load(root, job.start), stage, job.grow_method)
    teacher = load(root, job.teacher) if job.teacher else None
    distill = train.distillation(model, teacher, job.alpha)
    return chain.train_stage(stage, model, teacher, distill)  # its final evaluation has the attribute probes


def run_all(jobs, config, root, workers):
    """Run every job not finished yet, each once its predecessors are, longest first among the ready ones."""
    done = {n for n in jobs if os.path.exists(os.path.join(root, n, chain.RESULT))}
    cost = {n: j.steps * vit.flops_per_sample(shape(j.size)) for n, j in jobs.items()}
    running, started = {}, time.time()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        while len(done) < len(jobs):
            ready = [n for n, j in jobs.items() if n not in done and n not in running.values()
                     and all(d in done for d in (j.start, j.teacher) if d)]
            for name in sorted(ready, key=cost.get, reverse=True)[:max(0, workers - len(running))]:
                running[pool.submit(run_job, jobs[name], config, root)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed training stops the study, with its error
                done.add(name)
                print(f"[{time.time() - started:6.0f} s] {len(done)}/{len(jobs)} done: {name}", flush=True)


# -----------------------------------------------------------------------------
# costs, aggregation, verdicts


def training_flops(job, jobs, batch_size):
    """The job's own training FLOPs (ledger.py's convention: 3 x its forward per sample, plus its teacher's forward),
    and the cumulative cost of the model it yields: the predecessors' and teachers' trainings included."""
    teacher = ledger.forward_flops(shape(jobs[job.teacher].size)) if job.teacher else 0
    own = ledger.training_flops(job.steps * batch_size, ledger.forward_flops(shape(job.size)), teacher)
    before = {d for d in (job.start, job.teacher) if d}
    return own, own + sum(training_flops(jobs[d], jobs, batch_size)[1] for d in before)


def measure(result, metric):
    if metric == "retrieval_R@1":
        return 100 * (result["i2t_R@1"] + result["t2i_R@1"]) / 2
    return 100 * result[metric]


def point(names, jobs, results, metric, batch_size):
    """(cumulative cost, mean, low, high) of the same training over seeds."""
    values = [measure(results[n], metric) for n in names]
    return (training_flops(jobs[names[0]], jobs, batch_size)[1], statistics.mean(values), min(values), max(values))


def interpolate(curve, x):
    """The alone curve (sorted (cost, value)) at cost x, linear in log cost; outside it, its nearest end."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return curve[-1][1]


def verdict(alone, chained):
    """Whether the chained points lie above the alone curve at equal cost: 'holds', 'holds from cost X on', or 'does
    not hold here' (and by how much at each point)."""
    curve = sorted((p[0], p[1]) for p in alone)
    gaps = [(x, y - interpolate(curve, x)) for x, y, *_ in sorted(chained)]
    ahead = [g > 0 for _, g in gaps]
    if all(ahead):
        return "holds", gaps
    if ahead[-1]:
        first = next(i for i in range(len(ahead)) if all(ahead[i:]))
        return f"holds from {gaps[first][0]:.2g} FLOPs on", gaps
    return "does not hold here", gaps


# -----------------------------------------------------------------------------
# the report


def seeds_of(jobs, key_):
    """The names of one training under every seed it ran with."""
    return sorted(n for n in jobs if key(n) == key_)


def cost_part(config, jobs, parts, results, out):
    """Part 1: per larger size and metric, the alone curve, the chained points and the verdict; figures."""
    md, summary = [], {}
    for size in config.sizes[1:]:
        for metric, label in METRICS.items():
            a = [point(seeds_of(jobs, k), jobs, results, metric, config.batch_size) for k in parts["alone"][size]]
            c = [point(seeds_of(jobs, k), jobs, results, metric, config.batch_size) for k in parts["chained"][size]]
            word, gaps = verdict(a, c)
            summary[f"{size}/{metric}"] = dict(alone=a, chained=c, verdict=word, gaps=gaps)
            series = [dict(label="alone", colour="#d62728", points=a),
                      dict(label="chained", colour="#1f77b4", points=c, dashed=True)]
            name = f"study-{config_name}-{size}-{metric.replace('@', '')}.svg"
            runtime.save_text(line_chart(series, f"{size}: {label}", "training FLOPs (cumulative)", f"{label} (%)",
                                         log_x=True), os.path.join(out, name))
            md.append(f"| {size} | {label} | " + ", ".join(f"{x:.2g}: {y:.1f}" for x, y, *_ in a) + " | " +
                      ", ".join(f"{x:.2g}: {y:.1f}" for x, y, *_ in c) + f" | {word}; gaps " +
                      ", ".join(f"{g:+.1f}" for _, g in gaps) + f" | ![{size}]({name}) |")
    header = ["| size | metric | alone (FLOPs: %, mean of seeds) | chained | verdict (chain minus alone at equal "
              "cost, points) | figure |", "| --- | --- | --- | --- | --- | --- |"]
    return header + md, summary


def family_part(config, jobs, parts, results):
    """Part 2: each family chain's ledger (acceleration) and its members against their twins."""
    L, md, summary = config.first_steps, [], []
    for family, keys in zip(config.families, parts["family"]):
        names = [f"s0/{k}" for k in keys]
        _, totals = ledger.ledger([shape(s) for s in family], [jobs[n].steps * config.batch_size for n in names])
        members = [dict(size=size, chain={m: measure(results[n], m) for m in METRICS},
                        alone={m: measure(results[f"s0/{size}-{L}"], m) for m in METRICS})
                   for size, n in zip(family, names)]
        summary.append(dict(family=family, speedup=totals["speedup"], saving=totals["saving_vs_largest"],
                            members=members))
        cells = "; ".join(f"{m['size']} " + " / ".join(f"{m['chain'][k]:.1f} vs {m['alone'][k]:.1f}" for k in METRICS)
                          for m in members)
        md.append(f"| {len(family)}: {' -> '.join(family)} | {totals['speedup']:.2f}x | "
                  f"{100 * totals['saving_vs_largest']:.0f}% | {cells} |")
    header = ["| models | acceleration (alone / chain FLOPs) | saving vs the largest alone | per member, chain vs "
              "alone: zero-shot / retrieval R@1 (%) |", "| --- | ---: | ---: | --- |"]
    return header + md, summary


def ablation_part(config, jobs, parts, results):
    """Part 3: every variant of the first grown stage against the method, mean over the ablation seeds."""
    probes = sorted({k for r in results.values() for k in r if k.startswith("probe_")})
    md, summary = [], {}
    for tag, key_ in parts["ablation"]:
        names = [n for n in seeds_of(jobs, key_) if jobs[n].seed in config.ablation_seeds]  # the method ran on more
        values = {m: statistics.mean(measure(results[n], m) for n in names) for m in METRICS}
        values.update({p: statistics.mean(100 * results[n][p] for n in names) for p in probes})
        summary[tag] = values
        label = f"the method: lossless growth + FD (alpha {ALPHA:g})" if tag == "method" else \
            ABLATION_LABELS.get(tag, tag.replace("-", " ") + " steps")
        md.append(f"| {label} | " + " | ".join(f"{values[k]:.1f}" for k in [*METRICS, *probes]) + " |")
    steps = jobs[seeds_of(jobs, parts["ablation"][0][1])[0]].steps
    header = [f"| {config.sizes[1]}, {steps} steps after {config.sizes[0]} ({config.first_steps} steps) | " +
              " | ".join([*METRICS.values(), *(p[len('probe_'):] + ' probe' for p in probes)]) + " |",
              "| --- |" + " ---: |" * (len(METRICS) + len(probes))]
    return header + md, summary


def curve(root, job):
    """The job's evaluations as {fraction of the stage: {metric: %}}, step 0 (the grown, untrained model) included."""
    rows = [json.loads(line) for line in open(os.path.join(root, job.name, "metrics.jsonl"))]
    return {r["step"] / job.steps: {m: measure(r, m) for m in METRICS} for r in rows if "zeroshot_top1" in r}


def dip(root, job, results):
    """Per metric, the grown job against its predecessor's final score (points): at its end, and at its lowest
    evaluation point."""
    before = {m: measure(results[job.start], m) for m in METRICS}
    points = curve(root, job)
    return {m: dict(end=measure(results[job.name], m) - before[m],
                    lowest=min(p[m] for p in points.values()) - before[m]) for m in METRICS}


def dip_part(config, jobs, parts, results, root):
    """Part 5: every grown stage of the default recipe (parts 1 and 2, and part 3's method) against its predecessor:
    its end and its lowest evaluation point, over seeds."""
    default = {k for keys in parts["chained"].values() for k in keys} | {k for keys in parts["family"] for k in keys}
    default |= {k for tag, k in parts["ablation"] if tag == "method"}
    grown_keys = sorted((k for k in default if jobs[seeds_of(jobs, k)[0]].start),
                        key=lambda k: (jobs[seeds_of(jobs, k)[0]].size, jobs[seeds_of(jobs, k)[0]].steps, k))
    md, summary = [], {}
    for k in grown_keys:
        names = seeds_of(jobs, k)
        d = [dip(root, jobs[n], results) for n in names]
        summary[k] = {m: dict(end=[x[m]["end"] for x in d], lowest=[x[m]["lowest"] for x in d]) for m in METRICS}
        md.append(f"| {k} | {len(names)} | " + " | ".join(
            f"{statistics.mean(summary[k][m]['end']):+.1f} | {min(summary[k][m]['lowest']):+.1f}" for m in METRICS)
            + " |")
    worst = min(((v[m]["lowest"][i], k, m) for k, v in summary.items() for m in METRICS
                 for i in range(len(v[m]["lowest"]))), default=None)
    header = ["| grown stage | seeds | " + " | ".join(f"{label}: end, mean | lowest point" for label in METRICS.values())
              + " |", "| --- | ---: |" + " ---: | ---: |" * len(METRICS)]
    tail = ["", f"Lowest evaluation point of any grown stage: {worst[0]:+.1f} points ({worst[1]}, {METRICS[worst[2]]})."
            if worst else ""]
    return header + md + tail, summary


def cc3m_ledger():
    """The official CC3M chain's ledger (the paper's models: CLIP's tokenizer, 224 px, 77 tokens), as chain.py
    --dry-run prints it: its rows and totals."""
    cc3m = dict(data="cc3m.csv", num_samples=recipe.CC3M_SAMPLES, batch_size=recipe.OFFICIAL_BATCH,
                captions_per_image=recipe.OFFICIAL_CAPTIONS)
    args = chain.parse_args(["--sizes", CC3M_CHAIN, "--tokenizer", "clip-bpe",
                             *(f"--{k.replace('_', '-')}={v}" for k, v in cc3m.items())])
    stages = chain.plan(args, train.Settings(**cc3m))
    return ledger.ledger([st.cfg for st in stages], [st.samples for st in stages], recipe.OFFICIAL_CAPTIONS)


def report(config, jobs, parts, root, out, argv=None, conditions=""):
    results = {n: runtime.load_json(os.path.join(root, n, chain.RESULT), "study result") for n in jobs
               if os.path.exists(os.path.join(root, n, chain.RESULT))}
    missing = [n for n in jobs if n not in results]
    if missing:
        raise ValueError(f"{len(missing)} of {len(jobs)} trainings are not finished (e.g. {missing[0]}); run the "
                         "study without --report first")
    cost_md, cost = cost_part(config, jobs, parts, results, out)
    family_md, family = family_part(config, jobs, parts, results)
    ablation_md, ablation = ablation_part(config, jobs, parts, results)
    dip_md, dips = dip_part(config, jobs, parts, results, root)
    cc3m_rows, cc3m = cc3m_ledger()
    summary = dict(config=asdict(config), cost=cost, family=family, ablation=ablation, after_growth=dips,
                   cc3m_ledger=cc3m, results=results, git=runtime.git_hash())
    runtime.save_json(summary, os.path.join(out, f"study-{config_name}.json"))
    md = [*header(f"Study ({config_name} configuration)", conditions,
                  command(None if argv is None else ["benchmarks/study.py", *argv])),
          f"First stage {config.first_steps} steps of {config.batch_size} at peak lr {recipe.SYNTHETIC_LR:g}; grown "
          "stages: the default recipe (recipe.py); seeds "
          f"{list(config.seeds)}; {len(jobs)} trainings, one thread each.", "",
          "## 1. Accuracy against cost", "", *cost_md, "", "## 2. Family size (seed 0)", "", *family_md, "",
          f"## 3. Ablations of the first grown stage (mean of seeds {list(config.ablation_seeds)})", "", *ablation_md,
          "", "## 4. The official CC3M chain's ledger", "",
          f"{CC3M_CHAIN.replace(',', ' -> ')}, {'/'.join(map(str, recipe.OFFICIAL_EPOCHS))} epochs, "
          f"{recipe.OFFICIAL_CAPTIONS} captions: {cc3m['speedup']:.2f}x cheaper than "
          f"the four alone, {100 * cc3m['saving_vs_largest']:.1f}% cheaper than large alone; parameters " +
          ", ".join(f"{s} {r['params'] / 1e6:.1f}M" for s, r in zip(CC3M_CHAIN.split(","), cc3m_rows)) + ".", "",
          "## 5. After growth: each grown stage of the default recipe against its predecessor (points; evaluated at "
          "step 0 and every tenth of the stage; the other recipes: part 3 and results/growth-dip.md)", "", *dip_md,
          ""]
    runtime.save_text("\n".join(md), os.path.join(out, f"study-{config_name}.md"))
    print("\n".join(md))


def main(argv=None):
    global config_name
    p = runtime.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default="cpu", choices=list(CONFIGS), help="cpu (cpu-* sizes), gpu, or smoke")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="trainings at once, one thread each")
    p.add_argument("--runs", default="runs/study", help="where the trainings go (resumed on a rerun)")
    p.add_argument("--out", default="results", help="where the report, its JSON and the figures go")
    p.add_argument("--report", action="store_true", help="only rewrite the report from finished trainings")
    p.add_argument("--conditions", default="idle machine", help="what else ran beside it, for the report's header")
    args = p.parse_args(argv)
    config_name, config = args.config, CONFIGS[args.config]
    root = os.path.join(args.runs, args.config)
    jobs, parts = plan(config)
    try:
        os.makedirs(args.out, exist_ok=True)
        if not args.report:
            print(f"{len(jobs)} trainings into {root}, {args.workers} at a time", flush=True)
            run_all(jobs, config, root, args.workers)
        report(config, jobs, parts, root, args.out, argv, args.conditions)
    except runtime.USER_ERRORS as e:
        runtime.exit_with(e)


config_name = "cpu"
if __name__ == "__main__":
    main()
