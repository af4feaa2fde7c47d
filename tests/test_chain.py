"""Tests of chain.py: order check, cost ledger against the paper's figures, a whole CPU chain, resume, refusal."""
import json
import os
import shutil

import pytest
import torch

import chain
import evaluate
import ledger
import recipe
import synthetic
import train
import vit

SIZES = "cpu-tiny,cpu-small,cpu-base"
FAST = ["--image-size", "32", "--patch-size", "16", "--context-length", "16", "--batch-size", "8",
        "--num-samples", "32", "--device", "cpu", "--log-every", "1"]
PAPER = ["--sizes", "tiny,small,base,large", "--num-samples", "2905954", "--batch-size", "1024", "--image-size",
         "224", "--patch-size", "16", "--context-length", "77"]  # README's paper ledger, with --epochs and --dry-run
CC3M = ["--data", "cc3m.csv", *PAPER[2:]]


@pytest.fixture
def small_eval(monkeypatch):
    # the synthetic eval sets, built once and cut to 48 zero-shot pictures, 48 retrieval ones and 64 + 64 for the probes
    real, cache = evaluate.build_eval_sets, {}

    def first_batch(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **{**kwargs, "batch_size": 48})
            for name, s in cache[key].items():
                if name == "probes":  # 64 pictures to fit, 64 to test
                    cache[key][name] = {k: (x[:64], {a: y[:64] for a, y in labels.items()}) for k, (x, labels) in s.items()}
                else:
                    s["batches"] = s["batches"][:1]
        return cache[key]
    monkeypatch.setattr(evaluate, "build_eval_sets", first_batch)


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        chain.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


# -----------------------------------------------------------------------------
# plan and ledger


@pytest.mark.parametrize("sizes, fix", [("cpu-small,cpu-tiny", "cpu-tiny,cpu-small"),
                                        ("tiny,cpu-base", "cpu-base,tiny"), ("base,small,large", "small,base,large")])
def test_sizes_must_ascend(sizes, fix, capsys):
    err = error_of(["--sizes", sizes, "--dry-run"], capsys)
    assert err.startswith("error:") and "ascending" in err and fix in err


def test_unknown_size_and_bad_lists_are_one_line_errors(capsys, tmp_path):
    assert "cpu-huge" in error_of(["--sizes", "cpu-tiny,cpu-huge", "--dry-run"], capsys)
    assert "--epochs" in error_of(["--sizes", SIZES, "--epochs", "4,2", "--dry-run"], capsys)
    assert "--lr" in error_of(["--sizes", SIZES, "--lr", "1e-3,0,1e-3", "--dry-run"], capsys)
    assert "--steps" in error_of(["--sizes", SIZES, "--steps", "4,x,1", "--dry-run"], capsys)
    assert not os.path.exists(tmp_path / "run")


def test_ledger_matches_a_hand_computation():
    a, b = vit.config("cpu-tiny"), vit.config("cpu-small")
    (ia, ta), (ib, tb) = vit.image_text_flops(a), vit.image_text_flops(b)
    rows, totals = ledger.ledger([a, b], [100, 30], captions=3)
    fa, fb = ia + 3 * ta, ib + 3 * tb
    assert [r["train_flops"] for r in rows] == [100 * 3 * fa, 30 * (3 * fb + fa)]  # student x3, teacher x1
    assert [r["independent_flops"] for r in rows] == [100 * 3 * fa, 100 * 3 * fb]  # the first stage's schedule
    assert totals["speedup"] == pytest.approx((300 * fa + 300 * fb) / (300 * fa + 90 * fb + 30 * fa))
    assert totals["saving_vs_largest"] == pytest.approx(1 - (330 * fa + 90 * fb) / (300 * fb))
    assert rows[1]["params"] == vit.count_params(b)


