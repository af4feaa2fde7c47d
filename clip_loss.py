"""
The CLIP contrastive loss: symmetric InfoNCE over the batch with a learnable temperature (Radford et al. 2021),
the task loss of every stage of the CoM-PT chain (Fan et al., CVPR 2026, arXiv 2604.12391, Sec. 3).

For B pairs, logits = scale * I @ T^T (B x B); the loss is the mean of the cross-entropy over rows (image -> text)
and over columns (text -> image), with the matching pair on the diagonal.

Distributed (torch.distributed initialised, world size W > 1): open_clip's `--local-loss --gather-with-grad`.
Each rank gathers every rank's features *with* gradients and scores its own B rows against all W*B columns; the
labels are offset by rank * B. With DDP's gradient averaging this yields exactly the gradient of the global-batch
loss, at O(B * W*B) memory per rank instead of O((W*B)^2).

Several captions per image (the paper's long-caption mode, text features [B, k, E]): the loss is averaged over the
k caption slots, each slot a plain B x B problem, as in the official code.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that lets gradients flow back: every rank's loss depends on every rank's features, so
    the gradient of a rank's own rows is the sum over ranks of their gradients (all-reduce, then take our rows)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, E)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B:(dist.get_rank() + 1) * B]


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def clip_loss(image_features, text_features, logit_scale):
    """image_features [B, E] and text_features [B, E] or [B, k, E], both L2-normalised; logit_scale is the
    temperature already exponentiated (a scalar tensor). Returns the scalar loss (in fp32)."""
    if text_features.dim() == 3:  # k captions per image: average the loss over caption slots
        k = text_features.shape[1]
        return sum(clip_loss(image_features, text_features[:, j], logit_scale) for j in range(k)) / k
    image_features, text_features, logit_scale = image_features.float(), text_features.float(), logit_scale.float()
    rank, world = _world()
    if world > 1:
        all_image = _GatherWithGrad.apply(image_features)  # (W*B, E), differentiable
        all_text = _GatherWithGrad.apply(text_features)
    else:
        all_image, all_text = image_features, text_features
    logits_per_image = logit_scale * image_features @ all_text.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_image.T  # (B, W*B)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
