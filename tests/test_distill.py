import math

import torch

from distill import FeatureDistill


def _hand_fd(s_img, s_txt, t_img, t_txt, alpha):
    # independent restatement, element by element in float64 Python
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def mse(a_rows, b_rows):
        sq = [(x - y) ** 2 for a, b in zip(a_rows, b_rows) for x, y in zip(unit(a), unit(b))]
        return sum(sq) / len(sq)

    return alpha * (mse(s_img, t_img) + mse(s_txt, t_txt))


def test_value_matches_hand_computation_same_dims():
    torch.manual_seed(0)
    s_img, s_txt, t_img, t_txt = (torch.randn(3, 4) for _ in range(4))
    fd = FeatureDistill(4, 4, alpha=500.0)
    assert not list(fd.parameters())  # identity projectors when dims agree
    want = _hand_fd(s_img.tolist(), s_txt.tolist(), t_img.tolist(), t_txt.tolist(), 500.0)
    assert math.isclose(fd(s_img, s_txt, t_img, t_txt).item(), want, rel_tol=1e-5)


def test_value_with_projector_and_several_captions():
    torch.manual_seed(0)
    B, k, Es, Et = 2, 3, 5, 4
    s_img, s_txt = torch.randn(B, Es), torch.randn(B, k, Es)
    t_img, t_txt = torch.randn(B, Et), torch.randn(B, k, Et)
    fd = FeatureDistill(Es, Et, alpha=2.0)
    W, b = fd.image_proj.weight.detach(), fd.image_proj.bias.detach()
    Wt, bt = fd.text_proj.weight.detach(), fd.text_proj.bias.detach()
    p_img = (s_img @ W.T + b).tolist()
    p_txt = (s_txt.reshape(B * k, Es) @ Wt.T + bt).tolist()  # all B*k captions count alike
    want = _hand_fd(p_img, p_txt, t_img.tolist(), t_txt.reshape(B * k, Et).tolist(), 2.0)
    assert math.isclose(fd(s_img, s_txt, t_img, t_txt).item(), want, rel_tol=1e-5)


def test_zero_when_student_equals_teacher_up_to_scale():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    loss = FeatureDistill(8, 8)(3.0 * img, 0.5 * txt, img, txt)  # only directions matter
    assert loss.item() < 1e-10


def test_gradients_reach_student_and_projector_only():
    torch.manual_seed(0)
    fd = FeatureDistill(6, 4)
    s_img, s_txt = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    t_img, t_txt = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    fd(s_img, s_txt, t_img, t_txt).backward()
    for g in (s_img.grad, s_txt.grad, *(p.grad for p in fd.parameters())):
        assert g is not None and g.abs().sum() > 0
    assert t_img.grad is None and t_txt.grad is None
    assert len(list(fd.parameters())) == 4  # image and text projectors, weight and bias