def test_main_command_benchmark_prices_longer_grown_stages_as_the_ledger_does(monkeypatch):
    # benchmarks/main_command.py's ratio for a chain whose grown stages had trained longer, from a chain's report
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import main_command
    cfgs = [vit.config(size, **synthetic.DATA_SHAPE) for size in ("tiny", "small", "base")]
    steps, batch = [250, 47, 31], 64
    rows, totals = ledger.ledger(cfgs, [n * batch for n in steps])
    report, manifest = {"stages": rows, "totals": totals}, {"steps": steps}
    assert main_command.speedup(report, manifest, None) == pytest.approx(totals["speedup"])
    longer = ledger.ledger(cfgs, [250 * batch, 100 * batch, 100 * batch])[1]["speedup"]
    assert main_command.speedup(report, manifest, 100) == pytest.approx(longer)


def test_dry_run_reproduces_the_papers_figures(capsys):
    # the official CC3M chain T -> S -> B -> L at 224 px, 7 captions per image (the paper's long-caption mode), with
    # the CLIP vocabulary: README's command (no data at hand, so --tokenizer clip-bpe; --data gives the same models)
    rep = chain.main([*PAPER, "--epochs", "128,24,16,16", "--captions-per-image", "7", "--tokenizer", "clip-bpe",
                      "--dry-run"])
    out = capsys.readouterr().out
    assert "5.52x" in out and "77 tokens, clip-bpe tokenizer (49408 ids)" in out
    for i, (size, params) in enumerate(zip(("tiny", "small", "base", "large"), ("27.9", "62.4", "149.6", "427.3"))):
        assert f"| {i + 1} | {size} | {params}M |" in out  # README's model family table
    totals = rep["totals"]
    assert totals["saving_vs_largest"] == pytest.approx(0.716, abs=0.002)  # the paper: "up to 72%"
    assert totals["speedup"] == pytest.approx(5.52, abs=0.01)  # the paper: 5.68x for 4 models
    # an independent restatement, per epoch (the ratio does not depend on the data size)
    f = {s: vit.image_text_flops(vit.config(s)) for s in ("tiny", "small", "base", "large")}
    T, S, B, L = (i + 7 * t for i, t in f.values())
    chained = 128 * 3 * T + 24 * (3 * S + T) + 16 * (3 * B + S) + 16 * (3 * L + B)
    assert totals["speedup"] == pytest.approx(128 * 3 * (T + S + B + L) / chained, rel=1e-9)
    assert totals["saving_vs_largest"] == pytest.approx(1 - chained / (128 * 3 * L), rel=1e-9)


def test_dry_run_says_which_models_it_plans(capsys):
    # no data source: the synthetic set's byte vocabulary, said before the ledger (whose params column it changes)
    rep = chain.main([*PAPER, "--sizes", "tiny", "--dry-run"])
    assert capsys.readouterr().out.startswith("Models for synthetic data: 224 px in 16 px patches, 77 tokens, byte "
                                               "tokenizer (259 ids).")
    assert rep["stages"][0]["params"] == vit.count_params(vit.config("tiny", vocab_size=259))


def test_a_teacher_of_the_first_stage_is_in_its_cost(tmp_path, capsys):
    # --teacher: the first stage trains with FD, so it pays the teacher's forward too (3x student + 1x teacher)
    teacher = vit.config("cpu-tiny", image_size=32, patch_size=16, context_length=16, vocab_size=259, tokenizer="byte")
    path = str(tmp_path / "teacher.pt")
    torch.save({"model": vit.CLIP(teacher).state_dict(), "config": teacher.to_dict()}, path)
    argv = ["--sizes", "cpu-small,cpu-base", "--steps", "10,4", "--batch-size", "8", "--captions-per-image", "2",
            "--teacher", path]
    rep = chain.main([*argv, "--dry-run"])
    (i0, t0), (i1, t1), (i2, t2) = (vit.image_text_flops(vit.config(s, image_size=32, patch_size=16, context_length=16,
                                    vocab_size=259)) for s in ("cpu-tiny", "cpu-small", "cpu-base"))
    chained = [80 * (3 * (i1 + 2 * t1) + (i0 + 2 * t0)), 32 * (3 * (i2 + 2 * t2) + (i1 + 2 * t1))]  # 8 x 10, 8 x 4
    assert [row["train_flops"] for row in rep["stages"]] == chained
    alone = 80 * 3 * (i1 + 2 * t1 + i2 + 2 * t2)  # both sizes from scratch with the first stage's 80 samples
    assert rep["totals"]["speedup"] == pytest.approx(alone / sum(chained), rel=1e-12)
    assert f"**{alone / sum(chained):.2f}x**" in capsys.readouterr().out
    stages = chain.plan(chain.parse_args(argv), train.Settings(batch_size=8), like=teacher)
    assert stages[0].label == f"stage 1/2: cpu-small, from scratch + FD towards {path}"


