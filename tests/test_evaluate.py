"""Tests of evaluate.py: zero-shot and retrieval metrics against brute force, mean per-class recall, evaluate()'s
template averaging and caption order."""
import pytest
import torch
import torch.nn as nn

import evaluate


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
        {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0, "zeroshot_mean_per_class_recall": 1.0}
    # retrieval: 3 images in 2 batches, 2 captions each (rows i and 3 + i both point at image i)
    table = torch.cat([torch.eye(3), 0.9 * torch.eye(3) + 0.1])
    tokens = torch.stack([torch.arange(3), torch.arange(3, 6)], dim=1)[..., None]  # (3, 2, 1)
    retrieval = dict(batches=iter([(torch.eye(3)[:2], tokens[:2]), (torch.eye(3)[2:], tokens[2:])]))
    r = evaluate.evaluate(Lookup(table), {"retrieval": retrieval}, torch.device("cpu"))
    assert r == {f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
