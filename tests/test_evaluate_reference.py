"""evaluate.py against references built here: the linear probe against Newton's method in float64 on the same
L2-regularised multinomial logistic regression, CLIP_benchmark's undefined top-k, fine-tuning's step floor, and the
command line's accounting of pictures, its CLIP_benchmark records and its progress lines in a log."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import vit
from test_evaluate import TINY, image_folder, one_thread  # noqa: F401  (one_thread: the autouse fixture)


def newton(x, y, n_classes, weight_decay, steps=60):
    """The optimum of mean cross-entropy + weight_decay / 2 * |W|^2 (bias not decayed) on features x (N, D) float64,
    by Newton's method with backtracking: (W (D, K), b (K,)) and the loss."""
    n, d = x.shape
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # (N, D+1): the bias as a last weight row
    decay = torch.full((d + 1, 1), weight_decay, dtype=x.dtype)
    decay[-1] = 0

    def loss(theta):
        return F.cross_entropy(xb @ theta, y) + 0.5 * (decay * theta ** 2).sum()
    theta = torch.zeros(d + 1, n_classes, dtype=x.dtype)
    for _ in range(steps):
        p = (xb @ theta).softmax(dim=-1)  # (N, K)
        grad = xb.T @ (p - F.one_hot(y, n_classes).to(x.dtype)) / n + decay * theta  # (D+1, K)
        if grad.abs().max() < 1e-12:
            break
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, K, K)
        hessian = torch.einsum("nd,ne,nkl->dkel", xb, xb, curvature).reshape((d + 1) * n_classes, -1) / n
        hessian += torch.diag(decay.expand(-1, n_classes).reshape(-1))
        # least squares: the bias direction that adds one constant to every logit has no curvature
        step = torch.linalg.lstsq(hessian, grad.reshape(-1, 1), driver="gelsd").solution.view(d + 1, n_classes)
        t = 1.0
        while loss(theta - t * step) > loss(theta) - 1e-4 * t * (grad * step).sum() and t > 1e-8:
            t /= 2
        theta = theta - t * step
    return theta[:-1], theta[-1], loss(theta).item()


