"""The real-data path end to end: every kind of data source (a .csv, a .tsv, one shard, a brace range, a glob, a folder
of shards, img2dataset's files layout; with and without img2dataset's _stats.json and .json sidecars) through every
entry point that takes one (train.py --data and --val-data, chain.py --data, evaluate.py --retrieval, `python data.py
check`), on one set of 24 pairs written here in every layout, one picture of them corrupt. A failed evaluation is one
line, and the same command then evaluates again without training. The learning check on a bigger set of the same
kind: benchmarks/real_data.py (results/real-data.md)."""
import contextlib
import io
import json
import os
import sys

import pytest
import torch

import chain
import data
import evaluate
import interop
import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import real_data  # noqa: E402  (the pairs and their layouts)

N, PER_SHARD, BAD = 24, 8, 5  # pairs, pairs per shard or files folder, the corrupt picture (in shard 0)
SOURCES = {  # name -> (source relative to the set's folder, samples in it)
    "csv": ("pairs.csv", N), "tsv": ("pairs.tsv", N), "one shard": ("shards/00000.tar", PER_SHARD),
    "brace range": ("shards/{00000..00002}.tar", N), "glob": ("shards/*.tar", N), "folder of shards": ("shards", N),
    "shards without _stats.json or .json": ("bare/{00000..00002}.tar", N), "files": ("files", N),
    "files without _stats.json or .json": ("files_bare", N)}
