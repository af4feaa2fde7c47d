"""clip_loss.py against a brute-force per-pair computation, and a gradient check."""
import math

import torch
import torch.nn.functional as F

from clip_loss import clip_loss


def brute_force(img, txt, scale):
    # -1/2B * sum_i [ log softmax_j(s <I_i, T_j>)_i + log softmax_j(s <T_i, I_j>)_i ], one pair at a time
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        row = [scale * float(img[i] @ txt[j]) for j in range(B)]
        col = [scale * float(txt[i] @ img[j]) for j in range(B)]
        total -= row[i] - math.log(sum(math.exp(r) for r in row))
        total -= col[i] - math.log(sum(math.exp(c) for c in col))
    return total / (2 * B)


def features(B=5, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_matches_brute_force():
    img, txt = features()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    expected = brute_force(img, txt, float(scale))
    got = clip_loss(img.double(), txt.double(), scale)
    assert abs(float(got) - expected) < 1e-5  # the loss runs in fp32


def test_perfect_alignment_gives_low_loss_and_chance_gives_log_b():
    img, _ = features(B=6, E=16)
    assert float(clip_loss(img, img, torch.tensor(100.0))) < 1e-3
    same = F.normalize(torch.ones(6, 16), dim=-1)
    assert abs(float(clip_loss(same, same, torch.tensor(10.0))) - math.log(6)) < 1e-5


def test_multi_caption_is_mean_over_caption_slots():
    img, txt1 = features(seed=1)
    _, txt2 = features(seed=2)
    scale = torch.tensor(20.0)
    both = torch.stack([txt1, txt2], dim=1)  # (B, k=2, E)
    expected = (brute_force(img, txt1, 20.0) + brute_force(img, txt2, 20.0)) / 2
    assert abs(float(clip_loss(img, both, scale)) - expected) < 1e-5


def test_gradient_check():
    img, txt = features(B=4, E=6)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def loss64(i, t, s):  # the same formula in float64, for gradcheck's finite differences
        logits = s * i @ t.T
        labels = torch.arange(i.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    assert torch.autograd.gradcheck(loss64, (img, txt, scale))
    # and the fp32 loss has the same gradients as the float64 formula
    loss64(img, txt, scale).backward()
    expected = [img.grad.clone(), txt.grad.clone(), scale.grad.clone()]
    for t in (img, txt, scale):
        t.grad = None
    clip_loss(img, txt, scale).backward()
    for got, want in zip((img.grad, txt.grad, scale.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