def correlated_features(n, seed, d=32, classes=5, noise=1e-2):
    """Overlapping classes in nearly collinear pairs of features (x, x + noise): a flat valley, as in real image
    features, along which a fit stops short unless it runs to convergence in float64."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d // 2, generator=torch.Generator().manual_seed(99))
    base = torch.randn(n, d // 2, generator=g) + 0.6 * centres[labels]
    return torch.cat([base, base + noise * torch.randn(n, d // 2, generator=g)], dim=1), labels


def test_linear_probe_reaches_the_newton_optimum():
    (x, y), (test_x, test_y) = correlated_features(500, 0), correlated_features(500, 1)
    mean, std = x.mean(dim=0), x.std(dim=0) + 1e-6  # fit_logistic's standardisation, so both solve one problem
    standard = ((x - mean) / std).double()
    for weight_decay in (1e-5, 1e-3):
        W, b = evaluate.fit_logistic(x, y, 5, weight_decay)
        W_std, b_std = (W * std[:, None]).double(), (b + mean @ W).double()  # the same solution, standardised
        ours = F.cross_entropy(standard @ W_std + b_std, y) + weight_decay / 2 * W_std.pow(2).sum()
        _, _, optimum = newton(standard, y, 5, weight_decay)
        assert ours.item() == pytest.approx(optimum, rel=1e-6, abs=1e-7)  # 100 fp32 iterations: 2e-6 off
    # the whole probe: its weight decay, refit on the whole split by Newton, scores the test split alike
    result = evaluate.linear_probe(x, y, test_x, test_y)
    W, b, _ = newton(standard, y, 5, result["weight_decay"])
    reference = (((test_x - mean) / std).double() @ W + b).argmax(dim=-1).eq(test_y).double().mean().item()
    assert abs(result["top1"] - reference) <= 0.005 and result["top5"] == 1.0  # 5 classes: top-5 is every class


def test_top_k_is_undefined_with_fewer_classes_than_k():
    labels = torch.tensor([0, 1, 2, 3])
    four = evaluate.classification_metrics(torch.eye(4)[[1, 1, 2, 3]], labels)
    assert four == {"top1": 0.75, "top5": None, "mean_per_class_recall": 0.75}
    five = evaluate.classification_metrics(F.pad(torch.eye(4)[[1, 1, 2, 3]], (0, 1)), labels)
    assert five["top5"] == 1.0
    assert evaluate.zeroshot_accuracy(torch.eye(3), torch.arange(3), torch.eye(3)) == {1: 1.0, 5: None}
    assert "| zeroshot_top5 | undefined |" in evaluate.markdown({"zeroshot_top5": None})


def test_finetuning_runs_at_least_its_minimum_of_steps():
    assert evaluate.finetune_epochs(5, 1437, 64) == 9  # 23 steps an epoch: 9 epochs make 207 >= 200 steps
    assert evaluate.finetune_epochs(5, 100_000, 64) == 5  # 1,563 steps an epoch: as asked
    assert evaluate.finetune_epochs(0, 100, 64) == 0 and evaluate.finetune_epochs(3, 100, 64, min_steps=0) == 3


def test_cli_counts_every_picture_and_writes_clip_benchmark_records(tmp_path, capsys):
    folder = tmp_path / "colours"
    image_folder(folder, 3, seed=0)  # red, green, blue: 3 pictures each
    (folder / "red" / "broken.png").write_bytes(b"\x89PNG not really")  # not a picture, named as one
    Image.new("RGB", (4, 4)).save(folder / "green" / "tiny.png")
    (folder / "green" / "tiny.png").write_bytes(b"")  # an empty file
    (folder / "blue" / "notes.txt").write_text("not a picture")  # another kind of file
    torch.manual_seed(0)
    model = vit.CLIP(vit.config("cpu-tiny", **TINY, embed_dim=64))
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, tmp_path / "model.pt")
    common = ["--model", str(tmp_path / "model.pt"), "--zeroshot", str(folder), "--device", "cpu"]
    ours = evaluate.main(common + ["--out", str(tmp_path / "ours.json")])
    out, err = capsys.readouterr()
    assert "pictures skipped: zeroshot 3 of 12 (empty_file 1, not_an_image 1, other_file 1)" in out.splitlines()
    assert [line for line in err.splitlines() if line.startswith("evaluate: ")] == [
        next(line for line in err.splitlines() if line.startswith("evaluate: zero-shot: 9 pictures in "))]
    saved = json.loads((tmp_path / "ours.json").read_text())
    assert saved["pictures"] == {"zeroshot": {"scored": 9, "skipped": {"empty_file": 1, "not_an_image": 1,
                                                                       "other_file": 1}}}
    assert saved["tasks"] == {"zeroshot": str(folder)} and saved["precision"] == "fp32"
    assert saved["metrics"]["zeroshot_top5"] is None and "| zeroshot_top5 | undefined |" in out  # 3 classes

    evaluate.main(common + ["--format", "clip_benchmark", "--out", str(tmp_path / "{dataset}_{task}.json")])
    name = str(folder).replace("/", "_").strip("_") + "_zeroshot_classification.json"
    record = json.loads((tmp_path / name).read_text())
    assert {k: record[k] for k in ("dataset", "model", "pretrained", "task", "language")} == {
        "dataset": str(folder), "model": "cpu-tiny", "pretrained": str(tmp_path / "model.pt"),
        "task": "zeroshot_classification", "language": "en"}
    assert record["metrics"] == {"acc1": ours["zeroshot_top1"], "acc5": None,
                                 "mean_per_class_recall": ours["zeroshot_mean_per_class_recall"]}
    assert record["pictures"] == saved["pictures"] and record["precision"] == "fp32"


def test_clip_benchmark_names_every_retrieval_and_probe_metric():
    names = {theirs for _, keys in evaluate.CLIP_BENCHMARK.values() for theirs in keys.values()}
    assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= names
    assert {"acc1", "acc5", "mean_per_class_recall", "lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= names
    # CLIP_benchmark's image retrieval finds a caption's image: our text -> image
    assert evaluate.CLIP_BENCHMARK["retrieval"][1]["t2i_R@1"] == "image_retrieval_recall@1"