LISTED = ("csv", "tsv", "files", "files without _stats.json or .json")  # read as a list of files, in the same order
STREAMED = ("brace range", "glob", "folder of shards", "shards without _stats.json or .json")  # the same 3 shards
RECALLS = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]
FAST = ["--tokenizer", "byte", "--image-size", "32", "--patch-size", "16", "--context-length", "40", "--batch-size",
        "8", "--device", "cpu", "--precision", "fp32", "--probes", "0", "--eval-every", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def pairs_set(tmp_path_factory):
    """The 24 pairs in every layout; picture BAD is cut in half (a corrupt JPEG) everywhere."""
    root = str(tmp_path_factory.mktemp("pairs"))
    samples = real_data.pairs(N, 32)
    samples[BAD] = (samples[BAD][0][:len(samples[BAD][0]) // 2], samples[BAD][1])
    real_data.write_csv(os.path.join(root, "pairs.csv"), samples)
    real_data.write_csv(os.path.join(root, "pairs.tsv"), samples, delimiter="\t")
    real_data.write_shards(os.path.join(root, "shards"), samples, PER_SHARD)
    real_data.write_shards(os.path.join(root, "bare"), samples, PER_SHARD, stats=False, sidecars=False)
    real_data.write_files(os.path.join(root, "files"), samples, PER_SHARD)
    real_data.write_files(os.path.join(root, "files_bare"), samples, PER_SHARD, stats=False, sidecars=False)
    return root


def source(pairs_set, name):
    return os.path.join(pairs_set, SOURCES[name][0])


def printed_result(text):
    """The metrics train.py prints last, as JSON."""
    return json.loads(text[text.rindex("\n{") + 1:])


@pytest.fixture(scope="module")
def trained(pairs_set):
    """name -> (train.py's result, its --out): `train.py --data SOURCE --val-data SOURCE`, 3 steps of 8, run once."""
    runs = {}

    def run(name):
        if name not in runs:
            out = os.path.join(pairs_set, "runs", name)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                train.main(["--size", "cpu-nano", "--data", source(pairs_set, name), "--val-data",
                            source(pairs_set, name), "--steps", "3", "--warmup", "1", "--out", out, *FAST])
            runs[name] = printed_result(printed.getvalue()), out
        return runs[name]
    return run


# -----------------------------------------------------------------------------
# python data.py check SOURCE


@pytest.mark.parametrize("name", SOURCES)
def test_check_counts_every_sample(pairs_set, name, capsys):
    assert data.main(["check", source(pairs_set, name)]) == 0
    n = SOURCES[name][1]
    out = capsys.readouterr().out
    assert f": {n} samples expected, {n - 1} good, 1 bad\n  corrupt_image: 1\n" in out


# -----------------------------------------------------------------------------
# train.py --data SOURCE --val-data SOURCE


@pytest.mark.parametrize("name", SOURCES)
def test_train_reads_counts_and_evaluates(trained, name):
    result, out = trained(name)
    n = SOURCES[name][1]
    assert (result["step"], result["num_samples"], result["samples_seen"]) == (3, n, 24)
    # the corrupt picture, met at least once per pass over the data, each time replaced by a good one
    assert set(result["skipped"]) == {"corrupt_image"} and result["skipped"]["corrupt_image"] >= 24 // n
    with open(os.path.join(out, "metrics.jsonl")) as f:
        final = [json.loads(line) for line in f][-1]
    assert final["step"] == 3 and all(0 <= final[k] == result[k] <= 1 for k in RECALLS)
    assert interop.load_checkpoint(os.path.join(out, interop.RUN_CHECKPOINT))["step"] == 3


@pytest.mark.parametrize("group", [LISTED, STREAMED], ids=["listed", "streamed"])
def test_the_same_pairs_train_the_same_model_in_any_layout(trained, group):
    # a list of files (CSV, TSV, files folder) is read in one order and shards in another, whatever the layout
    first, *others = (trained(name)[0] for name in group)
    for result in others:
        assert {k: v for k, v in result.items() if k not in train.CLOCK} == \
            {k: v for k, v in first.items() if k not in train.CLOCK}


# -----------------------------------------------------------------------------
# evaluate.py --retrieval SOURCE


@pytest.fixture
def scored(monkeypatch):
    """What evaluate.py read: the retrieval batches (their .skipped) and the number of pairs it scored."""
    seen, build_eval_sets, retrieval_recall = {}, evaluate.build_eval_sets, evaluate.retrieval_recall

    def sets(*args, **kwargs):
        built = build_eval_sets(*args, **kwargs)
        seen["batches"] = built["retrieval"]["batches"]
        return built

    def recall(image_features, *args, **kwargs):
        seen["pairs"] = len(image_features)
        return retrieval_recall(image_features, *args, **kwargs)
    monkeypatch.setattr(evaluate, "build_eval_sets", sets)
    monkeypatch.setattr(evaluate, "retrieval_recall", recall)
    return seen


def test_evaluate_scores_the_same_pairs_alike_in_every_layout(pairs_set, trained, scored, tmp_path):
    model = trained("csv")[1]
    metrics = {}
    for name in SOURCES:
        metrics[name] = evaluate.main(["--model", model, "--retrieval", source(pairs_set, name), "--out",
                                       str(tmp_path / "e.json"), "--device", "cpu", "--batch-size", "16"])
        n = SOURCES[name][1]
        assert scored["pairs"] == n - 1 and scored["batches"].skipped == {"corrupt_image": 1}, name
    whole = [metrics[name] for name in SOURCES if name != "one shard"]
    assert all(m == whole[0] for m in whole) and set(whole[0]) == set(RECALLS)
    assert metrics["one shard"]["i2t_R@10"] == metrics["one shard"]["t2i_R@10"] == 1  # 7 pairs: all in the top 10


@pytest.mark.parametrize("name, workers", [("folder of shards", 0), ("folder of shards", 2), ("csv", 2)])
def test_eval_batches_know_their_number(pairs_set, name, workers):
    # with workers, each worker batches its own shards: 2 workers make 6 + 3 batches of 3 from 16 + 8 samples
    items = data.EvalItems(data.open_source(source(pairs_set, name)), data.eval_transform(32),
                           data.get_tokenizer("byte"), 40)
    batches = data.EvalBatches(data.EvalShards(items) if name != "csv" else items, 3, workers)
    assert len(batches) == sum(1 for _ in batches) == (9 if workers and name != "csv" else 8)


# -----------------------------------------------------------------------------
# chain.py --data SOURCE --val-data SOURCE


@pytest.mark.parametrize("name", SOURCES)
def test_chain_reads_counts_and_evaluates(pairs_set, name, tmp_path, capsys):
    src = source(pairs_set, name)
    report = chain.main(["--sizes", "cpu-nano,cpu-tiny", "--steps", "3,1", "--warmup", "1,1", "--data", src,
                         "--val-data", src, "--out", str(tmp_path), *FAST])
    n = SOURCES[name][1]
    for stage, steps in (("1-cpu-nano", 3), ("2-cpu-tiny", 1)):
        with open(tmp_path / stage / chain.RESULT) as f:
            result = json.load(f)
        assert (result["step"], result["num_samples"], result["samples_seen"]) == (steps, n, 8 * steps)
        assert set(result["skipped"]) <= {"corrupt_image"} and all(0 <= result[k] <= 1 for k in RECALLS)
        if steps == 3:  # a whole pass over the data at least: the corrupt picture was met
            assert result["skipped"]["corrupt_image"] >= 24 // n
        assert {k: report["stages"][steps == 1][k] for k in ("i2t_R@1", "t2i_R@1")} == \
            {k: result[k] for k in ("i2t_R@1", "t2i_R@1")}  # the report shows what the stage measured


# -----------------------------------------------------------------------------
# a failed evaluation: one line, the checkpoint kept; the same command evaluates again without training


def fail_once(monkeypatch):
    """evaluate.evaluate raises its first time, as the progress bar did on shards (issue 26)."""
    real, calls = evaluate.evaluate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("object of type 'EvalShards' has no len()")
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "evaluate", failing)


def count_steps(monkeypatch):
    real, steps = train.train_step, []
    monkeypatch.setattr(train, "train_step", lambda *args, **kwargs: steps.append(1) or real(*args, **kwargs))
    return steps


def one_line_error(run, capsys):
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_failed_final_evaluation_keeps_the_model_and_reruns_without_training(pairs_set, tmp_path, monkeypatch, capsys):
    shards = source(pairs_set, "brace range")
    argv = ["--size", "cpu-nano", "--data", shards, "--val-data", shards, "--steps", "2", "--out", str(tmp_path),
            *FAST]
    fail_once(monkeypatch)
    err = one_line_error(lambda: train.main(argv), capsys)
    checkpoint = os.path.join(str(tmp_path), interop.RUN_CHECKPOINT)
    assert "evaluation at step 2 failed" in err and "TypeError: object of type 'EvalShards' has no len()" in err
    assert checkpoint in err and "without training again" in err
    weights = interop.load_checkpoint(checkpoint)
    steps = count_steps(monkeypatch)
    train.main(argv)
    out = capsys.readouterr().out
    assert not steps and "resumed at step 2" in out and printed_result(out)["step"] == 2
    assert set(RECALLS) <= set(printed_result(out))
    again = interop.load_checkpoint(checkpoint)
    assert all(torch.equal(again["model"][k], v) for k, v in weights["model"].items())


def test_failed_evaluation_during_training_says_where_to_resume(pairs_set, tmp_path, monkeypatch, capsys):
    shard = source(pairs_set, "one shard")  # 1 step an epoch: it evaluates after step 1
    fail_once(monkeypatch)
    err = one_line_error(lambda: train.main(["--size", "cpu-nano", "--data", shard, "--val-data", shard, "--steps",
                                             "2", "--out", str(tmp_path), *FAST, "--eval-every", "1"]), capsys)
    assert "evaluation at step 1 failed" in err and "the last checkpoint is none yet" in err
    assert "--eval-every 0" in err


def test_chain_stage_with_a_failed_evaluation_evaluates_on_rerun(pairs_set, tmp_path, monkeypatch, capsys):
    shards = source(pairs_set, "folder of shards")
    argv = ["--sizes", "cpu-nano,cpu-tiny", "--steps", "2,1", "--warmup", "1,1", "--data", shards, "--val-data",
            shards, "--out", str(tmp_path), *FAST]
    fail_once(monkeypatch)
    err = one_line_error(lambda: chain.main(argv), capsys)
    assert os.path.join(str(tmp_path), "1-cpu-nano", interop.RUN_CHECKPOINT) in err
    assert not os.path.exists(tmp_path / "1-cpu-nano" / chain.RESULT)
    steps = count_steps(monkeypatch)
    report = chain.main(argv)
    assert len(steps) == 1  # stage 1 only evaluated; stage 2 trained its step
    assert [stage["i2t_R@1"] >= 0 for stage in report["stages"]] == [True, True]
    with open(tmp_path / "1-cpu-nano" / chain.RESULT) as f:
        assert json.load(f)["step"] == 2
