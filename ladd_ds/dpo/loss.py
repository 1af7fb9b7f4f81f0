"""Diffusion-DPO for rectified flow (Wallace et al. 2023, adapted as in docs/method.md, section 5).

For a pair (winner w, loser l) noised with the same t and the same noise eps, the per-sample
velocity errors of the trained model and of the frozen reference give

    loss = -log sigmoid(-beta/2 * ((e_m(w) - e_r(w)) - (e_m(l) - e_r(l))))

The model lowers the loss by improving on the winner relative to the reference more than on the
loser. The argument of the sigmoid is the difference of the implicit rewards
r(x) = -beta/2 * (e_m(x) - e_r(x)) of winner and loser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ladd_ds.core import flow


def velocity_errors(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error of a velocity prediction: mean over (C, H, W) of
    (eps - x0 - v)^2. Returns (B,) in float32."""
    diff = flow.velocity_target(x0, eps).float() - v_pred.float()  # (B, C, H, W)
    return diff.square().flatten(1).mean(dim=1)


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO loss over the pairs and its metrics. All error arguments are (B,).

    `dpo/implicit_acc` is the fraction of pairs whose winner has the larger implicit reward, a tie
    counting one half: at the start, when the model is the reference, every pair ties and the
    accuracy is 0.5 (and the loss log 2)."""
    reward_w = -0.5 * beta * (model_err_w - ref_err_w)  # (B,)
    reward_l = -0.5 * beta * (model_err_l - ref_err_l)  # (B,)
    margin = reward_w - reward_l  # (B,) the sigmoid's argument
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
        metrics = {
            "dpo/loss": loss.item(),
            "dpo/implicit_acc": acc.item(),
            "dpo/reward_margin": margin.mean().item(),
            "dpo/reward_w": reward_w.mean().item(),
            "dpo/reward_l": reward_l.mean().item(),
            "dpo/model_err_w": model_err_w.mean().item(),
            "dpo/model_err_l": model_err_l.mean().item(),
            "dpo/ref_err_w": ref_err_w.mean().item(),
            "dpo/ref_err_l": ref_err_l.mean().item(),
        }
    return loss, metrics
