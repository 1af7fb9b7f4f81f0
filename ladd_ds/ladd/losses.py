"""LADD losses: hinge adversarial losses (as in ADD), R1 penalty, distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generator_hinge_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """L_G = -mean(sum_k D_k(fake)); every head's logit map has the same (B, 1, h, w) shape."""
    return -torch.stack([logit.mean() for logit in fake_logits]).sum()


def discriminator_hinge_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """L_D = sum_k mean(relu(1 - D_k(real))) + mean(relu(1 + D_k(fake)))."""
    terms = [F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).sum()


def r1_penalty(real_logits: list[torch.Tensor], real_features: list[torch.Tensor]) -> torch.Tensor:
    """E[ ||d sum_k D_k(real) / d features||^2 ] over the head inputs (create_graph: it is trained)."""
    total = torch.stack([logit.sum() for logit in real_logits]).sum()
    grads = torch.autograd.grad(total, real_features, create_graph=True)
    return torch.stack([g.pow(2).flatten(1).sum(1).mean() for g in grads]).sum()


def distillation_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """MSE to the teacher's x0 prediction on the re-noised student output (target has no grad)."""
    return F.mse_loss(student_x0, teacher_x0.detach())
