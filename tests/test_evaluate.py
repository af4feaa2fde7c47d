"""Tests of evaluate.py: zero-shot and retrieval metrics against brute force, the linear probe (separable features,
random labels, the held-out split), attribute probes, fine-tuning, and the command line (train.py's numbers on its
open_clip export, every metric in the JSON, one-line errors)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import evaluate
import synthetic
import train
import vit

TINY = dict(image_size=32, patch_size=16, context_length=16, vocab_size=259, tokenizer="byte")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


@pytest.fixture(autouse=True)
def one_thread():
    """The models and batches here are tiny: on a shared CPU, splitting them between threads made them 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return vit.CLIP(vit.config("cpu-tiny", **{**TINY, **overrides}))


def image_folder(root, n, seed, classes=tuple(RGB)):
    """An ImageFolder of n noisy one-colour pictures (32 px) per class, the class being the colour."""
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name)
        for i in range(n):
            pixels = np.array(RGB.get(name, (128, 128, 128))) + rng.normal(0, 30, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def clusters(n, classes=4, dim=16, seed=0):
    """n features around `classes` well-separated centres (a margin of several noise widths), labels in turn."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % classes
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


# -----------------------------------------------------------------------------
# zero-shot and retrieval metrics


def test_metrics_on_perfect_features_are_one():
    feats = torch.eye(12)
    labels = torch.arange(12)
    assert evaluate.zeroshot_accuracy(feats, labels, feats) == {1: 1.0, 5: 1.0}
    recall = evaluate.retrieval_recall(feats, feats, torch.arange(12))
    assert all(v == 1.0 for v in recall.values()) and len(recall) == 6


def test_metrics_on_a_permutation():
    # image i is most similar to caption perm[i]; only the fixed points of perm are right at rank 1
    perm = torch.tensor([0, 2, 1, 3, 5, 4])
    images, texts = torch.eye(6), torch.eye(6)[perm.argsort()]  # texts[perm[i]] = e_i
    r = evaluate.retrieval_recall(images, texts, torch.arange(6))
    assert r["i2t_R@1"] == r["t2i_R@1"] == pytest.approx(2 / 6)
    acc = evaluate.zeroshot_accuracy(images, perm, torch.eye(6))
    assert acc[1] == pytest.approx(2 / 6)


def test_metrics_match_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)
    images, texts = norm(torch.randn(20, 8, generator=g)), norm(torch.randn(50, 8, generator=g))
    text_image = torch.randint(20, (50,), generator=g)
    r = evaluate.retrieval_recall(images, texts, text_image)
    sim = images @ texts.T
    for k in (1, 5, 10):
        i2t = [any(text_image[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in range(20)]
        t2i = [text_image[j] in sim[:, j].argsort(descending=True)[:k] for j in range(50)]
        assert r[f"i2t_R@{k}"] == pytest.approx(sum(i2t) / 20) and r[f"t2i_R@{k}"] == pytest.approx(sum(t2i) / 50)
    classes, labels = texts[:7], text_image % 7
    acc = evaluate.zeroshot_accuracy(images[text_image], labels, classes)
    logits = images[text_image] @ classes.T
    for k in (1, 5):
        assert acc[k] == pytest.approx(sum(labels[i] in logits[i].argsort(descending=True)[:k]
                                           for i in range(50)) / 50)


def test_mean_per_class_recall_is_balanced_accuracy():
    # class 0: 3 of 4 right; class 1: 0 of 1; class 2: absent from the labels (predicted once, wrongly); class 3: 2 of 2
    labels = torch.tensor([0, 0, 0, 0, 1, 3, 3])
    predicted = torch.tensor([0, 0, 0, 2, 0, 3, 3])
    logits = nn.functional.one_hot(predicted, 4).float()
    assert evaluate.mean_per_class_recall(logits, labels) == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert evaluate.classification_metrics(logits, labels)["top1"] == pytest.approx(5 / 7)


class Lookup(nn.Module):
    """A stand-in CLIP: an image is its own feature vector; a caption's feature is row tokens[:, 0] of a table."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def encode_image(self, images):
        return images.flatten(1)

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def test_evaluate_averages_normalised_templates_and_keeps_caption_order():
    # zero-shot: class 0 prompts -> rows 0, 1; class 1 prompts -> rows 2, 3. The image (0.8, 0.6) of class 1 is
    # class 1 only when templates are normalised before averaging: (0, 10) and (1, 0) -> (0.71, 0.71), while the
    # raw mean (0.5, 5) points almost along y and loses to class 0's (1, 0).
    table = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 10.0], [1.0, 0.0]])
    zeroshot = dict(tokens=torch.arange(4).view(2, 2, 1), batches=iter([(torch.tensor([[0.8, 0.6]]), torch.tensor([1]))]))
    assert evaluate.evaluate(Lookup(table), {"zeroshot": zeroshot}, torch.device("cpu")) == \
        {"zeroshot_top1": 1.0, "zeroshot_top5": None, "zeroshot_mean_per_class_recall": 1.0}  # 2 classes: no top-5
    # retrieval: 3 images in 2 batches, 2 captions each (rows i and 3 + i both point at image i)
    table = torch.cat([torch.eye(3), 0.9 * torch.eye(3) + 0.1])
    tokens = torch.stack([torch.arange(3), torch.arange(3, 6)], dim=1)[..., None]  # (3, 2, 1)
    retrieval = dict(batches=iter([(torch.eye(3)[:2], tokens[:2]), (torch.eye(3)[2:], tokens[2:])]))
    r = evaluate.evaluate(Lookup(table), {"retrieval": retrieval}, torch.device("cpu"))
    assert r == {f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


# -----------------------------------------------------------------------------
# linear probes


def test_linear_probe_reaches_100_percent_on_separable_features_deterministically():
    (train_x, train_y), (test_x, test_y) = clusters(200, seed=1), clusters(100, seed=2)
    result = evaluate.linear_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] == result["mean_per_class_recall"] == 1.0
    assert result["weight_decay"] in evaluate.WEIGHT_DECAYS
    assert evaluate.linear_probe(train_x, train_y, test_x, test_y) == result  # seeded split, L-BFGS from zeros