def test_default_schedule_is_the_official_one(capsys):
    rep = chain.main(["--sizes", "tiny,small,base,large", "--dry-run", *CC3M])
    steps_per_epoch = 2905954 // 1024
    assert [s["samples"] for s in rep["stages"]] == [e * steps_per_epoch * 1024 for e in (128, 24, 16, 16)]
    args = chain.parse_args(["--sizes", "tiny,small,base,large", *CC3M])
    stages = chain.plan(args, train.Settings(data="cc3m.csv", num_samples=2905954, batch_size=1024))
    assert [st.settings.warmup for st in stages] == [8000, 1000, 1000, 1000]
    widths = [st.cfg.vision_width for st in stages]  # the default grown recipe scales the grown stages' lr
    assert [st.settings.lr for st in stages] == [1e-3 * widths[0] / w for w in widths]
    assert [st.settings.ema for st in stages] == [0] + [recipe.EMA_FRACTION] * 3
    official = chain.plan(chain.parse_args(["--sizes", "tiny,small,base,large", *CC3M, "--grown-recipe", "official"]),
                          train.Settings(data="cc3m.csv", num_samples=2905954, batch_size=1024))
    assert [(st.settings.lr, st.settings.ema) for st in official] == [(1e-3, 0)] * 4
    # the synthetic set: steps in the official proportions, warmups of at least 50 steps (at most half a stage)
    stages = chain.plan(chain.parse_args(["--sizes", SIZES]), train.Settings(num_samples=1000))
    first = recipe.SYNTHETIC_FIRST_STEPS
    steps = [first, round(first * 24 / 128), round(first * 16 / 128)]
    assert [st.settings.steps for st in stages] == steps
    assert [st.settings.warmup for st in stages] == [min(s // 2, 50) for s in steps]
    assert stages[0].settings.lr == recipe.SYNTHETIC_LR
    # one value is the first stage's: the grown stages' lr follows the recipe; a comma list is exact per stage
    argv = ["--sizes", SIZES, "--steps", "7", "--lr", "2e-4"]
    stages = chain.plan(chain.parse_args(argv + ["--grown-recipe", "official"]), train.Settings())
    assert [(st.settings.steps, st.settings.lr) for st in stages] == [(7, 2e-4)] * 3
    stages = chain.plan(chain.parse_args(argv), train.Settings())
    assert [st.settings.lr for st in stages] == [2e-4, 1e-4, 5e-5]  # cpu-tiny 64 -> cpu-small 128 -> cpu-base 256
    stages = chain.plan(chain.parse_args(["--sizes", SIZES, "--lr", "3e-4,2e-4,1e-4"]), train.Settings())
    assert [st.settings.lr for st in stages] == [3e-4, 2e-4, 1e-4]


# -----------------------------------------------------------------------------
# a whole chain on CPU: run, resume, refuse


def test_chain_trains_resumes_and_refuses_another_command(tmp_path, monkeypatch, capsys, small_eval):
    out = str(tmp_path / "run")
    argv = ["--sizes", SIZES, "--steps", "2,1,1", "--out", out, "--probes", "64", *FAST]  # probes: off by default
    first = chain.main(argv)
    dirs = ["1-cpu-tiny", "2-cpu-small", "3-cpu-base"]
    for d in dirs:
        assert {"checkpoint.pt", "metrics.jsonl", "result.json"} <= set(os.listdir(os.path.join(out, d)))
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert [s["size"] for s in report["stages"]] == SIZES.split(",")
    probes = {f"probe_{a}" for a in synthetic.ATTRIBUTES}  # on the synthetic set: what each image tower knows
    assert all({"zeroshot_top1", "wall_time_s"} | probes <= set(s) for s in report["stages"])
    assert all(0 < s["eval_s"] < s["wall_time_s"] for s in report["stages"])  # the evaluations' share of the time
    with open(os.path.join(out, "report.md")) as f:
        assert "| size | " + " | ".join(synthetic.ATTRIBUTES) + " |" in f.read()
    weights = torch.load(os.path.join(out, dirs[2], "checkpoint.pt"), weights_only=True)["model"]

    calls, real_train = [], train.train
    monkeypatch.setattr(train, "train", lambda model, s, out_dir, **kw: calls.append(out_dir) or
                        real_train(model, s, out_dir, **kw))
    # the same command again: nothing is retrained
    again = chain.main(argv)
    assert calls == [] and again["stages"] == first["stages"]
    # a stage stopped before its result was written resumes from its checkpoint (no step left to do)
    os.remove(os.path.join(out, dirs[2], "result.json"))
    chain.main(argv)
    assert calls == [os.path.join(out, dirs[2])]
    # a lost last stage is grown again from the previous stage's checkpoint file: the same weights
    shutil.rmtree(os.path.join(out, dirs[2]))
    chain.main(argv)
    regrown = torch.load(os.path.join(out, dirs[2], "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(weights[k], regrown[k]) for k in weights)

    # the same command with another number of processes (the global batch): refused, the report left as it is
    with open(os.path.join(out, "report.json")) as f:
        report = f.read()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; no process group is joined first
    assert error_of(argv, capsys).endswith(f"{out} holds a chain run by 1 process, not 2; resume it with as many "
                                           "(torchrun --nproc_per_node x --nnodes), or pass another --out")
    monkeypatch.delenv("WORLD_SIZE")  # (a 2-process chain rerun by 1 process: tests/test_ddp.py)
    with open(os.path.join(out, "report.json")) as f:
        assert f.read() == report

    capsys.readouterr()
    err = error_of(["--sizes", "cpu-tiny,cpu-small", "--steps", "2,1", "--out", out, *FAST], capsys)
    assert "sizes" in err and "--out" in err
    err = error_of([*argv, "--num-samples", "40"], capsys)
    assert "num_samples" in err
    err = error_of(["--sizes", SIZES, "--steps", "2,1,1", "--grow-method", "inherit", "--out", out, *FAST], capsys)
    assert "grow" in err


# -----------------------------------------------------------------------------
# one rule for the model's data shape and tokenizer, in train.py and chain.py alike


@pytest.mark.parametrize("source", ["synthetic", "cc3m.csv"])
def test_train_and_chain_build_the_same_model_for_a_source(source):
    settings = train.Settings(data=source, num_samples=1000)
    stages = chain.plan(chain.parse_args(["--sizes", "cpu-tiny,cpu-small", "--data", source]), settings)
    for stage in stages:
        assert stage.cfg == train.model_config(stage.size, train.parse_args(["--size", stage.size, "--data", source]))
    # real data trains with the CLIP BPE (49,408 ids) whether or not --bpe is given, never silently on bytes
    expected = ("byte", 259) if source == "synthetic" else ("clip-bpe", 49408)
    assert all((st.cfg.tokenizer, st.cfg.vocab_size) == expected for st in stages)


def test_the_chain_trains_at_the_synthetic_sets_own_data_shape():
    # every caption fits synthetic.CONTEXT_LENGTH (tests/test_synthetic.py), so the chain cuts none
    for cfg in (st.cfg for st in chain.plan(chain.parse_args(["--sizes", "tiny,small"]), train.Settings())):
        assert (cfg.image_size, cfg.patch_size, cfg.context_length, cfg.tokenizer) == \
            (synthetic.IMAGE_SIZE, synthetic.PATCH_SIZE, synthetic.CONTEXT_LENGTH, synthetic.TOKENIZER)
