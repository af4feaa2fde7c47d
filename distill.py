"""
Feature distillation (FD), the feature-space half of CoM-PT's inverse knowledge transfer (Fan et al., CVPR 2026,
arXiv 2604.12391, Sec. 3): while a grown model trains, its image and text embeddings are pulled towards those of
its trained predecessor (the teacher), on top of the CLIP loss.

    L_FD = alpha * [ MSE(n(P(s_img)), n(t_img)) + MSE(n(P(s_txt)), n(t_txt)) ],   n = L2 normalisation

with the MSE averaged over samples and embedding dims (F.mse_loss), alpha = 500 (ALPHA) as in every CoM-PT script, and P a
learned linear projector from the student's to the teacher's embedding dim, present only when they differ (the
whole family shares embed dim 512, so in the paper's chains P is the identity). FD is CLIP-KD's best single loss
(Yang et al., CVPR 2024), the only one the official code keeps.

Usage: the teacher runs forward only, in eval mode under no_grad, on the same augmented batch as the student, and
its raw embeddings are passed in; the module's parameters (the projectors) are trained with the student and
saved in its checkpoint (train.py does both).

    fd = FeatureDistill(student.cfg.embed_dim, teacher.cfg.embed_dim)
    with torch.no_grad():
        t_img, t_txt = teacher.encode_image(images), teacher.encode_text(tokens)
    loss = clip_loss(...) + fd(student.encode_image(images), student.encode_text(tokens), t_img, t_txt)

Deviations from the official code: the projectors are saved with the student (the official checkpoints leave them
out); several captions per image (text [B, k, E]) are averaged over all B*k captions.
"""

import torch.nn as nn
import torch.nn.functional as F

ALPHA = 500.0  # the FD weight of every official CoM-PT training script


class FeatureDistill(nn.Module):
    def __init__(self, student_dim, teacher_dim, alpha=ALPHA):
        super().__init__()
        self.alpha = alpha
        # one projector per tower (the official code's two linear layers), identity when the dims already agree
        same = student_dim == teacher_dim
        self.image_proj = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)
        self.text_proj = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)

    def forward(self, s_img, s_txt, t_img, t_txt):
        """s_img [B, Es], s_txt [B, Es] or [B, k, Es] (student, unnormalised); t_img [B, Et], t_txt [B, Et] or
        [B, k, Et] (teacher, unnormalised or normalised: it is normalised here). Returns the scalar loss (fp32)."""
        s_img = F.normalize(self.image_proj(s_img).float(), dim=-1)
        s_txt = F.normalize(self.text_proj(s_txt).float(), dim=-1)
        t_img = F.normalize(t_img.detach().float(), dim=-1)
        t_txt = F.normalize(t_txt.detach().float(), dim=-1)
        return self.alpha * (F.mse_loss(s_img, t_img) + F.mse_loss(s_txt, t_txt))