def test_linear_probe_on_random_labels_stays_near_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1600, 16, generator=g), torch.randint(4, (1600,), generator=g)
    result = evaluate.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert abs(result["top1"] - 0.25) < 0.06 and abs(result["mean_per_class_recall"] - 0.25) < 0.06  # 600: sd 0.018


def test_held_out_split_is_a_seeded_fifth_of_each_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 4)  # class 2: too few to hold one out
    kept, held = evaluate.held_out_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(19))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    again, other = evaluate.held_out_split(labels, 0.2, seed=0), evaluate.held_out_split(labels, 0.2, seed=1)
    assert torch.equal(again[1], held) and not torch.equal(other[1], held)


class Pixels(nn.Module):
    """A stand-in image tower whose features are the pixels."""

    def encode_image(self, images):
        return images.flatten(1)


def probe_split(n, seed, size=2):
    """Pictures (n, 3, size, size) that show a colour (the bright channel) at a position (the bright quadrant), with
    a label that no picture shows, and a relation that only half the pictures have (-1 for the others)."""
    g = torch.Generator().manual_seed(seed)
    colour, position = torch.randint(3, (n,), generator=g), torch.randint(4, (n,), generator=g)
    images = 0.1 * torch.randn(n, 3, 4, generator=g)
    images[torch.arange(n), colour, position] += 3.0
    relation = torch.where(torch.arange(n) % 2 == 0, position % 2, -1)
    labels = dict(colour=colour, position=position, noise=torch.randint(4, (n,), generator=g), relation=relation)
    quadrants = images.view(n, 3, 2, 2)
    return quadrants.repeat_interleave(size // 2, dim=2).repeat_interleave(size // 2, dim=3), labels


def test_attribute_probes_read_each_attribute_from_shared_features():
    probes = {"train": probe_split(400, 0), "test": probe_split(200, 1)}
    out = evaluate.attribute_probes(Pixels(), probes, torch.device("cpu"), batch_size=64)
    assert set(out) == {"probe_colour", "probe_position", "probe_noise", "probe_relation"}
    assert out["probe_colour"] == out["probe_position"] == out["probe_relation"] == 1.0
    assert abs(out["probe_noise"] - 0.25) < 0.12  # 200 test pictures: sd 0.03
    unset = {k: (x, dict(labels, relation=torch.full_like(labels["relation"], -1))) for k, (x, labels) in probes.items()}
    assert "probe_relation" not in evaluate.attribute_probes(Pixels(), unset, "cpu", batch_size=64)  # no picture has one
    with pytest.raises(ValueError, match=r"test split's attributes \[\] are not \['colour', 'noise', 'position',"):
        evaluate.attribute_probes(Pixels(), {"train": probes["train"], "test": (probes["test"][0], {})}, "cpu")


# -----------------------------------------------------------------------------
# fine-tuning


def test_finetune_improves_over_the_initial_head_and_leaves_the_model_alone(tmp_path):
    train_dir, test_dir = image_folder(tmp_path / "train", 8, seed=0), image_folder(tmp_path / "test", 4, seed=1)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(lr=2e-3, batch_size=8, seed=0, min_steps=0)  # 4 epochs exactly
    initial = evaluate.finetune(model, train_dir, test_dir, "cpu", epochs=0, **settings)
    tuned = evaluate.finetune(model, train_dir, test_dir, "cpu", epochs=4, **settings)
    assert initial == {"top1": pytest.approx(1 / 3), "top5": None,  # zero head: class 0; 3 classes: no top-5
                       "mean_per_class_recall": pytest.approx(1 / 3)}
    assert tuned["top1"] >= 0.9 and tuned["mean_per_class_recall"] >= 0.9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert evaluate.finetune(model, train_dir, test_dir, "cpu", epochs=4, **settings) == tuned  # seeded


# -----------------------------------------------------------------------------
# command line


def test_cli_on_an_open_clip_export_gives_train_pys_numbers(tmp_path, capsys):
    model = tiny_model()
    settings = train.Settings(steps=2, batch_size=8, warmup=1, num_samples=16, device="cpu", eval_every=0, probes=0,
                              precision="fp32")  # evaluate.py's default; train.py's own is bf16 on a bf16 CPU
    result = train.train(model, settings, str(tmp_path / "run"))
    capsys.readouterr()  # train's output
    export, out = str(tmp_path / "run" / "open_clip"), tmp_path / "eval" / "metrics.json"
    metrics = evaluate.main(["--model", export, "--out", str(out), "--device", "cpu"])  # byte tokenizer: synthetic
    keys = ["zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall"] + \
        [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert sorted(metrics) == sorted(keys) and {k: metrics[k] for k in keys} == {k: result[k] for k in keys}
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and saved["model"] == export and saved["config"] == model.cfg.to_dict()
    assert saved["precision"] == "fp32" and saved["device"] == "cpu"
    assert saved["tasks"] == {"zeroshot": "synthetic", "retrieval": "synthetic"}
    assert saved["pictures"] == {"zeroshot": {"scored": synthetic.ZEROSHOT_PER_CLASS * len(synthetic.CLASSNAMES),
                                              "skipped": {}},
                                 "retrieval": {"scored": synthetic.RETRIEVAL_SIZE, "skipped": {}}}
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| metric | value |", "| --- | ---: |"] and len(table) == 2 + len(keys)
    assert f"| zeroshot_top1 | {100 * result['zeroshot_top1']:.2f}% |" in table


def test_cli_writes_every_metric_of_probes_and_fine_tuning(tmp_path, monkeypatch):
    train_dir, test_dir = image_folder(tmp_path / "train", 6, seed=0), image_folder(tmp_path / "test", 3, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model(embed_dim=64)  # 64-d features: the probes' fits run to convergence in a blink
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, run / "checkpoint.pt")
    probes = synthetic.build_eval_sets(data.get_tokenizer("byte"), probe_sizes=(100, 50), retrieval_size=10,
                                       zeroshot_per_class=1)["probes"]  # the synthetic set's, fewer pictures
    monkeypatch.setattr(evaluate, "build_eval_sets", lambda source, **kw: {"probes": probes})
    out = tmp_path / "eval.json"
    metrics = evaluate.main(["--model", str(run), "--linear-probe", f"{train_dir},{test_dir}", "--finetune",
                             f"{train_dir},{test_dir}", "--finetune-epochs", "1", "--finetune-min-steps", "0",
                             "--finetune-batch-size", "8", "--synthetic-probes", "--out", str(out), "--device", "cpu"])
    assert set(metrics) == {"linear_probe_top1", "linear_probe_top5", "linear_probe_mean_per_class_recall",
                            "linear_probe_weight_decay", "finetune_top1", "finetune_top5",
                            "finetune_mean_per_class_recall"} | {f"probe_{name}" for name in synthetic.ATTRIBUTES}
    assert metrics["linear_probe_top5"] is None and metrics["finetune_top5"] is None  # 3 classes
    assert metrics["linear_probe_top1"] == 1.0  # one-colour pictures: even a random tower's features tell them apart
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics
    assert saved["pictures"] == {f"{task}_{split}": {"scored": n, "skipped": {}} for task, split, n in (
        ("linear_probe", "train", 18), ("linear_probe", "test", 9), ("finetune", "train", 18), ("finetune", "test", 9),
        ("synthetic_probes", "train", 100), ("synthetic_probes", "test", 50))}


@pytest.mark.parametrize("case,culprit", [
    ("no model", "/nonexistent/model.pt"),
    ("classes differ", "have different class folders"),
    ("classes differ, fine-tuning", "--finetune"),
    ("empty folder", "no class folders"),
    ("folder without images", "no images"),
    ("one class", "one class folder (red); a classification task needs at least 2"),
    ("one folder", "TRAIN_DIR,TEST_DIR"),
    ("bpe model, no task", "tokenizer, so no synthetic task; give --zeroshot DIR"),
    ("bpe model, synthetic zero-shot", "--zeroshot synthetic is refused"),
    ("bpe model, synthetic retrieval", "--retrieval synthetic is refused"),
    ("clip_benchmark, two tasks, one file", "put {task} in the file name"),
    ("fp16", "--precision"),
    ("not a number", "--batch-size"),
    ("out is a folder", "is a folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, culprit, tmp_path, monkeypatch, capsys):
    train_dir, other = image_folder(tmp_path / "train", 1, 0), image_folder(tmp_path / "other", 1, 0, ("red", "cat"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bare" / "red").mkdir(parents=True)
    (tmp_path / "bare" / "cat").mkdir()
    bpe = case.startswith("bpe")
    model = tiny_model(vocab_size=49408, tokenizer="clip-bpe") if bpe else tiny_model()
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, tmp_path / "model.pt")
    monkeypatch.setattr(evaluate, "build_eval_sets", lambda source, **kw: {})  # no sets needed to fail
    argv = {"no model": ["--model", "/nonexistent/model.pt"],
            "classes differ": ["--linear-probe", f"{train_dir},{other}"],
            "classes differ, fine-tuning": ["--finetune", f"{train_dir},{other}"],
            "empty folder": ["--zeroshot", str(tmp_path / "empty")],
            "folder without images": ["--linear-probe", f"{train_dir},{tmp_path / 'bare'}"],
            "one folder": ["--finetune", train_dir],
            "one class": ["--zeroshot", image_folder(tmp_path / "one_class", 1, 0, ("red",))],
            "bpe model, no task": [],
            "bpe model, synthetic zero-shot": ["--zeroshot", "synthetic", "--linear-probe", f"{train_dir},{train_dir}"],
            "bpe model, synthetic retrieval": ["--retrieval", "synthetic"],
            "clip_benchmark, two tasks, one file": ["--format", "clip_benchmark", "--zeroshot", "synthetic",
                                                    "--retrieval", "synthetic", "--out", str(tmp_path / "cb.json")],
            "fp16": ["--precision", "fp16"],
            "not a number": ["--batch-size", "many"],
            "out is a folder": ["--zeroshot", "synthetic", "--out", str(tmp_path)]}[case]
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path / "model.pt"), "--out", str(out), "--device", "cpu"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and culprit in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "evaluate.json").exists()
